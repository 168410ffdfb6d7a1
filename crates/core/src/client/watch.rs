//! [`Watcher`]: one watch over a bidirectional `Watch` stream: create it (key or
//! range, start revision, prev_kv, filters), read its responses, ask for progress,
//! cancel it. A server-side cancel (e.g. compacted start revision) is an error.
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Client, ClientError};
use crate::proto::etcdserverpb as pb;
use pb::watch_client::WatchClient;
use pb::watch_create_request::FilterType;
use pb::watch_request::RequestUnion;

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchOptions {
    /// The key, or the start of the range.
    pub key: Vec<u8>,
    /// End of the range (empty: the single key; see [`super::prefix_range_end`]).
    pub range_end: Vec<u8>,
    /// Replay events from this revision (inclusive); 0 means from now.
    pub start_revision: i64,
    /// Deliver each event's previous key-value.
    pub prev_kv: bool,
    /// Ask the server for periodic progress notifications.
    pub progress_notify: bool,
    /// Drop PUT events.
    pub no_put: bool,
    /// Drop DELETE events.
    pub no_delete: bool,
}

/// A created watch. Dropping it closes the stream.
#[derive(Debug)]
pub struct Watcher {
    requests: mpsc::Sender<pb::WatchRequest>,
    responses: tonic::Streaming<pb::WatchResponse>,
    /// The server-assigned ID of this watch.
    watch_id: i64,
    endpoint: String,
}

/// Opens the stream on endpoint `idx` and waits for the server to confirm creation.
pub(super) async fn open(
    client: &Client,
    idx: usize,
    opts: &WatchOptions,
) -> Result<Watcher, ClientError> {
    let endpoint = client.inner.endpoints[idx].name.clone();
    let timeout = client.inner.request_timeout;
    let ch = client.channel(idx).await?;
    let (tx, rx) = mpsc::channel(16);
    let mut filters = Vec::new();
    if opts.no_put {
        filters.push(FilterType::Noput as i32);
    }
    if opts.no_delete {
        filters.push(FilterType::Nodelete as i32);
    }
    let create = pb::WatchCreateRequest {
        key: opts.key.clone(),
        range_end: opts.range_end.clone(),
        start_revision: opts.start_revision,
        progress_notify: opts.progress_notify,
        filters,
        prev_kv: opts.prev_kv,
        watch_id: 0,
        fragment: false,
    };
    tx.send(pb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(create)),
    })
    .await
    .expect("receiver alive");
    let timed_out = || ClientError::Timeout {
        endpoint: endpoint.clone(),
        timeout,
    };
    let status_err = |s: tonic::Status| ClientError::from_status(&s, &endpoint);
    let mut responses = tokio::time::timeout(
        timeout,
        WatchClient::new(ch)
            .max_decoding_message_size(super::MAX_RESPONSE_BYTES)
            .watch(ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| timed_out())?
    .map_err(status_err)?
    .into_inner();
    let first = tokio::time::timeout(timeout, responses.message())
        .await
        .map_err(|_| timed_out())?
        .map_err(status_err)?
        .ok_or_else(|| ClientError::Rpc {
            code: tonic::Code::Unavailable,
            message: "watch stream closed before the watch was created".into(),
            endpoint: endpoint.clone(),
        })?;
    check_canceled(&first)?;
    Ok(Watcher {
        requests: tx,
        responses,
        watch_id: first.watch_id,
        endpoint,
    })
}

fn check_canceled(resp: &pb::WatchResponse) -> Result<(), ClientError> {
    if resp.canceled || resp.compact_revision > 0 {
        let reason = if resp.compact_revision > 0 && resp.cancel_reason.is_empty() {
            format!(
                "etcdserver: mvcc: required revision has been compacted (compact revision {})",
                resp.compact_revision
            )
        } else {
            resp.cancel_reason.clone()
        };
        return Err(ClientError::WatchCanceled {
            reason,
            compact_revision: resp.compact_revision,
        });
    }
    Ok(())
}

impl Watcher {
    /// The server-assigned watch ID.
    pub fn watch_id(&self) -> i64 {
        self.watch_id
    }

    /// The next response (events or a progress notification); `None` when the
    /// server closed the stream. A cancel by the server is an error.
    pub async fn message(&mut self) -> Result<Option<pb::WatchResponse>, ClientError> {
        let resp = self
            .responses
            .message()
            .await
            .map_err(|s| ClientError::from_status(&s, &self.endpoint))?;
        if let Some(r) = &resp {
            check_canceled(r)?;
        }
        Ok(resp)
    }

    /// Asks the server for a progress notification (a response with no events
    /// carrying the current revision).
    pub async fn request_progress(&self) -> Result<(), ClientError> {
        self.send(RequestUnion::ProgressRequest(pb::WatchProgressRequest {}))
            .await
    }

    /// Asks the server to cancel this watch; the cancel confirmation arrives as an error from [`Watcher::message`].
    pub async fn cancel(&self) -> Result<(), ClientError> {
        self.send(RequestUnion::CancelRequest(pb::WatchCancelRequest {
            watch_id: self.watch_id,
        }))
        .await
    }

    async fn send(&self, req: RequestUnion) -> Result<(), ClientError> {
        self.requests
            .send(pb::WatchRequest {
                request_union: Some(req),
            })
            .await
            .map_err(|_| ClientError::Rpc {
                code: tonic::Code::Cancelled,
                message: "watch stream closed".into(),
                endpoint: self.endpoint.clone(),
            })
    }
}
