//! `user`, `role` and `auth`: the Auth service, printed as etcdctl 3.4 prints it
//! (`-w json` prints the response header and fields instead).
use std::io::Write;

use anyhow::{bail, Result};
use mesh_core::client::{from_key_range_end, prefix_range_end, Client, ClientError};
use mesh_core::proto::authpb::{permission::Type as PermType, Permission};
use mesh_core::proto::etcdserverpb as pb;
use serde_json::json;

use crate::cli::{AuthCommand, RoleCommand, UserCommand};
use crate::output::{json as out_json, Format};
use crate::password;

/// Prints `text` (simple and table formats) or `value` with the header (json).
fn print(
    out: &mut dyn Write,
    f: Format,
    header: &Option<pb::ResponseHeader>,
    text: &str,
    value: serde_json::Value,
) -> Result<()> {
    match f {
        Format::Json => {
            let mut v = json!({ "header": out_json::header(header) });
            if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), value) {
                obj.extend(extra);
            }
            writeln!(out, "{v}")?;
        }
        Format::Simple | Format::Table => write!(out, "{text}")?,
    }
    Ok(out.flush()?)
}

pub async fn user(client: &Client, out: &mut dyn Write, f: Format, cmd: UserCommand) -> Result<()> {
    match cmd {
        UserCommand::Add {
            user,
            interactive,
            new_user_password,
            no_password,
        } => {
            let (name, inline) = match user.split_once(':') {
                Some((n, p)) => (n.to_string(), Some(p.to_string())),
                None => (user, None),
            };
            let password = match (no_password, inline.or(new_user_password)) {
                (true, _) => String::new(),
                (false, Some(p)) => p,
                (false, None) => password::new_password(&name, interactive)?,
            };
            let r = client
                .user_add(pb::AuthUserAddRequest {
                    name: name.clone(),
                    password,
                    options: Some(mesh_core::proto::authpb::UserAddOptions { no_password }),
                    ..Default::default()
                })
                .await?;
            print(
                out,
                f,
                &r.header,
                &format!("User {name} created\n"),
                json!({}),
            )
        }
        UserCommand::Get { name, detail } => {
            let r = client
                .user_get(pb::AuthUserGetRequest { name: name.clone() })
                .await?;
            let mut text = format!("User: {name}\n");
            if detail {
                for role in &r.roles {
                    let perms = client
                        .role_get(pb::AuthRoleGetRequest { role: role.clone() })
                        .await?;
                    text.push('\n');
                    text.push_str(&role_text(role, &perms.perm));
                }
            } else {
                text.push_str("Roles:");
                for role in &r.roles {
                    text.push(' ');
                    text.push_str(role);
                }
                text.push('\n');
            }
            print(out, f, &r.header, &text, json!({ "roles": r.roles }))
        }
        UserCommand::List => {
            let r = client.user_list(pb::AuthUserListRequest {}).await?;
            let text: String = r.users.iter().map(|u| format!("{u}\n")).collect();
            print(out, f, &r.header, &text, json!({ "users": r.users }))
        }
        UserCommand::Delete { name } => {
            let r = client
                .user_delete(pb::AuthUserDeleteRequest { name: name.clone() })
                .await?;
            print(
                out,
                f,
                &r.header,
                &format!("User {name} deleted\n"),
                json!({}),
            )
        }
        UserCommand::Passwd { name, interactive } => {
            let password = password::new_password(&name, interactive)?;
            let r = client
                .user_change_password(pb::AuthUserChangePasswordRequest {
                    name,
                    password,
                    ..Default::default()
                })
                .await?;
            print(out, f, &r.header, "Password updated\n", json!({}))
        }
        UserCommand::GrantRole { user, role } => {
            let r = client
                .user_grant_role(pb::AuthUserGrantRoleRequest {
                    user: user.clone(),
                    role: role.clone(),
                })
                .await?;
            let text = format!("Role {role} is granted to user {user}\n");
            print(out, f, &r.header, &text, json!({}))
        }
        UserCommand::RevokeRole { user, role } => {
            let r = client
                .user_revoke_role(pb::AuthUserRevokeRoleRequest {
                    name: user.clone(),
                    role: role.clone(),
                })
                .await?;
            let text = format!("Role {role} is revoked from user {user}\n");
            print(out, f, &r.header, &text, json!({}))
        }
    }
}

/// The key range of `key [range_end] [--prefix | --from-key]`, as etcdctl builds it.
fn perm_range(
    key: &str,
    end: Option<String>,
    prefix: bool,
    from_key: bool,
) -> Result<(Vec<u8>, Vec<u8>)> {
    if prefix && from_key {
        bail!("--prefix and --from-key cannot be set at the same time");
    }
    if (prefix || from_key) && end.is_some() {
        bail!("unexpected range end with --prefix or --from-key");
    }
    let key = key.as_bytes().to_vec();
    let end = if prefix {
        prefix_range_end(&key)
    } else if from_key {
        from_key_range_end()
    } else {
        end.map(String::into_bytes).unwrap_or_default()
    };
    Ok((key, end))
}

fn perm_json(p: &Permission) -> serde_json::Value {
    json!({
        "permType": PermType::try_from(p.perm_type).map_or("READ", |t| t.as_str_name()),
        "key": String::from_utf8_lossy(&p.key),
        "range_end": String::from_utf8_lossy(&p.range_end),
    })
}

