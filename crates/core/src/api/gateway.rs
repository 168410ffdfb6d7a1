//! etcd's JSON gateway on the client port: `POST /v3/<service>/<method>` with a JSON
//! body, answered in JSON, for clients that speak HTTP/1.1 (etcd3gw, Patroni, curl).
//!
//! A call is translated, not reimplemented: the JSON body becomes the protobuf request,
//! which goes through the same gRPC service stack a gRPC client reaches (metrics,
//! auth token catch-up, the corruption gate, then the service itself), and the answer
//! comes back as JSON. The mapping is the proto3 JSON mapping etcd's gateway uses:
//! field names as in the .proto files, 64-bit integers as strings, bytes as base64,
//! enums by name, default values left out.
//!
//! Streaming calls (Watch, LeaseKeepAlive, Snapshot, Observe) read a sequence of JSON
//! requests from the body and write one line `{"result": ...}` per response. An error
//! ends a stream with a line `{"error": {"grpc_code", "http_code", "message",
//! "http_status"}}`; a unary error is the body `{"error", "code", "message"}` with the
//! HTTP status etcd's gateway gives that gRPC code.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tonic::body::Body;
use tonic::codegen::http::{self, header, HeaderValue, StatusCode};
use tonic::codegen::Service;
use tonic::{Code, Status};

use crate::proto::etcdserverpb as pb;
use crate::proto::{v3electionpb as election, v3lockpb as lock};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An answer of the gRPC stack: errors are already gRPC statuses in the response, so
/// the error type is `Infallible`, as the client port's service needs.
pub type GrpcFuture = BoxFuture<Result<http::Response<Body>, Infallible>>;

/// The gRPC service stack, callable in-process with a gRPC request.
#[derive(Clone)]
pub struct Grpc(Arc<dyn Fn(http::Request<Body>) -> GrpcFuture + Send + Sync>);

impl Grpc {
    pub fn new<S, B>(svc: S) -> Grpc
    where
        S: Service<http::Request<Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: std::fmt::Display + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tonic::codegen::StdError>,
    {
        Grpc(Arc::new(move |req| {
            let mut svc = svc.clone();
            Box::pin(async move {
                let fail = |e: S::Error| Ok(Status::internal(e.to_string()).into_http());
                if let Err(e) = poll_fn(|cx| svc.poll_ready(cx)).await {
                    return fail(e);
                }
                match svc.call(req).await {
                    Ok(resp) => Ok(resp.map(Body::new)),
                    Err(e) => fail(e),
                }
            })
        }))
    }

    pub fn call(&self, req: http::Request<Body>) -> GrpcFuture {
        (self.0)(req)
    }
}

/// How a gateway path is served.
#[derive(Clone, Copy)]
enum Shape {
    Unary,
    /// The client streams requests; the answer is a stream.
    Bidi {
        /// Keep the request stream open after the body ends, so a watch goes on
        /// reporting events (as etcd's watch does after the client half-closes).
        hold_open: bool,
    },
    /// One request, a stream of answers.
    ServerStream,
}

type Handler = fn(&Gateway, Call) -> BoxFuture<http::Response<Body>>;

/// One request as the gateway received it, and the route it resolved to.
pub struct Call {
    parts: http::request::Parts,
    body: Body,
    grpc_path: &'static str,
    shape: Shape,
}

