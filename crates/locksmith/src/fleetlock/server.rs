//! `locksmith fleetlock`: a FleetLock server over the cluster. Each request is one
//! compare-and-swap on the group's semaphore (the same `LockClient` the other
//! commands use), so FleetLock clients, `locksmith` commands and CoreOS locksmith
//! share one semaphore per group.
//!
//! Also served: `GET /-/healthy` (200 once the cluster answers a read) and
//! `GET /metrics` (Prometheus text: requests by endpoint and outcome).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_core::client::Client;
use tokio::net::TcpListener;

use super::{check_request, kind, locksmith_group, Failure, Op, MAX_BODY_BYTES};
use crate::cas::{LockClient, LockError};
use crate::semaphore::{semaphore_key, Refusal};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The groups served, each with the `max` to set on its semaphore at start (`None`:
    /// keep the stored one). `None` serves every valid group.
    pub groups: Option<Vec<(String, Option<u32>)>>,
    /// When set, lock and unlock need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// TLS for the listener.
    pub tls: Option<mesh_core::tls::ServerTls>,
    /// How long a transient cluster failure is retried within one request.
    pub retry_for: Duration,
}

/// A client must send its request head within this long.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request (body and cluster round trips included) must finish within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;

/// Requests counted by (endpoint, outcome); both labels come from fixed sets.
type Counters = Mutex<BTreeMap<(&'static str, String), u64>>;

struct State {
    client: Client,
    settings: Settings,
    counters: Counters,
}

/// Applies the configured maxima, then serves `listener` until `stop` resolves.
pub async fn serve(
    client: Client,
    settings: Settings,
    listener: TcpListener,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    for (group, max) in settings.groups.iter().flatten() {
        if let Some(max) = max {
            let lc = group_lock(&client, group, settings.retry_for);
            let (old, _) = lc
                .set_max(i64::from(*max))
                .await
                .with_context(|| format!("setting max {max} of group {group}"))?;
            if old != i64::from(*max) {
                tracing::info!(group, old, max, "set the group's max");
            }
        }
    }
    let tls = match &settings.tls {
        Some(t) => Some(tokio_rustls::TlsAcceptor::from(t.http1_config()?)),
        None => None,
    };
    let state = Arc::new(State {
        client,
        settings,
        counters: Mutex::default(),
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "serving FleetLock");
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("never closed"),
            () = &mut stop => return Ok(()),
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("accept: {e}");
                    continue;
                }
            },
            () = &mut stop => return Ok(()),
        };
        let state = state.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(s)) => serve_connection(state, TokioIo::new(s), peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => serve_connection(state, TokioIo::new(stream), peer).await,
            }
            drop(slot);
        });
    }
}

async fn serve_connection<I>(state: Arc<State>, io: I, peer: SocketAddr)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, handle(&state, req))
                .await
                .unwrap_or_else(|_| {
                    failure(Failure::new(
                        503,
                        kind::CLUSTER_UNAVAILABLE,
                        "the request timed out",
                    ))
                });
            Ok::<_, Infallible>(answer)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc);
    if let Err(e) = conn.await {
        tracing::debug!(%peer, "connection: {e}");
    }
}

fn respond(status: u16, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid status and header")
}

fn failure(f: Failure) -> Response<Full<Bytes>> {
    respond(f.status, "application/json", f.to_json())
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/-/healthy") => return healthy(state).await,
        (&Method::GET, "/metrics") => {
            return respond(200, "text/plain; version=0.0.4", metrics(state))
        }
        _ => {}
    }
    let Some(op) = Op::from_path(&path) else {
        return failure(Failure::new(
            404,
            kind::NOT_FOUND,
            format!("no endpoint {path}"),
        ));
    };
    let endpoint = match op {
        Op::Lock => "pre-reboot",
        Op::Unlock => "steady-state",
    };
    let result = lock_or_unlock(state, op, req).await;
    let outcome = match &result {
        Ok(()) => "ok".to_string(),
        Err(f) => f.kind.clone(),
    };
    *state
        .counters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry((endpoint, outcome))
        .or_default() += 1;
    match result {
        Ok(()) => respond(200, "application/json", "{}".into()),
        Err(f) => failure(f),
    }
}