/// etcdctl's listing of a role: the READ and the WRITE ranges, one per line.
fn role_text(role: &str, perms: &[Permission]) -> String {
    let line = |p: &Permission| {
        let key = String::from_utf8_lossy(&p.key);
        let end = String::from_utf8_lossy(&p.range_end);
        let mut s = String::from("\t");
        if end.is_empty() {
            s.push_str(&key);
        } else {
            // etcdctl 3.4 leaves an open-ended range unclosed: `[key, <open ended>`.
            if end == "\0" {
                s.push_str(&format!("[{key}, <open ended>"));
            } else {
                s.push_str(&format!("[{key}, {end})"));
            }
            if !key.is_empty() && prefix_range_end(&p.key) == p.range_end {
                s.push_str(&format!(" (prefix {key})"));
            }
        }
        s.push('\n');
        s
    };
    let has = |p: &Permission, t: PermType| {
        let pt = PermType::try_from(p.perm_type).unwrap_or(PermType::Read);
        pt == t || pt == PermType::Readwrite
    };
    let mut text = format!("Role {role}\nKV Read:\n");
    text.extend(perms.iter().filter(|p| has(p, PermType::Read)).map(line));
    text.push_str("KV Write:\n");
    text.extend(perms.iter().filter(|p| has(p, PermType::Write)).map(line));
    text
}

pub async fn role(client: &Client, out: &mut dyn Write, f: Format, cmd: RoleCommand) -> Result<()> {
    match cmd {
        RoleCommand::Add { name } => {
            let r = client
                .role_add(pb::AuthRoleAddRequest { name: name.clone() })
                .await?;
            print(
                out,
                f,
                &r.header,
                &format!("Role {name} created\n"),
                json!({}),
            )
        }
        RoleCommand::Get { name } => {
            let r = client
                .role_get(pb::AuthRoleGetRequest { role: name.clone() })
                .await?;
            let perms: Vec<_> = r.perm.iter().map(perm_json).collect();
            print(
                out,
                f,
                &r.header,
                &role_text(&name, &r.perm),
                json!({ "perm": perms }),
            )
        }
        RoleCommand::List => {
            let r = client.role_list(pb::AuthRoleListRequest {}).await?;
            let text: String = r.roles.iter().map(|x| format!("{x}\n")).collect();
            print(out, f, &r.header, &text, json!({ "roles": r.roles }))
        }
        RoleCommand::Delete { name } => {
            let r = client
                .role_delete(pb::AuthRoleDeleteRequest { role: name.clone() })
                .await?;
            print(
                out,
                f,
                &r.header,
                &format!("Role {name} deleted\n"),
                json!({}),
            )
        }
        RoleCommand::GrantPermission {
            name,
            perm,
            key,
            range_end,
            prefix,
            from_key,
        } => {
            let perm_type = match perm.to_ascii_lowercase().as_str() {
                "read" => PermType::Read,
                "write" => PermType::Write,
                "readwrite" => PermType::Readwrite,
                _ => bail!("invalid permission type {perm}: use read, write or readwrite"),
            };
            let (key, range_end) = perm_range(&key, range_end, prefix, from_key)?;
            let r = client
                .role_grant_permission(pb::AuthRoleGrantPermissionRequest {
                    name: name.clone(),
                    perm: Some(Permission {
                        perm_type: perm_type as i32,
                        key,
                        range_end,
                    }),
                })
                .await?;
            print(
                out,
                f,
                &r.header,
                &format!("Role {name} updated\n"),
                json!({}),
            )
        }
        RoleCommand::RevokePermission {
            name,
            key,
            range_end,
            prefix,
            from_key,
        } => {
            let (k, end) = perm_range(&key, range_end, prefix, from_key)?;
            let r = client
                .role_revoke_permission(pb::AuthRoleRevokePermissionRequest {
                    role: name.clone(),
                    key: k,
                    range_end: end.clone(),
                })
                .await?;
            let end = String::from_utf8_lossy(&end);
            let text = if end.is_empty() {
                format!("Permission of key {key} is revoked from role {name}\n")
            } else if end == "\0" {
                format!("Permission of range [{key}, <open ended> is revoked from role {name}\n")
            } else {
                format!("Permission of range [{key}, {end}) is revoked from role {name}\n")
            };
            print(out, f, &r.header, &text, json!({}))
        }
    }
}

pub async fn auth(client: &Client, out: &mut dyn Write, f: Format, cmd: AuthCommand) -> Result<()> {
    match cmd {
        AuthCommand::Enable => {
            // As etcdctl: a root user without the root role gets it (creating the role).
            loop {
                match client.auth_enable(pb::AuthEnableRequest {}).await {
                    Ok(r) => {
                        return print(out, f, &r.header, "Authentication Enabled\n", json!({}))
                    }
                    Err(ClientError::Rpc { message, .. })
                        if message == "etcdserver: root user does not have root role" =>
                    {
                        let root = || "root".to_string();
                        match client
                            .role_add(pb::AuthRoleAddRequest { name: root() })
                            .await
                        {
                            Ok(_) => {}
                            Err(ClientError::Rpc { message, .. })
                                if message == "etcdserver: role name already exists" => {}
                            Err(e) => return Err(e.into()),
                        }
                        client
                            .user_grant_role(pb::AuthUserGrantRoleRequest {
                                user: root(),
                                role: root(),
                            })
                            .await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        AuthCommand::Disable => {
            let r = client.auth_disable(pb::AuthDisableRequest {}).await?;
            print(out, f, &r.header, "Authentication Disabled\n", json!({}))
        }
        AuthCommand::Status => {
            let r = client.auth_status(pb::AuthStatusRequest {}).await?;
            let text = format!(
                "Authentication Status: {}\nAuthRevision: {}\n",
                r.enabled, r.auth_revision
            );
            print(
                out,
                f,
                &r.header,
                &text,
                json!({ "enabled": r.enabled, "authRevision": r.auth_revision }),
            )
        }
    }
}