/// The gateway's routes: HTTP path, gRPC path, how it streams, its typed handler.
fn route(path: &str) -> Option<(&'static str, Shape, Handler)> {
    macro_rules! h {
        ($req:ty, $resp:ty) => {
            (|gw: &Gateway, call: Call| -> BoxFuture<http::Response<Body>> {
                let gw = gw.clone();
                Box::pin(async move { gw.serve::<$req, $resp>(call).await })
            }) as Handler
        };
    }
    use Shape::*;
    let r = match path {
        "/v3/kv/range" => (
            "/etcdserverpb.KV/Range",
            Unary,
            h!(pb::RangeRequest, pb::RangeResponse),
        ),
        "/v3/kv/put" => (
            "/etcdserverpb.KV/Put",
            Unary,
            h!(pb::PutRequest, pb::PutResponse),
        ),
        "/v3/kv/deleterange" => (
            "/etcdserverpb.KV/DeleteRange",
            Unary,
            h!(pb::DeleteRangeRequest, pb::DeleteRangeResponse),
        ),
        "/v3/kv/txn" => (
            "/etcdserverpb.KV/Txn",
            Unary,
            h!(pb::TxnRequest, pb::TxnResponse),
        ),
        "/v3/kv/compaction" => (
            "/etcdserverpb.KV/Compact",
            Unary,
            h!(pb::CompactionRequest, pb::CompactionResponse),
        ),
        "/v3/watch" => (
            "/etcdserverpb.Watch/Watch",
            Bidi { hold_open: true },
            h!(pb::WatchRequest, pb::WatchResponse),
        ),
        "/v3/lease/grant" => (
            "/etcdserverpb.Lease/LeaseGrant",
            Unary,
            h!(pb::LeaseGrantRequest, pb::LeaseGrantResponse),
        ),
        "/v3/lease/revoke" | "/v3/kv/lease/revoke" => (
            "/etcdserverpb.Lease/LeaseRevoke",
            Unary,
            h!(pb::LeaseRevokeRequest, pb::LeaseRevokeResponse),
        ),
        "/v3/lease/keepalive" => (
            "/etcdserverpb.Lease/LeaseKeepAlive",
            Bidi { hold_open: false },
            h!(pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse),
        ),
        "/v3/lease/timetolive" | "/v3/kv/lease/timetolive" => (
            "/etcdserverpb.Lease/LeaseTimeToLive",
            Unary,
            h!(pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse),
        ),
        "/v3/lease/leases" | "/v3/kv/lease/leases" => (
            "/etcdserverpb.Lease/LeaseLeases",
            Unary,
            h!(pb::LeaseLeasesRequest, pb::LeaseLeasesResponse),
        ),
        "/v3/cluster/member/add" => (
            "/etcdserverpb.Cluster/MemberAdd",
            Unary,
            h!(pb::MemberAddRequest, pb::MemberAddResponse),
        ),
        "/v3/cluster/member/remove" => (
            "/etcdserverpb.Cluster/MemberRemove",
            Unary,
            h!(pb::MemberRemoveRequest, pb::MemberRemoveResponse),
        ),
        "/v3/cluster/member/update" => (
            "/etcdserverpb.Cluster/MemberUpdate",
            Unary,
            h!(pb::MemberUpdateRequest, pb::MemberUpdateResponse),
        ),
        "/v3/cluster/member/list" => (
            "/etcdserverpb.Cluster/MemberList",
            Unary,
            h!(pb::MemberListRequest, pb::MemberListResponse),
        ),
        "/v3/cluster/member/promote" => (
            "/etcdserverpb.Cluster/MemberPromote",
            Unary,
            h!(pb::MemberPromoteRequest, pb::MemberPromoteResponse),
        ),
        "/v3/maintenance/alarm" => (
            "/etcdserverpb.Maintenance/Alarm",
            Unary,
            h!(pb::AlarmRequest, pb::AlarmResponse),
        ),
        "/v3/maintenance/status" => (
            "/etcdserverpb.Maintenance/Status",
            Unary,
            h!(pb::StatusRequest, pb::StatusResponse),
        ),
        "/v3/maintenance/defragment" => (
            "/etcdserverpb.Maintenance/Defragment",
            Unary,
            h!(pb::DefragmentRequest, pb::DefragmentResponse),
        ),
        "/v3/maintenance/hash" => (
            "/etcdserverpb.Maintenance/Hash",
            Unary,
            h!(pb::HashRequest, pb::HashResponse),
        ),
        "/v3/maintenance/hashkv" => (
            "/etcdserverpb.Maintenance/HashKV",
            Unary,
            h!(pb::HashKvRequest, pb::HashKvResponse),
        ),
        "/v3/maintenance/snapshot" => (
            "/etcdserverpb.Maintenance/Snapshot",
            ServerStream,
            h!(pb::SnapshotRequest, pb::SnapshotResponse),
        ),
        "/v3/maintenance/transfer-leadership" => (
            "/etcdserverpb.Maintenance/MoveLeader",
            Unary,
            h!(pb::MoveLeaderRequest, pb::MoveLeaderResponse),
        ),
        "/v3/auth/enable" => (
            "/etcdserverpb.Auth/AuthEnable",
            Unary,
            h!(pb::AuthEnableRequest, pb::AuthEnableResponse),
        ),
        "/v3/auth/disable" => (
            "/etcdserverpb.Auth/AuthDisable",
            Unary,
            h!(pb::AuthDisableRequest, pb::AuthDisableResponse),
        ),
        "/v3/auth/status" => (
            "/etcdserverpb.Auth/AuthStatus",
            Unary,
            h!(pb::AuthStatusRequest, pb::AuthStatusResponse),
        ),
        "/v3/auth/authenticate" => (
            "/etcdserverpb.Auth/Authenticate",
            Unary,
            h!(pb::AuthenticateRequest, pb::AuthenticateResponse),
        ),
        "/v3/auth/user/add" => (
            "/etcdserverpb.Auth/UserAdd",
            Unary,
            h!(pb::AuthUserAddRequest, pb::AuthUserAddResponse),
        ),
        "/v3/auth/user/get" => (
            "/etcdserverpb.Auth/UserGet",
            Unary,
            h!(pb::AuthUserGetRequest, pb::AuthUserGetResponse),
        ),
        "/v3/auth/user/list" => (
            "/etcdserverpb.Auth/UserList",
            Unary,
            h!(pb::AuthUserListRequest, pb::AuthUserListResponse),
        ),
        "/v3/auth/user/delete" => (
            "/etcdserverpb.Auth/UserDelete",
            Unary,
            h!(pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse),
        ),
        "/v3/auth/user/changepw" => (
            "/etcdserverpb.Auth/UserChangePassword",
            Unary,
            h!(
                pb::AuthUserChangePasswordRequest,
                pb::AuthUserChangePasswordResponse
            ),
        ),
        "/v3/auth/user/grant" => (
            "/etcdserverpb.Auth/UserGrantRole",
            Unary,
            h!(pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse),
        ),
        "/v3/auth/user/revoke" => (
            "/etcdserverpb.Auth/UserRevokeRole",
            Unary,
            h!(
                pb::AuthUserRevokeRoleRequest,
                pb::AuthUserRevokeRoleResponse
            ),
        ),
        "/v3/auth/role/add" => (
            "/etcdserverpb.Auth/RoleAdd",
            Unary,
            h!(pb::AuthRoleAddRequest, pb::AuthRoleAddResponse),
        ),
        "/v3/auth/role/get" => (
            "/etcdserverpb.Auth/RoleGet",
            Unary,
            h!(pb::AuthRoleGetRequest, pb::AuthRoleGetResponse),
        ),
        "/v3/auth/role/list" => (
            "/etcdserverpb.Auth/RoleList",
            Unary,
            h!(pb::AuthRoleListRequest, pb::AuthRoleListResponse),
        ),
        "/v3/auth/role/delete" => (
            "/etcdserverpb.Auth/RoleDelete",
            Unary,
            h!(pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse),
        ),
        "/v3/auth/role/grant" => (
            "/etcdserverpb.Auth/RoleGrantPermission",
            Unary,
            h!(
                pb::AuthRoleGrantPermissionRequest,
                pb::AuthRoleGrantPermissionResponse
            ),
        ),
        "/v3/auth/role/revoke" => (
            "/etcdserverpb.Auth/RoleRevokePermission",
            Unary,
            h!(
                pb::AuthRoleRevokePermissionRequest,
                pb::AuthRoleRevokePermissionResponse
            ),
        ),
        "/v3/lock/lock" => (
            "/v3lockpb.Lock/Lock",
            Unary,
            h!(lock::LockRequest, lock::LockResponse),
        ),
        "/v3/lock/unlock" => (
            "/v3lockpb.Lock/Unlock",
            Unary,
            h!(lock::UnlockRequest, lock::UnlockResponse),
        ),
        "/v3/election/campaign" => (
            "/v3electionpb.Election/Campaign",
            Unary,
            h!(election::CampaignRequest, election::CampaignResponse),
        ),
        "/v3/election/proclaim" => (
            "/v3electionpb.Election/Proclaim",
            Unary,
            h!(election::ProclaimRequest, election::ProclaimResponse),
        ),
        "/v3/election/leader" => (
            "/v3electionpb.Election/Leader",
            Unary,
            h!(election::LeaderRequest, election::LeaderResponse),
        ),
        "/v3/election/observe" => (
            "/v3electionpb.Election/Observe",
            ServerStream,
            h!(election::LeaderRequest, election::LeaderResponse),
        ),
        "/v3/election/resign" => (
            "/v3electionpb.Election/Resign",
            Unary,
            h!(election::ResignRequest, election::ResignResponse),
        ),
        _ => return None,
    };
    Some(r)
}

