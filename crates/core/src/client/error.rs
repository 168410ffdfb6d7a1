//! `ClientError`: what can go wrong talking to an etcd-v3 server, keeping the gRPC
//! code and the server's own error text (`etcdserver: ...`), and telling retryable
//! failures (unavailable, no leader, timeout) apart from fatal ones.
use std::time::Duration;

/// An error from [`crate::client::Client`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration is unusable (no endpoints, or an endpoint that is not `host:port` or a URL).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// No connection to the endpoint could be established, so no request was sent.
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint as configured.
        endpoint: String,
        /// Why the connection failed (the transport's error chain).
        reason: String,
    },
    /// The server refused the request without processing it: it was closing the
    /// connection (an HTTP/2 GOAWAY whose last processed stream is older than this
    /// request's, as a member sends when it stops gracefully). Safe to send elsewhere.
    #[error("{endpoint} is closing its connection and did not process the request: {reason}")]
    Refused {
        /// The endpoint that refused.
        endpoint: String,
        /// The transport's error chain.
        reason: String,
    },
    /// The server (or the transport) answered with a gRPC error status.
    #[error("{message}")]
    Rpc {
        /// The gRPC status code.
        code: tonic::Code,
        /// The status message; for etcd this is its error text, e.g.
        /// `etcdserver: mvcc: required revision has been compacted`.
        message: String,
        /// The endpoint that answered.
        endpoint: String,
    },
    /// The request did not complete within the request timeout.
    #[error("context deadline exceeded (no answer from {endpoint} within {timeout:?})")]
    Timeout {
        /// The endpoint the request was sent to.
        endpoint: String,
        /// The timeout that expired.
        timeout: Duration,
    },
    /// The server canceled a watch (e.g. its start revision was compacted away).
    #[error("watch canceled: {reason}")]
    WatchCanceled {
        /// The server's cancel reason, if it gave one.
        reason: String,
        /// Set when the start revision had been compacted: the oldest revision still available.
        compact_revision: i64,
    },
}

impl ClientError {
    pub(crate) fn from_status(status: &tonic::Status, endpoint: &str) -> Self {
        let message = if status.message().is_empty() {
            format!("{:?}", status.code())
        } else {
            status.message().to_string()
        };
        ClientError::Rpc {
            code: status.code(),
            message,
            endpoint: endpoint.to_string(),
        }
    }

    /// The gRPC code, when the error came with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Rpc { code, .. } => Some(*code),
            ClientError::Timeout { .. } => Some(tonic::Code::DeadlineExceeded),
            ClientError::Connect { .. } | ClientError::Refused { .. } => {
                Some(tonic::Code::Unavailable)
            }
            _ => None,
        }
    }

    /// Whether the same request may succeed if tried again (possibly on another
    /// endpoint): the cluster or the endpoint was unavailable, had no leader, or was
    /// too slow. This says nothing about whether a write was applied; see
    /// [`ClientError::was_not_sent`].
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Refused { .. }
            | ClientError::Timeout { .. } => true,
            ClientError::Rpc { code, message, .. } => {
                matches!(
                    code,
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) || message.contains("no leader")
                    || message.contains("leader changed")
                    || message.contains("request timed out")
            }
            ClientError::Config(_) | ClientError::WatchCanceled { .. } => false,
        }
    }

    /// True only when the request certainly was not processed by any server (a
    /// connect failure, or a refusal by a closing connection), so even a write can
    /// safely be sent elsewhere.
    pub fn was_not_sent(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Refused { .. }
        )
    }

    /// Whether the server refused because the requested revision was compacted.
    pub fn is_compacted(&self) -> bool {
        match self {
            ClientError::Rpc { message, .. } => {
                message.contains("required revision has been compacted")
            }
            ClientError::WatchCanceled {
                compact_revision, ..
            } => *compact_revision > 0,
            _ => false,
        }
    }
}

/// Joins an error and its sources as `a: b: c`, skipping repeats.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

/// Whether a transport-level status proves the request never left this process:
/// somewhere in its source chain the TCP connect itself was refused.
pub(crate) fn is_connect_refusal(status: &tonic::Status) -> bool {
    sources(status)
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        })
}

/// The errors behind a status (what the transport reported), outermost first.
fn sources(status: &tonic::Status) -> impl Iterator<Item = &(dyn std::error::Error + 'static)> {
    std::iter::successors(std::error::Error::source(status), |e| e.source())
}

/// Whether a transport-level status says the server refused the request unprocessed:
/// somewhere in its source chain is an HTTP/2 GOAWAY received from the server. The
/// HTTP/2 client reports a received GOAWAY only on the streams the server did not
/// process (numbered above the GOAWAY's last stream, or opened after it arrived;
/// RFC 9113 section 6.8); a stream in flight when the connection then closes fails
/// with a broken pipe instead, its fate unknown. Clients may resend a refused request
/// anywhere, writes included, as gRPC's own transparent retry does.
pub fn is_go_away_refusal(status: &tonic::Status) -> bool {
    sources(status)
        .find_map(|e| e.downcast_ref::<h2::Error>())
        .is_some_and(|h2| h2.is_go_away() && h2.is_remote())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_error_keeps_etcd_text_and_classifies() {
        let st =
            tonic::Status::out_of_range("etcdserver: mvcc: required revision has been compacted");
        let e = ClientError::from_status(&st, "a:1");
        assert_eq!(
            e.to_string(),
            "etcdserver: mvcc: required revision has been compacted"
        );
        assert!(e.is_compacted());
        assert!(!e.is_retryable());
        assert_eq!(e.code(), Some(tonic::Code::OutOfRange));

        let st = tonic::Status::unavailable("etcdserver: no leader");
        assert!(ClientError::from_status(&st, "a:1").is_retryable());
        assert!(!ClientError::from_status(&st, "a:1").was_not_sent());
        let c = ClientError::Connect {
            endpoint: "a:1".into(),
            reason: "refused".into(),
        };
        assert!(c.is_retryable() && c.was_not_sent());
    }
}
