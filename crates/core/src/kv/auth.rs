//! The replicated auth store (etcd's users, roles, key-range permissions, the enabled
//! flag and the auth revision) kept as one record in the `auth` table and mirrored in
//! memory for the permission checks; plus the simple tokens every member learns
//! through Raft (in memory only, as etcd's, with an expiry refreshed on use).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use redb::{ReadableTable, TableDefinition};

use super::{ApplyBatch, KvError};
use crate::proto::authpb::{permission::Type as PermType, Permission, Role, User};
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::{auth_change::Change, AuthChange, AuthSnapshot};

/// The whole auth store: "store" → encoded `meshpb::AuthSnapshot`.
pub(crate) const AUTH: TableDefinition<&str, &[u8]> = TableDefinition::new("auth");
const AUTH_KEY: &str = "store";

/// etcd's name of the all-powerful user and role.
pub const ROOT: &str = "root";
/// etcd's default simple-token TTL (`--auth-token-ttl`).
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);

/// The auth store as the permission checks read it.
#[derive(Clone, Debug, Default)]
pub struct AuthState {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
}

fn name(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl AuthState {
    pub(crate) fn from_snapshot(s: &AuthSnapshot) -> AuthState {
        AuthState {
            enabled: s.enabled,
            revision: s.revision,
            users: s.users.iter().map(|u| (name(&u.name), u.clone())).collect(),
            roles: s.roles.iter().map(|r| (name(&r.name), r.clone())).collect(),
        }
    }

    pub(crate) fn to_snapshot(&self) -> AuthSnapshot {
        AuthSnapshot {
            enabled: self.enabled,
            revision: self.revision,
            users: self.users.values().cloned().collect(),
            roles: self.roles.values().cloned().collect(),
        }
    }

    /// Whether `user` holds the root role (may do everything).
    pub fn is_root(&self, user: &str) -> bool {
        self.users
            .get(user)
            .is_some_and(|u| u.roles.iter().any(|r| r == ROOT))
    }

    /// etcd's admin check: only users with the root role manage auth, members and
    /// maintenance when auth is enabled.
    pub fn check_admin(&self, user: &str) -> Result<(), KvError> {
        if !self.enabled || self.is_root(user) {
            return Ok(());
        }
        Err(KvError::PermissionDenied)
    }

    /// Every permission a put needs: WRITE on its key, and READ too for `prev_kv`.
    pub fn check_put(&self, user: &str, p: &pb::PutRequest) -> Result<(), KvError> {
        self.check_range(user, &p.key, &[], PermType::Write)?;
        if p.prev_kv {
            self.check_range(user, &p.key, &[], PermType::Read)?;
        }
        Ok(())
    }

    /// Every permission a delete needs: WRITE on its range, and READ too for `prev_kv`.
    pub fn check_delete(&self, user: &str, d: &pb::DeleteRangeRequest) -> Result<(), KvError> {
        self.check_range(user, &d.key, &d.range_end, PermType::Write)?;
        if d.prev_kv {
            self.check_range(user, &d.key, &d.range_end, PermType::Read)?;
        }
        Ok(())
    }

    /// Every permission a txn needs: READ for compares and ranges, and what each put
    /// and delete needs, recursively.
    pub fn check_txn(&self, user: &str, t: &pb::TxnRequest) -> Result<(), KvError> {
        use pb::request_op::Request as Op;
        for c in &t.compare {
            self.check_range(user, &c.key, &c.range_end, PermType::Read)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => {
                    self.check_range(user, &r.key, &r.range_end, PermType::Read)?
                }
                Some(Op::RequestPut(p)) => self.check_put(user, p)?,
                Some(Op::RequestDeleteRange(d)) => self.check_delete(user, d)?,
                Some(Op::RequestTxn(n)) => self.check_txn(user, n)?,
                None => {}
            }
        }
        Ok(())
    }

    /// Every permission a replicated client write needs (Put, DeleteRange, Txn; other
    /// requests are checked where they arrive).
    pub fn check_request(
        &self,
        user: &str,
        request: &crate::proto::meshpb::internal_request::Request,
    ) -> Result<(), KvError> {
        use crate::proto::meshpb::internal_request::Request;
        match request {
            Request::Put(r) => self.check_put(user, r),
            Request::DeleteRange(r) => self.check_delete(user, r),
            Request::Txn(r) => self.check_txn(user, r),
            _ => Ok(()),
        }
    }

    /// Whether `user` may access [key, range_end) (etcd's encoding: empty range_end is
    /// the one key, "\0" every key from `key` on) with `perm` (READ or WRITE).
    pub fn check_range(
        &self,
        user: &str,
        key: &[u8],
        range_end: &[u8],
        perm: PermType,
    ) -> Result<(), KvError> {
        if !self.enabled {
            return Ok(());
        }
        let Some(u) = self.users.get(user) else {
            return Err(KvError::PermissionDenied);
        };
        if u.roles.iter().any(|r| r == ROOT) {
            return Ok(());
        }
        let mut granted: Vec<Interval> = u
            .roles
            .iter()
            .filter_map(|r| self.roles.get(r))
            .flat_map(|r| r.key_permission.iter())
            .filter(|p| {
                let t = PermType::try_from(p.perm_type).unwrap_or(PermType::Read);
                t == perm || t == PermType::Readwrite
            })
            .map(|p| Interval::of(&p.key, &p.range_end))
            .collect();
        if Interval::of(key, range_end).covered_by(&mut granted) {
            Ok(())
        } else {
            Err(KvError::PermissionDenied)
        }
    }
}

