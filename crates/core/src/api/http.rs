//! The client port speaks two protocols on one listener, as etcd's does: gRPC (HTTP/2
//! requests with content type `application/grpc`) and plain HTTP/1.1 or HTTP/2 for
//! everything else: `/version`, `/health`, `/livez`, `/readyz`, `/metrics`, and etcd's
//! JSON gateway under `/v3/`. TLS and client-certificate checks happen before either,
//! at the connection, so they apply to both.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tonic::body::Body;
use tonic::codegen::http::{self, header};
use tonic::codegen::Service;
use tracing::debug;

use super::gateway::{Gateway, Grpc};
use crate::metrics::http::Sources;

/// The client port's request router.
#[derive(Clone)]
pub struct ClientPort {
    grpc: Grpc,
    gateway: Gateway,
    probes: Arc<Sources>,
}

impl ClientPort {
    pub fn new(grpc: Grpc, max_request_bytes: usize, probes: Sources) -> ClientPort {
        ClientPort {
            gateway: Gateway::new(grpc.clone(), max_request_bytes),
            grpc,
            probes: Arc::new(probes),
        }
    }

    async fn http(self, req: http::Request<Body>) -> http::Response<Body> {
        if Gateway::owns(req.uri().path()) {
            return self.gateway.handle(req).await;
        }
        let resp = crate::metrics::http::probe(&self.probes, req.method(), req.uri()).await;
        resp.map(|s| Body::new(http_body_util::Full::new(Bytes::from(s))))
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl<B> Service<http::Request<B>> for ClientPort
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let req = req.map(Body::new);
        if is_grpc(req.headers()) {
            return self.grpc.call(req);
        }
        let this = self.clone();
        Box::pin(async move { Ok(this.http(req).await) })
    }
}

/// Routes that send every request to `port` (gRPC and HTTP alike), for tonic's server.
pub fn routes(port: ClientPort) -> tonic::service::Routes {
    let router = tonic::service::RoutesBuilder::default()
        .routes()
        .into_axum_router()
        .fallback_service(port);
    tonic::service::Routes::from(router)
}

/// How long a client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond it are closed at accept.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The connections of a TLS client port: each handshake runs on its own task (a slow
/// client holds up no one), offering HTTP/2 and HTTP/1.1 by ALPN.
pub fn tls_incoming<S>(
    tcp: S,
    config: Arc<tokio_rustls::rustls::ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>>
where
    S: Stream<Item = Result<TcpStream, std::io::Error>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        use futures::StreamExt;
        let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
        let mut tcp = std::pin::pin!(tcp);
        loop {
            let conn = tokio::select! {
                c = tcp.next() => c,
                _ = tx.closed() => return,
            };
            let stream = match conn {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    // Out of descriptors, say: pause rather than spin.
                    debug!("client port accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                None => return,
            };
            let Ok(slot) = pending.clone().try_acquire_owned() else {
                debug!("client port: too many TLS handshakes in progress, one refused");
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        drop(slot);
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => debug!("client port TLS handshake: {e}"),
                    Err(_) => debug!("client port TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