/// The JSON gateway.
#[derive(Clone)]
pub struct Gateway {
    grpc: Grpc,
    /// Largest JSON body (or JSON message of a stream) read.
    max_json_bytes: usize,
}

impl Gateway {
    /// `max_request_bytes`: the client API's request limit. A JSON body may be larger
    /// than the protobuf it carries (base64, field names), so the gateway reads up to
    /// twice that plus headroom; the gRPC service then applies the limit itself.
    pub fn new(grpc: Grpc, max_request_bytes: usize) -> Gateway {
        Gateway {
            grpc,
            max_json_bytes: max_request_bytes
                .saturating_mul(2)
                .saturating_add(super::GRPC_OVERHEAD_BYTES),
        }
    }

    /// Whether `path` belongs to the gateway.
    pub fn owns(path: &str) -> bool {
        path.starts_with("/v3/")
    }

    /// Serves one gateway request.
    pub async fn handle(&self, req: http::Request<Body>) -> http::Response<Body> {
        let Some((grpc_path, shape, handler)) = route(req.uri().path()) else {
            return error_response(
                &Status::new(Code::NotFound, "Not Found"),
                StatusCode::NOT_FOUND,
            );
        };
        if req.method() != http::Method::POST {
            return error_response(
                &Status::new(Code::Unimplemented, "Method Not Allowed"),
                StatusCode::METHOD_NOT_ALLOWED,
            );
        }
        let (parts, body) = req.into_parts();
        let call = Call {
            parts,
            body,
            grpc_path,
            shape,
        };
        handler(self, call).await
    }