async fn lock_or_unlock(state: &State, op: Op, req: Request<Incoming>) -> Result<(), Failure> {
    if req.method() != Method::POST {
        return Err(Failure::new(
            405,
            kind::METHOD_NOT_ALLOWED,
            format!("{} takes POST", op.path()),
        ));
    }
    if let Some(token) = &state.settings.token {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return Err(Failure::new(
                401,
                kind::UNAUTHORIZED,
                "a valid 'Authorization: Bearer' token is required",
            ));
        }
    }
    let header = req
        .headers()
        .get(super::PROTOCOL_HEADER)
        .map(|v| v.as_bytes().to_vec());
    let body = match Limited::new(req.into_body(), MAX_BODY_BYTES + 1)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(Failure::new(
                400,
                kind::INVALID_BODY,
                format!("reading the body: {e}"),
            ))
        }
    };
    let params = check_request(header.as_deref(), &body)?;
    if let Some(groups) = &state.settings.groups {
        if !groups.iter().any(|(g, _)| *g == params.group) {
            return Err(Failure::new(
                400,
                kind::UNKNOWN_GROUP,
                format!("group {:?} is not served here", params.group),
            ));
        }
    }
    let lc = group_lock(&state.client, &params.group, state.settings.retry_for);
    let result = match op {
        Op::Lock => lc.lock(&params.id).await.map(|(outcome, v)| {
            tracing::info!(id = %params.id, group = %params.group, ?outcome, free = v.semaphore.semaphore, "pre-reboot: lock held");
        }),
        Op::Unlock => match lc.unlock(&params.id).await {
            Ok(v) => {
                tracing::info!(id = %params.id, group = %params.group, free = v.semaphore.semaphore, "steady-state: lock released");
                Ok(())
            }
            // UnlockIfHeld: not holding it is the state asked for.
            Err(LockError::Refused {
                refusal: Refusal::NotHolder { .. },
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        },
    };
    result.map_err(|e| match e {
        LockError::Refused {
            refusal: r @ Refusal::NoFreeSlot { .. },
            ..
        } => Failure::new(
            409,
            kind::SEMAPHORE_FULL,
            format!("semaphore currently full: {r}"),
        ),
        LockError::Invalid { .. } => Failure::new(500, kind::INVALID_SEMAPHORE, e.to_string()),
        other => Failure::new(503, kind::CLUSTER_UNAVAILABLE, other.to_string()),
    })
}

async fn healthy(state: &State) -> Response<Full<Bytes>> {
    match state.client.get(semaphore_key(None)).await {
        Ok(_) => respond(200, "text/plain", "ok\n".into()),
        Err(e) => failure(Failure::new(503, kind::CLUSTER_UNAVAILABLE, e.to_string())),
    }
}

fn metrics(state: &State) -> String {
    let mut out = String::from(
        "# HELP locksmith_fleetlock_requests_total FleetLock requests by endpoint and outcome (ok or the error kind).\n\
         # TYPE locksmith_fleetlock_requests_total counter\n",
    );
    let counters = state.counters.lock().unwrap_or_else(|p| p.into_inner());
    for ((endpoint, outcome), n) in counters.iter() {
        out.push_str(&format!(
            "locksmith_fleetlock_requests_total{{endpoint=\"{endpoint}\",outcome=\"{outcome}\"}} {n}\n"
        ));
    }
    out
}

/// The semaphore of a FleetLock group (see [`locksmith_group`]).
fn group_lock(client: &Client, group: &str, retry_for: Duration) -> LockClient {
    LockClient::new(
        client.clone(),
        semaphore_key(locksmith_group(group)),
        retry_for,
    )
}

/// Compares without returning early on the first difference (a token check must not
/// tell how much of a guess was right).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
