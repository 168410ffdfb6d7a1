//! The FleetLock client of `locksmith daemon --strategy fleetlock`: one POST per
//! operation over HTTP/1.1 (TLS for `https://` URLs), so a machine that cannot reach
//! the cluster still takes part through a FleetLock server (locksmith's, or airlock).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::{ClientParams, Failure, Op, PROTOCOL_HEADER};

/// Why an operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered, with anything but 200.
    #[error("FleetLock server answered {status}: {kind}: {value}")]
    Refused {
        status: u16,
        kind: String,
        value: String,
    },
    /// No answer: connection, TLS or HTTP failure, or the timeout.
    #[error("FleetLock server {url}: {reason}")]
    Unreachable { url: String, reason: String },
}

/// A FleetLock server at a base URL.
#[derive(Clone)]
pub struct FleetLockClient {
    url: String,
    host: String,
    port: u16,
    /// The base path, without a trailing slash.
    base: String,
    /// For an `https://` URL.
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for FleetLockClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLockClient")
            .field("url", &self.url)
            .finish()
    }
}

/// Largest answer body read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

impl FleetLockClient {
    /// A client of the server at `url` (`http://` or `https://`, with an optional base
    /// path). HTTPS checks the server against `ca_file`, or the system's roots.
    pub fn new(
        url: &str,
        ca_file: Option<&Path>,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<FleetLockClient, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "{url:?}: the URL must start with http:// or https://"
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if uri.query().is_some() {
            return Err(format!("{url:?}: a base URL takes no query"));
        }
        let tls = if https {
            Some(mesh_core::tls::https_client_config(ca_file).map_err(|e| e.to_string())?)
        } else {
            None
        };
        Ok(FleetLockClient {
            url: url.to_string(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            base: uri.path().trim_end_matches('/').to_string(),
            tls,
            token,
            timeout,
        })
    }

    /// RecursiveLock: take (or keep) a reboot slot.
    pub async fn pre_reboot(&self, params: &ClientParams) -> Result<(), ClientError> {
        self.call(Op::Lock, params).await
    }

    /// UnlockIfHeld: release the slot if this client holds one.
    pub async fn steady_state(&self, params: &ClientParams) -> Result<(), ClientError> {
        self.call(Op::Unlock, params).await
    }

    async fn call(&self, op: Op, params: &ClientParams) -> Result<(), ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.url.clone(),
            reason,
        };
        let (status, body) = tokio::time::timeout(self.timeout, self.post(op, params))
            .await
            .map_err(|_| unreachable(format!("no answer within {:?}", self.timeout)))?
            .map_err(unreachable)?;
        if status == 200 {
            return Ok(());
        }
        let f: Failure = serde_json::from_slice(&body).unwrap_or_else(|_| {
            Failure::new(
                status,
                "unknown",
                String::from_utf8_lossy(&body).trim().to_string(),
            )
        });
        Err(ClientError::Refused {
            status,
            kind: f.kind,
            value: f.value,
        })
    }

    async fn post(&self, op: Op, params: &ClientParams) -> Result<(u16, Bytes), String> {
        let body = serde_json::to_vec(&super::Request {
            client_params: params.clone(),
        })
        .expect("two strings serialize");
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::post(format!("{}{}", self.base, op.path()))
            .header("host", host_header)
            .header(PROTOCOL_HEADER, "true")
            .header("content-type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        match &self.tls {
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("server name {}: {e}", self.host))?;
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                exchange(TokioIo::new(tls), req).await
            }
            None => exchange(TokioIo::new(stream), req).await,
        }
    }
}

async fn exchange<I>(io: I, req: Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status().as_u16();
    let body = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    driver.abort();
    Ok((status, body))
}