    async fn serve<Req, Resp>(self, call: Call) -> http::Response<Body>
    where
        Req: prost::Message + DeserializeOwned + Default + Send + 'static,
        Resp: prost::Message + Serialize + Default + Send + 'static,
    {
        if let Some(len) = content_length(&call.parts.headers) {
            if len > self.max_json_bytes as u64 {
                return too_large();
            }
        }
        match call.shape {
            Shape::Unary | Shape::ServerStream => {
                let msg = match read_one::<Req>(call.body, self.max_json_bytes).await {
                    Ok(m) => m,
                    Err(resp) => return resp,
                };
                let frames = futures::stream::iter([frame(&msg)]);
                let answer = self.grpc_call(call.grpc_path, call.parts, frames).await;
                match (call.shape, answer) {
                    (_, Err(status)) => status_response(&status),
                    (Shape::Unary, Ok(mut reader)) => match reader.next_message::<Resp>().await {
                        Ok(Some(resp)) => json_response(StatusCode::OK, &resp),
                        Ok(None) => status_response(&Status::internal("no response message")),
                        Err(status) => status_response(&status),
                    },
                    (_, Ok(reader)) => stream_response::<Resp>(reader, None),
                }
            }
            Shape::Bidi { hold_open } => {
                let (tx, rx) = mpsc::channel::<Bytes>(16);
                let (bad_tx, bad_rx) = oneshot::channel();
                // Dropped with the answer (the client went away or the call ended):
                // the request stream ends then, and the call with it.
                let (answer_open, answer_gone) = oneshot::channel::<()>();
                tokio::spawn(read_stream::<Req>(
                    call.body,
                    self.max_json_bytes,
                    tx,
                    bad_tx,
                    hold_open.then_some(answer_gone),
                ));
                let frames = tokio_stream::wrappers::ReceiverStream::new(rx);
                match self.grpc_call(call.grpc_path, call.parts, frames).await {
                    Err(status) => status_response(&status),
                    Ok(reader) => stream_response::<Resp>(reader, Some((bad_rx, answer_open))),
                }
            }
        }
    }

