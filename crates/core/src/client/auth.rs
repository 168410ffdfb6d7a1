//! The Auth service: enable/disable, users, roles and their key-range permissions.
//! Management calls are writes (no resend after an ambiguous failure); gets and lists
//! are reads.
use super::{Client, ClientError, Retry};
use crate::proto::etcdserverpb::{self as pb, auth_client::AuthClient};

/// One client method per Auth RPC: `name(request) -> response`, retried as `retry`.
macro_rules! auth_calls {
    ($($(#[$doc:meta])* $name:ident($req:ty) -> $resp:ty, $retry:expr;)*) => {
        impl Client {$(
            $(#[$doc])*
            pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
                self.with_failover($retry, |ch| {
                    let req = req.clone();
                    async move { AuthClient::new(ch).$name(req).await }
                })
                .await
            }
        )*}
    };
}

auth_calls! {
    /// Turns auth on (needs a `root` user with the `root` role).
    auth_enable(pb::AuthEnableRequest) -> pb::AuthEnableResponse, Retry::OnlyIfNotSent;
    auth_disable(pb::AuthDisableRequest) -> pb::AuthDisableResponse, Retry::OnlyIfNotSent;
    auth_status(pb::AuthStatusRequest) -> pb::AuthStatusResponse, Retry::Idempotent;
    user_add(pb::AuthUserAddRequest) -> pb::AuthUserAddResponse, Retry::OnlyIfNotSent;
    user_get(pb::AuthUserGetRequest) -> pb::AuthUserGetResponse, Retry::Idempotent;
    user_list(pb::AuthUserListRequest) -> pb::AuthUserListResponse, Retry::Idempotent;
    user_delete(pb::AuthUserDeleteRequest) -> pb::AuthUserDeleteResponse, Retry::OnlyIfNotSent;
    user_change_password(pb::AuthUserChangePasswordRequest) -> pb::AuthUserChangePasswordResponse, Retry::OnlyIfNotSent;
    user_grant_role(pb::AuthUserGrantRoleRequest) -> pb::AuthUserGrantRoleResponse, Retry::OnlyIfNotSent;
    user_revoke_role(pb::AuthUserRevokeRoleRequest) -> pb::AuthUserRevokeRoleResponse, Retry::OnlyIfNotSent;
    role_add(pb::AuthRoleAddRequest) -> pb::AuthRoleAddResponse, Retry::OnlyIfNotSent;
    role_get(pb::AuthRoleGetRequest) -> pb::AuthRoleGetResponse, Retry::Idempotent;
    role_list(pb::AuthRoleListRequest) -> pb::AuthRoleListResponse, Retry::Idempotent;
    role_delete(pb::AuthRoleDeleteRequest) -> pb::AuthRoleDeleteResponse, Retry::OnlyIfNotSent;
    role_grant_permission(pb::AuthRoleGrantPermissionRequest) -> pb::AuthRoleGrantPermissionResponse, Retry::OnlyIfNotSent;
    role_revoke_permission(pb::AuthRoleRevokePermissionRequest) -> pb::AuthRoleRevokePermissionResponse, Retry::OnlyIfNotSent;
}
