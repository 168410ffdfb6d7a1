//! `etcdserverpb.Auth` (users, roles, permissions, auth enable, simple tokens) and the
//! checks every other service makes with it: who the caller is (the `token` metadata)
//! and whether it may touch a key range or manage the cluster, with etcd's errors.
//!
//! Passwords are hashed (Argon2id) here, on the member that receives them, so only
//! the hash travels through Raft and reaches the disk.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::distr::{Alphanumeric, SampleString};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use super::{kv_status, propose_status, unexpected, ApiContext};
use crate::kv::{AuthState, KvError};
use crate::proto::authpb::permission::Type as PermType;
use crate::proto::etcdserverpb::{self as pb, auth_server::Auth};
use crate::proto::meshpb::{auth_change::Change, internal_request::Request as Internal};
use crate::proto::meshpb::{AuthChange, AuthToken, RequestAuth};
use crate::raft::AppliedKind;

/// The gRPC metadata key clients put their token in (etcd's).
pub const TOKEN_METADATA: &str = "token";

/// Who is calling, once the token is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Auth is disabled: everything is allowed.
    Anyone,
    /// An authenticated user.
    User(String),
}

fn status(e: KvError) -> Status {
    kv_status(e)
}

/// The caller of a request, from its `token` metadata, for services without an
/// [`ApiContext`] (see [`ApiContext::caller`]).
pub fn caller(kv: &crate::kv::KvStore, md: &MetadataMap) -> Result<Caller, Status> {
    if !kv.auth().enabled {
        return Ok(Caller::Anyone);
    }
    let token = request_token(md.as_ref()).ok_or_else(|| status(KvError::UserEmpty))?;
    kv.token_user(token)
        .map(Caller::User)
        .ok_or_else(|| status(KvError::InvalidAuthToken))
}

/// The token a request carries: etcd's `token` metadata, or `authorization`.
fn request_token(headers: &tonic::codegen::http::HeaderMap) -> Option<&str> {
    headers
        .get(TOKEN_METADATA)
        .or_else(|| headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
}

impl ApiContext {
    /// The caller of a request, from its `token` metadata. With auth enabled, a request
    /// without a token is refused ("user name is empty"), one with an unknown or
    /// expired token too ("invalid auth token").
    pub fn caller(&self, md: &MetadataMap) -> Result<Caller, Status> {
        caller(&self.kv, md)
    }

    fn with_user(
        &self,
        md: &MetadataMap,
        check: impl FnOnce(&AuthState, &str) -> Result<(), KvError>,
    ) -> Result<Caller, Status> {
        let caller = self.caller(md)?;
        if let Caller::User(u) = &caller {
            check(&self.kv.auth(), u).map_err(status)?;
        }
        Ok(caller)
    }

    /// Only users with the root role may manage auth, membership and maintenance.
    pub fn require_admin(&self, md: &MetadataMap) -> Result<Caller, Status> {
        self.with_user(md, |a, u| a.check_admin(u))
    }

    /// Any authenticated user (or anyone, with auth disabled).
    pub fn require_user(&self, md: &MetadataMap) -> Result<Caller, Status> {
        self.caller(md)
    }

    /// Permission `perm` on [key, range_end) (etcd's range encoding).
    pub fn require_range(
        &self,
        md: &MetadataMap,
        key: &[u8],
        range_end: &[u8],
        perm: PermType,
    ) -> Result<Caller, Status> {
        self.with_user(md, |a, u| a.check_range(u, key, range_end, perm))
    }

    /// Checks a client write with `check` and returns what its proposal carries so
    /// every member checks it again when applying: the user and the auth revision the
    /// check used (`None` with auth disabled).
    pub fn require_write(
        &self,
        md: &MetadataMap,
        check: impl FnOnce(&AuthState, &str) -> Result<(), KvError>,
    ) -> Result<Option<RequestAuth>, Status> {
        let state = self.kv.auth();
        if !state.enabled {
            return Ok(None);
        }
        let Caller::User(user) = self.caller(md)? else {
            return Ok(None);
        };
        check(&state, &user).map_err(status)?;
        Ok(Some(RequestAuth {
            username: user,
            auth_revision: state.revision,
        }))
    }
}

/// Argon2 runs (hashing a new password, checking one at Authenticate) at most this
/// many at once: each takes tens of milliseconds of a core and 19 MiB.
const KDF_CONCURRENCY: usize = 2;
static KDF_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(KDF_CONCURRENCY);
/// How long a request waits for a free Argon2 slot before it is refused.
const KDF_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// Largest Argon2 cost a stored hash may ask for (a hash given to UserAdd is refused
/// above it): 64 MiB, 16 passes, 4 lanes.
const MAX_KDF_MEMORY_KIB: u32 = 64 * 1024;
const MAX_KDF_PASSES: u32 = 16;
const MAX_KDF_LANES: u32 = 4;

/// Runs `f` (an Argon2 computation) on a blocking thread once one of the
/// [`KDF_CONCURRENCY`] slots is free.
async fn with_kdf_slot<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let busy = || Status::resource_exhausted("etcdserver: too many requests");
    let permit = tokio::time::timeout(KDF_QUEUE_WAIT, KDF_SLOTS.acquire())
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())?;
    tokio::task::spawn_blocking(move || {
        let out = f();
        drop(permit);
        out
    })
    .await
    .map_err(|e| Status::internal(format!("password hash: {e}")))
}