    /// Sends `frames` (gRPC length-prefixed messages) to `grpc_path` with the caller's
    /// credentials and connection facts; the answer's messages, or its error.
    async fn grpc_call<S>(
        &self,
        grpc_path: &'static str,
        parts: http::request::Parts,
        frames: S,
    ) -> Result<FrameReader, Status>
    where
        S: Stream<Item = Bytes> + Send + 'static,
    {
        let body = http_body_util::StreamBody::new(
            frames.map(|b| Ok::<_, Infallible>(http_body::Frame::data(b))),
        );
        let mut req = http::Request::new(Body::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(grpc_path);
        *req.version_mut() = http::Version::HTTP_2;
        *req.extensions_mut() = parts.extensions;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        // etcd takes the auth token from the Authorization header on the gateway.
        for name in [
            header::AUTHORIZATION,
            http::HeaderName::from_static("token"),
        ] {
            if let Some(v) = parts.headers.get(&name) {
                headers.insert(name, v.clone());
            }
        }
        let Ok(resp) = self.grpc.call(req).await;
        if let Some(status) = Status::from_header_map(resp.headers()) {
            if status.code() != Code::Ok {
                return Err(status);
            }
        }
        Ok(FrameReader {
            body: resp.into_body(),
            buf: BytesMut::new(),
            done: false,
        })
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A protobuf message as one gRPC frame: no compression, 32-bit big-endian length.
fn frame<M: prost::Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.extend_from_slice(&[0]);
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    msg.encode(&mut buf).expect("buffer sized to fit");
    buf.freeze()
}

/// Reads a whole body of at most `limit` bytes and parses it as one JSON message (an
/// empty body is the message with every field at its default).
async fn read_one<M: DeserializeOwned + Default>(
    body: Body,
    limit: usize,
) -> Result<M, http::Response<Body>> {
    let bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(e) => {
            return Err(status_response(&Status::invalid_argument(format!(
                "reading the request body: {e}"
            ))))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(M::default());
    }
    serde_json::from_slice(&bytes).map_err(|e| status_response(&bad_json(&e)))
}

fn bad_json(e: &serde_json::Error) -> Status {
    Status::invalid_argument(format!("invalid JSON request: {e}"))
}

/// Reads a stream of JSON messages from `body` and sends each as a gRPC frame. A bad
/// message or an oversized one is reported on `bad` and ends the stream. With
/// `hold_open`, the request stream stays open after the body ends, until the answer is
/// gone.
async fn read_stream<M: prost::Message + DeserializeOwned>(
    mut body: Body,
    limit: usize,
    tx: mpsc::Sender<Bytes>,
    bad: oneshot::Sender<Status>,
    hold_open: Option<oneshot::Receiver<()>>,
) {
    let mut buf = BytesMut::new();
    let mut scan = ValueScanner::default();
    let fail = |status: Status| {
        let _ = bad.send(status);
    };
    loop {
        // Every complete message in the buffer goes out first; each byte is scanned
        // once, and only a whole value is parsed.
        while let Some(end) = scan.complete(&buf) {
            let value = buf.split_to(end);
            scan = ValueScanner::default();
            match serde_json::from_slice::<M>(&value) {
                Ok(msg) => {
                    if tx.send(frame(&msg)).await.is_err() {
                        return;
                    }
                }
                Err(e) => return fail(bad_json(&e)),
            }
        }
        if let Some(e) = scan.error.take() {
            return fail(Status::invalid_argument(format!(
                "invalid JSON request: {e}"
            )));
        }
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    if buf.len() + data.len() > limit {
                        return fail(Status::invalid_argument(super::ERR_REQUEST_TOO_LARGE));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                return fail(Status::invalid_argument(format!(
                    "reading the request body: {e}"
                )))
            }
            None => break,
        }
    }
    if !buf.iter().all(u8::is_ascii_whitespace) {
        return fail(Status::invalid_argument(
            "invalid JSON request: the body ends inside a message",
        ));
    }
    if let Some(answer_gone) = hold_open {
        let _ = answer_gone.await;
    }
}

/// Finds where the first JSON object of a buffer ends, scanning each byte once across
/// calls as the buffer grows: depth of braces and brackets, strings and escapes.
#[derive(Default)]
struct ValueScanner {
    /// Bytes of the buffer already scanned.
    pos: usize,
    depth: usize,
    started: bool,
    in_string: bool,
    escaped: bool,
    /// Something other than an object where a message should start.
    error: Option<String>,
}

/// Deepest nesting scanned (serde_json refuses deeper values anyway).
const MAX_JSON_DEPTH: usize = 128;

impl ValueScanner {
    /// The length of the first complete object in `buf` (leading whitespace included),
    /// or `None` while it is incomplete or on an error (then `error` says why).
    fn complete(&mut self, buf: &[u8]) -> Option<usize> {
        while self.pos < buf.len() {
            let b = buf[self.pos];
            self.pos += 1;
            if !self.started {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => continue,
                    b'{' => {
                        self.started = true;
                        self.depth = 1;
                        continue;
                    }
                    other => {
                        self.error = Some(format!(
                            "expected a JSON object, found {:?}",
                            char::from(other)
                        ));
                        return None;
                    }
                }
            }
            if self.in_string {
                match (self.escaped, b) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => {
                    self.depth += 1;
                    if self.depth > MAX_JSON_DEPTH {
                        self.error = Some("nested too deeply".into());
                        return None;
                    }
                }
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(self.pos);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Reads gRPC frames from a response body.
struct FrameReader {
    body: Body,
    buf: BytesMut,
    done: bool,
}

/// Largest single message taken from the gRPC side: the server's own response cap.
const MAX_FRAME: usize = super::MAX_RESPONSE_BYTES;

impl FrameReader {
    /// The next message, `None` at the end of a successful call, or the call's error.
    async fn next_message<M: prost::Message + Default>(&mut self) -> Result<Option<M>, Status> {
        loop {
            if self.buf.len() >= 5 {
                if self.buf[0] != 0 {
                    return Err(Status::internal("compressed gRPC message on the gateway"));
                }
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(Status::internal("gRPC message over the response limit"));
                }
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let payload = self.buf.split_to(len).freeze();
                    return M::decode(payload)
                        .map(Some)
                        .map_err(|e| Status::internal(format!("decoding the answer: {e}")));
                }
            }
            if self.done {
                if !self.buf.is_empty() {
                    return Err(Status::internal("the answer ends inside a message"));
                }
                return Ok(None);
            }
            match self.body.frame().await {
                None => self.done = true,
                Some(Err(status)) => return Err(status),
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.buf.extend_from_slice(&data),
                    Err(f) => {
                        if let Some(status) = f.trailers_ref().and_then(Status::from_header_map) {
                            if status.code() != Code::Ok {
                                return Err(status);
                            }
                        }
                        self.done = true;
                    }
                },
            }
        }
    }
}

/// A streamed answer: one `{"result": ...}` line per message, and an error line if the
/// call (or the request stream, reported on `bad`) fails.
fn stream_response<Resp>(
    reader: FrameReader,
    request_side: Option<(oneshot::Receiver<Status>, oneshot::Sender<()>)>,
) -> http::Response<Body>
where
    Resp: prost::Message + Serialize + Default + Send + 'static,
{
    struct State {
        reader: FrameReader,
        bad: Option<oneshot::Receiver<Status>>,
        /// Held while the answer is alive (see [`read_stream`]).
        _open: Option<oneshot::Sender<()>>,
        over: bool,
    }
    let (bad, open) = request_side.map_or((None, None), |(b, o)| (Some(b), Some(o)));
    let lines = futures::stream::unfold(
        State {
            reader,
            bad,
            _open: open,
            over: false,
        },
        |mut st| async move {
            if st.over {
                return None;
            }
            let next = match st.bad.as_mut() {
                Some(bad) => tokio::select! {
                    r = st.reader.next_message::<Resp>() => r,
                    status = bad => match status {
                        Ok(status) => Err(status),
                        // The request side ended cleanly; only the answer matters now.
                        Err(_) => {
                            st.bad = None;
                            st.reader.next_message::<Resp>().await
                        }
                    },
                },
                None => st.reader.next_message::<Resp>().await,
            };
            let line = match next {
                Ok(Some(msg)) => json_line(&ResultLine { result: &msg }),
                Ok(None) => return None,
                Err(status) => {
                    st.over = true;
                    let http = http_status(status.code());
                    json_line(&serde_json::json!({ "error": {
                        "grpc_code": status.code() as i32,
                        "http_code": http.as_u16(),
                        "message": status.message(),
                        "http_status": http.canonical_reason().unwrap_or(""),
                    }}))
                }
            };
            Some((Ok::<_, Infallible>(http_body::Frame::data(line)), st))
        },
    );
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(lines)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// One message of a streamed answer, serialized as is (no intermediate JSON value).
#[derive(Serialize)]
struct ResultLine<'a, T> {
    result: &'a T,
}

fn json_line<T: Serialize>(v: &T) -> Bytes {
    let mut out = serde_json::to_vec(v).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

fn json_response<T: Serialize>(status: StatusCode, v: &T) -> http::Response<Body> {
    match serde_json::to_vec(v) {
        Ok(body) => {
            let mut resp =
                http::Response::new(Body::new(http_body_util::Full::new(Bytes::from(body))));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => status_response(&Status::internal(format!("encoding the answer: {e}"))),
    }
}

/// A unary error as etcd's gateway writes it.
pub fn status_response(status: &Status) -> http::Response<Body> {
    error_response(status, http_status(status.code()))
}

fn error_response(status: &Status, http: StatusCode) -> http::Response<Body> {
    let body = serde_json::json!({
        "error": status.message(),
        "code": status.code() as i32,
        "message": status.message(),
    });
    let mut resp = json_response(http, &body);
    *resp.status_mut() = http;
    resp
}

fn too_large() -> http::Response<Body> {
    let mut resp = status_response(&Status::invalid_argument(super::ERR_REQUEST_TOO_LARGE));
    // The rest of the body is not read; the connection cannot carry another request.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The HTTP status etcd's gateway (grpc-gateway v1, in etcd 3.4 and 3.5) answers a
/// gRPC code with.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::REQUEST_TIMEOUT,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_names_a_served_grpc_method() {
        for path in [
            "/v3/kv/range",
            "/v3/watch",
            "/v3/lease/keepalive",
            "/v3/kv/lease/leases",
            "/v3/maintenance/snapshot",
            "/v3/auth/role/revoke",
            "/v3/lock/unlock",
            "/v3/election/observe",
        ] {
            let (grpc, _, _) = route(path).expect(path);
            assert!(
                grpc.starts_with('/') && grpc.matches('/').count() == 2,
                "{grpc}"
            );
        }
        assert!(route("/v3/kv/nothing").is_none());
    }

    #[test]
    fn messages_use_etcds_json_mapping() {
        let resp = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: u64::MAX,
                revision: 7,
                ..Default::default()
            }),
            kvs: vec![crate::proto::mvccpb::KeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 7,
                value: b"bar".to_vec(),
                ..Default::default()
            }],
            count: 1,
            more: false,
        };
        let v = serde_json::to_value(&resp).unwrap();
        assert_eq!(v["header"]["cluster_id"], "18446744073709551615");
        assert_eq!(v["kvs"][0]["key"], "Zm9v");
        assert_eq!(v["kvs"][0]["mod_revision"], "7");
        assert_eq!(v["count"], "1");
        assert!(v.get("more").is_none(), "defaults are left out: {v}");

        let req: pb::TxnRequest = serde_json::from_str(
            r#"{"compare":[{"key":"Zm9v","target":"VALUE","result":"EQUAL","value":"YmFy"}],
                "success":[{"request_put":{"key":"Zm9v","value":"YmF6","lease":"5"}}]}"#,
        )
        .unwrap();
        assert_eq!(req.compare[0].key, b"foo");
        let Some(pb::request_op::Request::RequestPut(put)) = &req.success[0].request else {
            panic!("{req:?}")
        };
        assert_eq!(put.lease, 5);
        // Numbers are accepted as JSON numbers too.
        let grant: pb::LeaseGrantRequest = serde_json::from_str(r#"{"TTL": 30}"#).unwrap();
        assert_eq!(grant.ttl, 30);
    }

    #[test]
    fn the_scanner_finds_whole_objects_across_chunks() {
        let text = br#" {"a":"}\"{","b":[1,{"c":2}]}{"x":1}"#;
        let first = text.iter().position(|&b| b == b'{').unwrap();
        let end = text.len() - br#"{"x":1}"#.len();
        let mut scan = ValueScanner::default();
        // Fed a byte at a time, it reports the end only once the object is complete.
        for n in 0..end {
            assert_eq!(scan.complete(&text[..n]), None, "{n}");
        }
        assert_eq!(scan.complete(&text[..end]), Some(end));
        assert!(end > first);
        let mut scan = ValueScanner::default();
        assert_eq!(scan.complete(b"[1]"), None);
        assert!(scan.error.is_some(), "a message is an object");
        let mut scan = ValueScanner::default();
        let deep = "{\"a\":".to_string() + &"[".repeat(200);
        assert_eq!(scan.complete(deep.as_bytes()), None);
        assert_eq!(scan.error.as_deref(), Some("nested too deeply"));
    }

    #[test]
    fn codes_map_to_etcds_http_statuses() {
        assert_eq!(
            http_status(Code::FailedPrecondition),
            StatusCode::PRECONDITION_FAILED
        );
        assert_eq!(http_status(Code::Cancelled), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(http_status(Code::InvalidArgument), StatusCode::BAD_REQUEST);
        assert_eq!(http_status(Code::Unauthenticated), StatusCode::UNAUTHORIZED);
        assert_eq!(http_status(Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
