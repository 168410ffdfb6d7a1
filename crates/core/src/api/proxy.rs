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
            let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            let served = match acceptor {
                None => builder.serve_connection(TokioIo::new(stream), svc).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), svc).await,
                    Err(e) => {
                        debug!("proxied connection: TLS handshake: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = served {
                debug!("proxied connection: {e}");
            }
        });
    }
}

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