/// Whether a PHC string is an Argon2 hash within the cost bounds.
fn bounded_hash(parsed: &PasswordHash<'_>) -> bool {
    argon2::Params::try_from(parsed).is_ok_and(|p| {
        p.m_cost() <= MAX_KDF_MEMORY_KIB
            && p.t_cost() <= MAX_KDF_PASSES
            && p.p_cost() <= MAX_KDF_LANES
    }) && argon2::Algorithm::try_from(parsed.algorithm).is_ok()
}

/// Checks a password hash given to UserAdd: our own format, within the cost bounds.
fn check_given_hash(phc: &str) -> Result<(), Status> {
    match PasswordHash::new(phc) {
        Ok(parsed) if bounded_hash(&parsed) => Ok(()),
        _ => Err(Status::invalid_argument(
            "etcdserver: invalid password hash",
        )),
    }
}

/// Hashes a password as an Argon2id PHC string (salted; slow on purpose).
async fn hash_password(password: String) -> Result<String, Status> {
    with_kdf_slot(move || {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|e| Status::internal(format!("password salt: {e}")))?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Status::internal(format!("password hash: {e}")))
    })
    .await?
}

/// Highest bcrypt cost verified (etcd's default is 10; each step doubles the work).
const MAX_BCRYPT_COST: u32 = 14;

/// The cost of an etcd bcrypt hash (`$2a$10$...`), or None when `hash` is not one.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let rest = ["$2a$", "$2b$", "$2y$"]
        .iter()
        .find_map(|p| hash.strip_prefix(p))?;
    rest.get(..2)?.parse().ok()
}

async fn verify_password(password: String, phc: Vec<u8>) -> Result<bool, Status> {
    with_kdf_slot(move || {
        let Ok(phc) = std::str::from_utf8(&phc) else {
            return false;
        };
        if let Some(cost) = bcrypt_cost(phc) {
            // A user restored from an etcd snapshot.
            return cost <= MAX_BCRYPT_COST && bcrypt::verify(&password, phc).unwrap_or(false);
        }
        let Ok(parsed) = PasswordHash::new(phc) else {
            return false;
        };
        bounded_hash(&parsed)
            && Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
    })
    .await
}

/// Failed Authenticate calls a user may have in one [`FAILURE_WINDOW`]; more are
/// refused without checking the password until the window ends.
const MAX_FAILURES: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(30);

/// Failed authentications per existing user (so the map is bounded by the users).
#[derive(Default)]
struct FailureLimiter {
    failures: std::sync::Mutex<HashMap<String, (u32, Instant)>>,
}

