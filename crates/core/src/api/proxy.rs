//! The client port of a node that is not a cluster member (yet): every gRPC call is
//! forwarded, unchanged, to a member's client API found through the mesh, so clients
//! pointed at any node of the mesh are served while it waits to be added. With TLS on,
//! the proxy terminates TLS itself and dials the member with TLS as well.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::rustls;
use tonic::codegen::{http, Service};
use tonic::transport::Channel;
use tracing::{debug, info};

use crate::tls::MemberDialer;

/// Chooses the client URL of a member to forward to (the leader when known).
pub type PickMember = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Serves `listener` until `stop` turns true; connections already open keep being
/// served until their clients close them.
/// `tls` is the client API's TLS configuration (`None`: plaintext); `dialer` reaches
/// the chosen member.
pub async fn serve(
    listener: TcpListener,
    pick: PickMember,
    tls: Option<Arc<rustls::ServerConfig>>,
    dialer: MemberDialer,
    mut stop: watch::Receiver<bool>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    info!("not a cluster member yet: forwarding client requests to a member");
    let channels: Arc<std::sync::Mutex<Option<(String, Channel)>>> = Arc::default();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("proxy accept: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let pick = pick.clone();
        let channels = channels.clone();
        let dialer = dialer.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let pick = pick.clone();
                let channels = channels.clone();
                let dialer = dialer.clone();
                async move { Ok::<_, Infallible>(forward(req, &pick, &dialer, &channels).await) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            // A client that stops answering pings is dropped; so is one that never
            // finishes its TLS handshake.
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .max_header_list_size(MAX_HEADER_LIST_BYTES);
            let served = match acceptor {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
                    {
                        Ok(tls) => builder.serve_connection(TokioIo::new(tls), svc).await,
                        Err(e) => {
                            debug!("proxied connection: TLS handshake: {e}");
                            return;
                        }
                    }
                }
            };
            if let Err(e) = served {
                debug!("proxied connection: {e}");
            }
        });
    }
}

/// HTTP/2 pings of an idle proxied connection, and how long an answer may take.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a client may take to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Largest request header block accepted.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

async fn forward(
    req: hyper::Request<Incoming>,
    pick: &PickMember,
    dialer: &MemberDialer,
    cache: &std::sync::Mutex<Option<(String, Channel)>>,
) -> http::Response<tonic::body::Body> {
    let Some(url) = pick() else {
        return tonic::Status::unavailable(
            "etcdserver: this node is not a cluster member yet and sees no member to forward to",
        )
        .into_http();
    };
    let channel = {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        match &*c {
            Some((u, ch)) if *u == url => Some(ch.clone()),
            _ => match dialer.endpoint(&url) {
                Ok(e) => {
                    let ch = e.connect_lazy();
                    *c = Some((url.clone(), ch.clone()));
                    Some(ch)
                }
                Err(_) => None,
            },
        }
    };
    let Some(mut channel) = channel else {
        return tonic::Status::unavailable(format!("member client URL {url} is invalid"))
            .into_http();
    };
    if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
        return tonic::Status::unavailable(format!("forwarding to member {url}: {e}")).into_http();
    }
    match channel.call(req.map(tonic::body::Body::new)).await {
        Ok(resp) => resp,
        Err(e) => {
            tonic::Status::unavailable(format!("forwarding to member {url}: {e}")).into_http()
        }
    }
}
