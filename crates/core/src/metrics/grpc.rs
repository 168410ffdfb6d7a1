//! `grpc_server_handled_total{grpc_service, grpc_method, grpc_code}`: a tower layer on
//! the client API that reads each call's gRPC status from the response headers
//! (errors) or trailers (everything else), as go-grpc-prometheus counts them for etcd.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::http;
use tonic::codegen::Service;
use tower_layer::Layer;

type Key = (String, String, &'static str);

/// Handled-call counts; the layer and the `/metrics` page share it.
#[derive(Clone, Default)]
pub struct GrpcMetrics {
    handled: Arc<Mutex<BTreeMap<Key, u64>>>,
}

impl GrpcMetrics {
    /// `((service, method, code), count)` for every series seen so far.
    pub fn handled(&self) -> Vec<(Key, u64)> {
        let map = self.handled.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn record(&self, service: String, method: String, code: tonic::Code) {
        // A path that names no served method: one series for all of them, so callers
        // cannot add label values without bound.
        let (service, method) = if code == tonic::Code::Unimplemented {
            ("unknown".to_string(), "unknown".to_string())
        } else {
            (service, method)
        };
        let mut map = self.handled.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry((service, method, code_name(code))).or_default() += 1;
    }
}

/// Code names as grpc-go prints them (and etcd's dashboards match on).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(v))
}

impl<S> Layer<S> for GrpcMetrics {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.clone(),
        }
    }
}

/// A gRPC service whose calls are counted.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    metrics: GrpcMetrics,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Counted<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Body + Unpin + Send + 'static,
{
    type Response = http::Response<CountedBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        // Paths are /package.Service/Method.
        let path = req.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let mut pending = Some(Pending {
            metrics: self.metrics.clone(),
            service: service.to_string(),
            method: method.to_string(),
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            if let Some(code) = status_of(&parts.headers) {
                if let Some(p) = pending.take() {
                    p.done(code);
                }
            }
            Ok(http::Response::from_parts(
                parts,
                CountedBody {
                    inner: body,
                    pending,
                },
            ))
        })
    }
}

/// A call not counted yet: it is, once its status is known.
struct Pending {
    metrics: GrpcMetrics,
    service: String,
    method: String,
}

impl Pending {
    fn done(self, code: tonic::Code) {
        self.metrics.record(self.service, self.method, code);
    }
}

/// A response body that counts its call when the trailers carry the status, or as
/// `Canceled` when it is dropped before (the client went away mid-stream).
pub struct CountedBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.done(tonic::Code::Cancelled);
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(code) = frame.trailers_ref().and_then(status_of) {
                if let Some(p) = self.pending.take() {
                    p.done(code);
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