impl FailureLimiter {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `user` while it has [`MAX_FAILURES`] failures in the current window.
    fn check(&self, user: &str) -> Result<(), Status> {
        let mut map = self.lock();
        match map.get(user) {
            Some((_, since)) if since.elapsed() >= FAILURE_WINDOW => {
                map.remove(user);
                Ok(())
            }
            Some((n, _)) if *n >= MAX_FAILURES => Err(Status::resource_exhausted(
                "etcdserver: too many failed authentication attempts for this user; retry later",
            )),
            _ => Ok(()),
        }
    }

    fn failed(&self, user: &str) {
        let mut map = self.lock();
        let e = map.entry(user.to_string()).or_insert((0, Instant::now()));
        e.0 += 1;
    }

    fn succeeded(&self, user: &str) {
        self.lock().remove(user);
    }
}

pub struct AuthApi {
    ctx: ApiContext,
    failures: FailureLimiter,
}

impl AuthApi {
    pub fn new(ctx: ApiContext) -> AuthApi {
        AuthApi {
            ctx,
            failures: FailureLimiter::default(),
        }
    }

    fn header(&self) -> Option<pb::ResponseHeader> {
        self.ctx.header(self.ctx.kv.current_revision())
    }

    async fn change(&self, change: Change) -> Result<Option<pb::ResponseHeader>, Status> {
        let applied = self
            .ctx
            .node
            .propose(Internal::Auth(AuthChange {
                change: Some(change),
            }))
            .await
            .map_err(propose_status)?;
        match applied.kind {
            AppliedKind::Auth => Ok(self.ctx.header(applied.revision)),
            other => Err(unexpected(other)),
        }
    }

    /// A linearizable view of the auth store for the read-only calls.
    async fn state(&self) -> Result<std::sync::Arc<AuthState>, Status> {
        self.ctx.linearize().await?;
        Ok(self.ctx.kv.auth())
    }
}

