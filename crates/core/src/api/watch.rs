//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! Each watcher is a task that reads events from the store's revision log, from its
//! next revision up to the current one, whenever the applied revision moves. Replay of
//! history and live delivery are the same code path, so events reach every watcher in
//! revision order, exactly once, and a slow client only slows its own stream.

use std::collections::HashMap;
use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::ApiContext;
use crate::kv::KvError;
use crate::proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::event::EventType;

/// Events read from the store per step (whole revisions are never split).
const EVENTS_PER_READ: usize = 1000;
/// Responses buffered per stream before watchers wait for the client.
const STREAM_BUFFER: usize = 256;

pub struct WatchApi {
    ctx: ApiContext,
}

impl WatchApi {
    pub fn new(ctx: ApiContext) -> WatchApi {
        WatchApi { ctx }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchApi {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = self.ctx.caller(req.metadata())?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(serve_stream(self.ctx.clone(), caller, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Out = mpsc::Sender<Result<WatchResponse, Status>>;

/// What etcd puts in `cancel_reason` when the caller may not read the watched range.
const WATCH_PERMISSION_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

async fn serve_stream(
    ctx: ApiContext,
    caller: super::Caller,
    mut inbound: Streaming<WatchRequest>,
    tx: Out,
) {
    let mut watchers: HashMap<i64, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut next_id: i64 = 0;
    while let Some(Ok(msg)) = inbound.next().await {
        watchers.retain(|_, h| !h.is_finished());
        let rev = ctx.kv.current_revision();
        let resp = match msg.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                if let super::Caller::User(u) = &caller {
                    let read = crate::proto::authpb::permission::Type::Read;
                    if ctx
                        .kv
                        .auth()
                        .check_range(u, &c.key, &c.range_end, read)
                        .is_err()
                    {
                        let _ = tx
                            .send(Ok(WatchResponse {
                                header: ctx.header(rev),
                                watch_id: c.watch_id,
                                created: true,
                                canceled: true,
                                cancel_reason: WATCH_PERMISSION_DENIED.into(),
                                ..Default::default()
                            }))
                            .await;
                        continue;
                    }
                }
                let id = if c.watch_id != 0 {
                    if watchers.contains_key(&c.watch_id) {
                        let _ = tx
                            .send(Ok(WatchResponse {
                                header: ctx.header(rev),
                                watch_id: -1,
                                created: true,
                                canceled: true,
                                cancel_reason: "etcdserver: duplicate watch ID".into(),
                                ..Default::default()
                            }))
                            .await;
                        continue;
                    }
                    c.watch_id
                } else {
                    while watchers.contains_key(&next_id) {
                        next_id += 1;
                    }
                    next_id
                };
                next_id = next_id.max(id.saturating_add(1));
                let start = if c.start_revision > 0 {
                    c.start_revision
                } else {
                    rev + 1
                };
                // The created response goes out before any event of this watcher.
                if tx
                    .send(Ok(WatchResponse {
                        header: ctx.header(rev),
                        watch_id: id,
                        created: true,
                        ..Default::default()
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
                let w = Watcher::new(ctx.clone(), id, c, start, tx.clone());
                let open = crate::metrics::GaugeGuard::new(&ctx.watchers);
                watchers.insert(
                    id,
                    tokio::spawn(async move {
                        let _open = open;
                        w.run().await
                    }),
                );
                continue;
            }
            Some(RequestUnion::CancelRequest(c)) => match watchers.remove(&c.watch_id) {
                Some(h) => {
                    h.abort();
                    WatchResponse {
                        header: ctx.header(rev),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    }
                }
                None => continue,
            },
            // Not tied to one watcher (etcd answers with watch ID -1). Every watcher has
            // delivered what it will read up to `rev` once it is idle.
            Some(RequestUnion::ProgressRequest(_)) => WatchResponse {
                header: ctx.header(rev),
                watch_id: -1,
                ..Default::default()
            },
            None => continue,
        };
        if tx.send(Ok(resp)).await.is_err() {
            break;
        }
    }
    for (_, h) in watchers {
        h.abort();
    }
}

struct Watcher {
    ctx: ApiContext,
    id: i64,
    req: WatchCreateRequest,
    next: i64,
    tx: Out,
    no_put: bool,
    no_delete: bool,
}

impl Watcher {
    fn new(ctx: ApiContext, id: i64, req: WatchCreateRequest, start: i64, tx: Out) -> Watcher {
        let no_put = req.filters.contains(&(FilterType::Noput as i32));
        let no_delete = req.filters.contains(&(FilterType::Nodelete as i32));
        Watcher {
            ctx,
            id,
            req,
            next: start,
            tx,
            no_put,
            no_delete,
        }
    }

    async fn send(&self, resp: WatchResponse) -> bool {
        self.tx.send(Ok(resp)).await.is_ok()
    }

    async fn run(mut self) {
        let mut revisions = self.ctx.kv.subscribe();
        let mut progress = tokio::time::interval(self.ctx.limits.progress_notify_interval);
        progress.tick().await;
        let mut sent_since_progress = false;
        loop {
            let current = *revisions.borrow_and_update();
            if self.next <= current {
                let read = self.ctx.kv.events(
                    self.next,
                    current,
                    &self.req.key,
                    &self.req.range_end,
                    self.req.prev_kv,
                    EVENTS_PER_READ,
                );
                let events = match read {
                    Ok(ev) => ev,
                    Err(e) => {
                        let compact_revision = match &e {
                            KvError::Compacted { compact_revision } => *compact_revision,
                            _ => 0,
                        };
                        self.send(WatchResponse {
                            header: self.ctx.header(current),
                            watch_id: self.id,
                            canceled: true,
                            compact_revision,
                            cancel_reason: e.to_string(),
                            ..Default::default()
                        })
                        .await;
                        return;
                    }
                };
                let more = events.len() >= EVENTS_PER_READ;
                self.next = match events.last().and_then(|e| e.kv.as_ref()) {
                    Some(kv) if more => kv.mod_revision + 1,
                    _ => current + 1,
                };
                let events: Vec<_> = events
                    .into_iter()
                    .filter(|e| {
                        let put = e.r#type == EventType::Put as i32;
                        !(put && self.no_put || !put && self.no_delete)
                    })
                    .collect();
                if !events.is_empty() {
                    sent_since_progress = true;
                    let resp = WatchResponse {
                        header: self.ctx.header(current),
                        watch_id: self.id,
                        events,
                        ..Default::default()
                    };
                    if !self.send(resp).await {
                        return;
                    }
                }
                if more {
                    continue;
                }
            }
            tokio::select! {
                changed = revisions.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = progress.tick(), if self.req.progress_notify => {
                    if !sent_since_progress {
                        let h = self.ctx.header(self.next - 1);
                        if !self.send(WatchResponse { header: h, watch_id: self.id, ..Default::default() }).await {
                            return;
                        }
                    }
                    sent_since_progress = false;
                }
            }
        }
    }
}