/// A key interval [start, end); `end` None means unbounded.
#[derive(Clone, Debug)]
struct Interval {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
}

impl Interval {
    fn of(key: &[u8], range_end: &[u8]) -> Interval {
        let end = match range_end {
            [] => {
                let mut k = key.to_vec();
                k.push(0);
                Some(k)
            }
            [0] => None,
            e => Some(e.to_vec()),
        };
        Interval {
            start: key.to_vec(),
            end,
        }
    }

    /// Whether the union of `granted` covers all of `self`.
    fn covered_by(&self, granted: &mut [Interval]) -> bool {
        if matches!(&self.end, Some(e) if *e <= self.start) {
            // An empty range asks for nothing.
            return true;
        }
        granted.sort_by(|a, b| a.start.cmp(&b.start));
        let mut reached = self.start.clone();
        for g in granted.iter() {
            if g.start > reached {
                break;
            }
            match &g.end {
                None => return true,
                Some(e) if *e > reached => reached = e.clone(),
                _ => {}
            }
            if matches!(&self.end, Some(want) if reached >= *want) {
                return true;
            }
        }
        false
    }
}

/// Simple tokens: token → (user, deadline). Learned by every member when it applies
/// the token's Raft entry; forgotten on expiry, when auth is disabled, or when the user
/// is deleted or changes password.
pub(crate) struct Tokens {
    ttl: Mutex<Duration>,
    map: Mutex<HashMap<String, (String, Instant)>>,
    clock: crate::Clock,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("ttl", &self.ttl()).finish()
    }
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens::with_clock(crate::system_clock())
    }
}

impl Tokens {
    pub(crate) fn with_clock(clock: crate::Clock) -> Tokens {
        Tokens {
            ttl: Mutex::new(DEFAULT_TOKEN_TTL),
            map: Mutex::default(),
            clock,
        }
    }

    pub(crate) fn set_ttl(&self, ttl: Duration) {
        *self.ttl.lock().unwrap_or_else(|p| p.into_inner()) = ttl;
    }