#[tonic::async_trait]
impl Auth for AuthApi {
    async fn auth_enable(
        &self,
        _req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let header = self.change(Change::Enable(Default::default())).await?;
        Ok(Response::new(pb::AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self.change(Change::Disable(Default::default())).await?;
        Ok(Response::new(pb::AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        _req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        let state = self.state().await?;
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.header(),
            enabled: state.enabled,
            auth_revision: state.revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let r = req.into_inner();
        let state = self.state().await?;
        if !state.enabled {
            return Err(status(KvError::AuthNotEnabled));
        }
        let user = state.users.get(&r.name).cloned();
        let no_password = user
            .as_ref()
            .is_none_or(|u| u.options.is_some_and(|o| o.no_password) || u.password.is_empty());
        if no_password {
            return Err(status(KvError::AuthFailed));
        }
        self.failures.check(&r.name)?;
        if !verify_password(r.password, user.expect("checked").password).await? {
            self.failures.failed(&r.name);
            return Err(status(KvError::AuthFailed));
        }
        self.failures.succeeded(&r.name);
        // etcd's simple token: 16 random letters, a dot, a sequence number.
        let token = format!(
            "{}.{}",
            Alphanumeric.sample_string(&mut rand::rng(), 16),
            self.ctx.kv.applied_index() + 1
        );
        self.change(Change::Token(AuthToken {
            user: r.name,
            token: token.clone(),
        }))
        .await?;
        Ok(Response::new(pb::AuthenticateResponse {
            header: self.header(),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let mut r = req.into_inner();
        if r.name.is_empty() {
            return Err(status(KvError::UserEmpty));
        }
        let no_password = r.options.is_some_and(|o| o.no_password);
        r.hashed_password = if no_password {
            String::new()
        } else if !r.hashed_password.is_empty() {
            // Only our own hash format, within the cost bounds, is accepted from clients.
            check_given_hash(&r.hashed_password)?;
            r.hashed_password
        } else {
            hash_password(std::mem::take(&mut r.password)).await?
        };
        r.password.clear();
        let header = self.change(Change::UserAdd(r)).await?;
        Ok(Response::new(pb::AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let caller = self.ctx.require_user(req.metadata())?;
        let r = req.into_inner();
        let state = self.state().await?;
        // A user may read its own record.
        if caller != Caller::User(r.name.clone()) {
            if let Caller::User(u) = &caller {
                state.check_admin(u).map_err(status)?;
            }
        }
        let user = state
            .users
            .get(&r.name)
            .ok_or_else(|| status(KvError::UserNotFound))?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.header(),
            roles: user.roles.clone(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let state = self.state().await?;
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.header(),
            users: state.users.keys().cloned().collect(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self.change(Change::UserDelete(req.into_inner())).await?;
        Ok(Response::new(pb::AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let mut r = req.into_inner();
        if r.name.is_empty() {
            return Err(status(KvError::UserEmpty));
        }
        if !self.ctx.kv.auth().users.contains_key(&r.name) {
            return Err(status(KvError::UserNotFound));
        }
        r.hashed_password = hash_password(std::mem::take(&mut r.password)).await?;
        let header = self.change(Change::UserChangePassword(r)).await?;
        Ok(Response::new(pb::AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self.change(Change::UserGrantRole(req.into_inner())).await?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self
            .change(Change::UserRevokeRole(req.into_inner()))
            .await?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self.change(Change::RoleAdd(req.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let caller = self.ctx.require_user(req.metadata())?;
        let r = req.into_inner();
        let state = self.state().await?;
        // A user may read the roles it holds.
        if let Caller::User(u) = &caller {
            let holds = state
                .users
                .get(u)
                .is_some_and(|x| x.roles.contains(&r.role));
            if !holds {
                state.check_admin(u).map_err(status)?;
            }
        }
        let role = state
            .roles
            .get(&r.role)
            .ok_or_else(|| status(KvError::RoleNotFound))?;
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.header(),
            perm: role.key_permission.clone(),
        }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let state = self.state().await?;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.header(),
            roles: state.roles.keys().cloned().collect(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self.change(Change::RoleDelete(req.into_inner())).await?;
        Ok(Response::new(pb::AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self
            .change(Change::RoleGrantPermission(req.into_inner()))
            .await?;
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse {
            header,
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let header = self
            .change(Change::RoleRevokePermission(req.into_inner()))
            .await?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse {
            header,
        }))
    }
}

/// A tower layer on the client API: a request whose token this member does not know
/// waits for ReadIndex before its auth check.
///
/// A member learns a simple token when it applies the Authenticate entry that carries
/// it, as in etcd. Without this, a client that authenticated through one member and
/// then called another could be refused ("invalid auth token") until that member caught
/// up. After ReadIndex, every token committed before the request was sent is known
/// here, so an answer of "invalid auth token" means the token is unknown or expired.
/// Requests without a token, or with one this member knows, pass straight through.
#[derive(Clone)]
pub struct TokenCatchUp {
    pub kv: std::sync::Arc<crate::kv::KvStore>,
    pub node: crate::raft::NodeHandle,
}

impl<S> tower_layer::Layer<S> for TokenCatchUp {
    type Service = TokenCatchUpService<S>;
    fn layer(&self, inner: S) -> TokenCatchUpService<S> {
        TokenCatchUpService {
            inner,
            catch_up: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TokenCatchUpService<S> {
    inner: S,
    catch_up: TokenCatchUp,
}

impl TokenCatchUp {
    /// Whether the request carries a token this member does not know (with auth on).
    fn unknown_token(&self, headers: &tonic::codegen::http::HeaderMap) -> bool {
        request_token(headers)
            .is_some_and(|token| self.kv.token_user(token).is_none() && self.kv.auth().enabled)
    }
}

type CatchUpFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for TokenCatchUpService<S>
where
    S: tonic::codegen::Service<tonic::codegen::http::Request<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, CatchUpFuture<Result<S::Response, S::Error>>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if !self.catch_up.unknown_token(req.headers()) {
            return futures::future::Either::Left(self.inner.call(req));
        }
        // The service made ready by poll_ready goes with the request (tower's rule);
        // a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let node = self.catch_up.node.clone();
        futures::future::Either::Right(Box::pin(async move {
            // If there is no leader to ask, the check below refuses the token as before.
            let _ = node.read_index().await;
            inner.call(req).await
        }))
    }
}
