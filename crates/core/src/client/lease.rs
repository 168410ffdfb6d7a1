//! Leases: grant, revoke, time-to-live, list, and keep-alive streams, including a
//! background keeper that holds a lease for as long as a lock or campaign needs it.
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Client, ClientError, Retry};
use crate::proto::etcdserverpb as pb;
use pb::lease_client::LeaseClient;

impl Client {
    /// Grants a lease of `ttl` seconds; `id` 0 lets the server choose the ID.
    pub async fn lease_grant(
        &self,
        ttl: i64,
        id: i64,
    ) -> Result<pb::LeaseGrantResponse, ClientError> {
        let req = pb::LeaseGrantRequest { ttl, id };
        self.with_failover(Retry::OnlyIfNotSent, |ch| async move {
            LeaseClient::new(ch).lease_grant(req).await
        })
        .await
    }

    /// Revokes a lease, deleting every key attached to it.
    pub async fn lease_revoke(&self, id: i64) -> Result<pb::LeaseRevokeResponse, ClientError> {
        let req = pb::LeaseRevokeRequest { id };
        self.with_failover(Retry::OnlyIfNotSent, |ch| async move {
            LeaseClient::new(ch).lease_revoke(req).await
        })
        .await
    }

    /// Remaining and granted TTL of a lease (TTL -1: it does not exist), and with
    /// `keys` the keys attached to it.
    pub async fn lease_time_to_live(
        &self,
        id: i64,
        keys: bool,
    ) -> Result<pb::LeaseTimeToLiveResponse, ClientError> {
        let req = pb::LeaseTimeToLiveRequest { id, keys };
        self.with_failover(Retry::Idempotent, |ch| async move {
            LeaseClient::new(ch).lease_time_to_live(req).await
        })
        .await
    }

    /// Every lease's ID.
    pub async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| async move {
            LeaseClient::new(ch)
                .lease_leases(pb::LeaseLeasesRequest {})
                .await
        })
        .await
    }

    /// Opens a keep-alive stream for lease `id` on the first reachable endpoint.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<KeepAlive, ClientError> {
        let (idx, ch) = self.first_channel().await?;
        let endpoint = self.inner.endpoints[idx].name.clone();
        let (requests, rx) = mpsc::channel(4);
        // etcd sends the response headers only with its first response, so the first
        // keep-alive goes out before waiting for the call to open.
        requests
            .send(pb::LeaseKeepAliveRequest { id })
            .await
            .expect("receiver alive");
        let responses = tokio::time::timeout(
            self.inner.request_timeout,
            LeaseClient::new(ch).lease_keep_alive(ReceiverStream::new(rx)),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            endpoint: endpoint.clone(),
            timeout: self.inner.request_timeout,
        })?
        .map_err(|s| ClientError::from_status(&s, &endpoint))?
        .into_inner();
        Ok(KeepAlive {
            id,
            requests,
            responses,
            primed: true,
            endpoint,
            timeout: self.inner.request_timeout,
        })
    }
}

/// One open keep-alive stream for one lease.
#[derive(Debug)]
pub struct KeepAlive {
    id: i64,
    requests: mpsc::Sender<pb::LeaseKeepAliveRequest>,
    responses: tonic::Streaming<pb::LeaseKeepAliveResponse>,
    /// The request for the next response was sent when the stream opened.
    primed: bool,
    endpoint: String,
    timeout: Duration,
}

impl KeepAlive {
    /// Refreshes the lease once; the response's TTL is 0 if the lease is gone.
    pub async fn keep_alive(&mut self) -> Result<pb::LeaseKeepAliveResponse, ClientError> {
        let closed = || ClientError::Rpc {
            code: tonic::Code::Unavailable,
            message: "keep-alive stream closed".into(),
            endpoint: self.endpoint.clone(),
        };
        if !std::mem::take(&mut self.primed) {
            self.requests
                .send(pb::LeaseKeepAliveRequest { id: self.id })
                .await
                .map_err(|_| closed())?;
        }
        match tokio::time::timeout(self.timeout, self.responses.message()).await {
            Ok(Ok(Some(r))) => Ok(r),
            Ok(Ok(None)) => Err(closed()),
            Ok(Err(s)) => Err(ClientError::from_status(&s, &self.endpoint)),
            Err(_) => Err(ClientError::Timeout {
                endpoint: self.endpoint.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

/// Keeps lease `id` (of `ttl` seconds) alive in the background, every third of its
/// TTL, opening a new stream (on any endpoint) when one fails, as etcd's clientv3
/// does. The task ends when the server says the lease is gone (TTL 0) or when it has
/// not been refreshed for a whole TTL: either way, whatever it held is lost.
pub fn keep_lease_alive(client: Client, id: i64, ttl: i64) -> tokio::task::JoinHandle<()> {
    let ttl = Duration::from_secs(ttl.max(1) as u64);
    let every = ttl / 3;
    tokio::spawn(async move {
        let mut last_ok = tokio::time::Instant::now();
        let mut stream: Option<KeepAlive> = None;
        loop {
            if last_ok.elapsed() >= ttl {
                return;
            }
            let ka = match stream.as_mut() {
                Some(s) => s,
                None => match client.lease_keep_alive(id).await {
                    Ok(s) => stream.insert(s),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                },
            };
            match ka.keep_alive().await {
                Ok(r) if r.ttl <= 0 => return,
                Ok(_) => {
                    last_ok = tokio::time::Instant::now();
                    tokio::time::sleep(every).await;
                }
                Err(_) => {
                    stream = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}