    fn ttl(&self) -> Duration {
        *self.ttl.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn insert(&self, token: String, user: String) {
        let now = (self.clock)();
        let deadline = now + self.ttl();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, d)| *d > now);
        map.insert(token, (user, deadline));
    }

    /// The user of a live token, refreshing its deadline.
    pub(crate) fn user(&self, token: &str) -> Option<String> {
        let ttl = self.ttl();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = (self.clock)();
        match map.get_mut(token) {
            Some((user, deadline)) if *deadline > now => {
                *deadline = now + ttl;
                Some(user.clone())
            }
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    /// How many tokens are live now (none is refreshed by counting).
    pub(crate) fn live(&self) -> usize {
        let now = (self.clock)();
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|(_, deadline)| *deadline > now).count()
    }

    pub(crate) fn forget_user(&self, user: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (u, _)| u != user);
    }

    pub(crate) fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

pub(crate) fn load<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
) -> Result<AuthSnapshot, KvError> {
    Ok(match table.get(AUTH_KEY)? {
        Some(v) => AuthSnapshot::decode(v.value())?,
        None => AuthSnapshot::default(),
    })
}

pub(crate) fn store(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    s: &AuthSnapshot,
) -> Result<(), KvError> {
    table.insert(AUTH_KEY, s.encode_to_vec().as_slice())?;
    Ok(())
}

/// What applying a token entry or a change did to the in-memory tokens.
pub(crate) enum TokenEffect {
    None,
    Insert { token: String, user: String },
    ForgetUser(String),
    Clear,
}

impl ApplyBatch<'_> {
    /// The auth store as of this point of the batch (its own changes included).
    pub fn auth_now(&mut self) -> Result<std::sync::Arc<AuthState>, KvError> {
        if !self.auth_changed {
            return Ok(self.store.auth());
        }
        let stored = with_batch_table!(self, AUTH, |table| load(&table))?;
        Ok(std::sync::Arc::new(AuthState::from_snapshot(&stored)))
    }

    /// Applies one auth change with etcd's rules and errors.
    pub fn auth_change(&mut self, change: AuthChange) -> Result<(), KvError> {
        // A token (Authenticate) changes no table: only a real change needs the
        // batch's write transaction.
        let stored = with_batch_table!(self, AUTH, |table| load(&table))?;
        let mut state = AuthState::from_snapshot(&stored);
        let effect = apply_change(&mut state, change.change)?;
        if !matches!(effect, TokenEffect::Insert { .. }) {
            state.revision += 1;
            store(
                &mut self.write_txn()?.open_table(AUTH)?,
                &state.to_snapshot(),
            )?;
            self.auth_changed = true;
        }
        self.token_effects.push(effect);
        Ok(())
    }
}

fn user_mut<'s>(state: &'s mut AuthState, user: &str) -> Result<&'s mut User, KvError> {
    state.users.get_mut(user).ok_or(KvError::UserNotFound)
}

fn apply_change(state: &mut AuthState, change: Option<Change>) -> Result<TokenEffect, KvError> {
    let Some(change) = change else {
        return Ok(TokenEffect::None);
    };
    match change {
        Change::Enable(_) => {
            if !state.enabled {
                let root = state.users.get(ROOT).ok_or(KvError::RootUserNotExist)?;
                if !root.roles.iter().any(|r| r == ROOT) {
                    return Err(KvError::RootRoleNotExist);
                }
                state.enabled = true;
            }
            Ok(TokenEffect::None)
        }
        Change::Disable(_) => {
            state.enabled = false;
            Ok(TokenEffect::Clear)
        }
        Change::UserAdd(r) => {
            if r.name.is_empty() {
                return Err(KvError::UserEmpty);
            }
            if state.users.contains_key(&r.name) {
                return Err(KvError::UserAlreadyExist);
            }
            let user = User {
                name: r.name.clone().into_bytes(),
                password: r.hashed_password.into_bytes(),
                roles: vec![],
                options: r.options,
            };
            state.users.insert(r.name, user);
            Ok(TokenEffect::None)
        }
        Change::UserDelete(r) => {
            if r.name.is_empty() {
                return Err(KvError::UserEmpty);
            }
            if state.enabled && r.name == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            state.users.remove(&r.name).ok_or(KvError::UserNotFound)?;
            Ok(TokenEffect::ForgetUser(r.name))
        }
        Change::UserChangePassword(r) => {
            if r.name.is_empty() {
                return Err(KvError::UserEmpty);
            }
            user_mut(state, &r.name)?.password = r.hashed_password.into_bytes();
            Ok(TokenEffect::ForgetUser(r.name))
        }
        Change::UserGrantRole(r) => {
            if r.role != ROOT && !state.roles.contains_key(&r.role) {
                user_mut(state, &r.user)?;
                return Err(KvError::RoleNotFound);
            }
            let user = user_mut(state, &r.user)?;
            if let Err(at) = user.roles.binary_search(&r.role) {
                user.roles.insert(at, r.role);
            }
            Ok(TokenEffect::None)
        }
        Change::UserRevokeRole(r) => {
            if state.enabled && r.name == ROOT && r.role == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            let user = user_mut(state, &r.name)?;
            let at = user
                .roles
                .iter()
                .position(|x| *x == r.role)
                .ok_or(KvError::RoleNotGranted)?;
            user.roles.remove(at);
            Ok(TokenEffect::None)
        }
        Change::RoleAdd(r) => {
            if r.name.is_empty() {
                return Err(KvError::RoleEmpty);
            }
            if state.roles.contains_key(&r.name) {
                return Err(KvError::RoleAlreadyExist);
            }
            let role = Role {
                name: r.name.clone().into_bytes(),
                key_permission: vec![],
            };
            state.roles.insert(r.name, role);
            Ok(TokenEffect::None)
        }
        Change::RoleDelete(r) => {
            if state.enabled && r.role == ROOT {
                return Err(KvError::InvalidAuthMgmt);
            }
            state.roles.remove(&r.role).ok_or(KvError::RoleNotFound)?;
            for u in state.users.values_mut() {
                u.roles.retain(|x| *x != r.role);
            }
            Ok(TokenEffect::None)
        }
        Change::RoleGrantPermission(r) => {
            let role = state.roles.get_mut(&r.name).ok_or(KvError::RoleNotFound)?;
            let perm = r.perm.ok_or(KvError::PermissionNotGiven)?;
            grant(&mut role.key_permission, perm);
            Ok(TokenEffect::None)
        }
        Change::RoleRevokePermission(r) => {
            let role = state.roles.get_mut(&r.role).ok_or(KvError::RoleNotFound)?;
            let at = role
                .key_permission
                .iter()
                .position(|p| p.key == r.key && p.range_end == r.range_end)
                .ok_or(KvError::PermissionNotGranted)?;
            role.key_permission.remove(at);
            Ok(TokenEffect::None)
        }
        Change::Token(t) => {
            if !state.enabled {
                return Err(KvError::AuthNotEnabled);
            }
            if !state.users.contains_key(&t.user) {
                return Err(KvError::AuthFailed);
            }
            Ok(TokenEffect::Insert {
                token: t.token,
                user: t.user,
            })
        }
    }
}

/// Adds or updates (same key and range) a permission, keeping them sorted.
fn grant(perms: &mut Vec<Permission>, perm: Permission) {
    let order = |p: &Permission| (p.key.clone(), p.range_end.clone());
    match perms.binary_search_by(|p| order(p).cmp(&order(&perm))) {
        Ok(at) => perms[at].perm_type = perm.perm_type,
        Err(at) => perms.insert(at, perm),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_token_lives_its_ttl_after_its_last_use() {
        use std::sync::Arc;
        let now = Arc::new(Mutex::new(Instant::now()));
        let read = now.clone();
        let tokens = Tokens::with_clock(Arc::new(move || *read.lock().unwrap()));
        let advance = |d: Duration| *now.lock().unwrap() += d;
        tokens.set_ttl(Duration::from_secs(300));
        tokens.insert("t1".into(), "alice".into());
        advance(Duration::from_secs(299));
        assert_eq!(tokens.user("t1").as_deref(), Some("alice"), "and refreshed");
        advance(Duration::from_secs(299));
        assert_eq!(tokens.user("t1").as_deref(), Some("alice"));
        advance(Duration::from_secs(300));
        assert_eq!(tokens.user("t1"), None, "expired after a TTL unused");
        tokens.insert("t2".into(), "bob".into());
        tokens.forget_user("bob");
        assert_eq!(tokens.user("t2"), None, "a deleted user's tokens go");
    }

    use super::*;

    fn perm(t: PermType, key: &str, end: &str) -> Permission {
        Permission {
            perm_type: t as i32,
            key: key.into(),
            range_end: end.into(),
        }
    }

    #[test]
    fn ranges_are_checked_against_the_union_of_granted_ranges() {
        let mut s = AuthState {
            enabled: true,
            ..Default::default()
        };
        s.roles.insert(
            "r".into(),
            Role {
                name: b"r".to_vec(),
                key_permission: vec![
                    perm(PermType::Read, "a", "c"),
                    perm(PermType::Readwrite, "c", "e"),
                    perm(PermType::Write, "k", ""),
                    perm(PermType::Read, "x", "\0"),
                ],
            },
        );
        s.users.insert(
            "u".into(),
            User {
                name: b"u".to_vec(),
                roles: vec!["r".into()],
                ..Default::default()
            },
        );
        let read =
            |k: &str, e: &str| s.check_range("u", k.as_bytes(), e.as_bytes(), PermType::Read);
        let write =
            |k: &str, e: &str| s.check_range("u", k.as_bytes(), e.as_bytes(), PermType::Write);
        assert!(read("a", "").is_ok());
        assert!(read("a", "e").is_ok(), "joined ranges cover [a, e)");
        assert!(read("a", "f").is_err());
        assert!(read("x", "\0").is_ok());
        assert!(read("zzz", "").is_ok());
        assert!(read("k", "").is_err());
        assert!(write("k", "").is_ok());
        assert!(write("a", "").is_err());
        assert!(write("d", "").is_ok());
        assert!(matches!(
            s.check_range("nobody", b"a", b"", PermType::Read),
            Err(KvError::PermissionDenied)
        ));
        s.enabled = false;
        assert!(s.check_range("nobody", b"a", b"", PermType::Read).is_ok());
    }

    #[test]
    fn enable_needs_root_with_the_root_role_and_root_is_protected() {
        let mut s = AuthState::default();
        let enable = || Some(Change::Enable(Default::default()));
        assert!(matches!(
            apply_change(&mut s, enable()),
            Err(KvError::RootUserNotExist)
        ));
        apply_change(
            &mut s,
            Some(Change::UserAdd(
                crate::proto::etcdserverpb::AuthUserAddRequest {
                    name: ROOT.into(),
                    hashed_password: "h".into(),
                    ..Default::default()
                },
            )),
        )
        .unwrap();
        assert!(matches!(
            apply_change(&mut s, enable()),
            Err(KvError::RootRoleNotExist)
        ));
        apply_change(
            &mut s,
            Some(Change::UserGrantRole(
                crate::proto::etcdserverpb::AuthUserGrantRoleRequest {
                    user: ROOT.into(),
                    role: ROOT.into(),
                },
            )),
        )
        .unwrap();
        apply_change(&mut s, enable()).unwrap();
        assert!(s.enabled);
        assert!(matches!(
            apply_change(
                &mut s,
                Some(Change::UserDelete(
                    crate::proto::etcdserverpb::AuthUserDeleteRequest { name: ROOT.into() }
                ))
            ),
            Err(KvError::InvalidAuthMgmt)
        ));
    }
}
