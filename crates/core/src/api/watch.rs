//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! A watcher reads events from the store's revision log, from its next revision up to
//! the current one, whenever the applied revision moves. Replay of history and live
//! delivery are the same code path, so events reach every watcher in revision order,
//! exactly once, and a slow client only slows its own stream.
//!
//! The responses of a stream's watchers are produced inside the stream itself, when
//! hyper polls it for the next message: no task or channel per watcher stands between
//! a commit and the connection. (With one, each event woke three tasks, and the
//! connection flushed about four responses per write; etcd's writer joins many.)
//! Requests from the client arrive on a task of their own and reach the stream as
//! [`Control`] messages, so a watcher's created response always precedes its events.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream as RevisionStream;
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
/// Control messages buffered per stream before the request task waits for the client.
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
        let live = Arc::new(Mutex::new(HashSet::new()));
        tokio::spawn(serve_requests(
            self.ctx.clone(),
            caller,
            inbound,
            tx,
            live.clone(),
        ));
        let out = Outbound {
            applied: self.ctx.kv.subscribe(),
            moved: RevisionStream::new(self.ctx.kv.subscribe()),
            ctx: self.ctx.clone(),
            control: rx,
            watchers: VecDeque::new(),
            live,
            progress_timer: None,
        };
        Ok(Response::new(Box::pin(out)))
    }
}

/// What the request task hands the stream, in the order the client asked.
enum Control {
    /// A response on its own (an error, a progress answer).
    Send(WatchResponse),
    /// A new watcher and its created response, which goes out before its events.
    Created(WatchResponse, Box<Watcher>),
    /// A watcher canceled by the client, and the canceled response.
    Cancel(i64, WatchResponse),
}

/// The IDs of a stream's live watchers: the request task checks new IDs against it,
/// the stream removes a watcher it cancels on its own (its revision was compacted).
type LiveIds = Arc<Mutex<HashSet<i64>>>;

fn lock(live: &LiveIds) -> std::sync::MutexGuard<'_, HashSet<i64>> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most watchers one Watch stream may hold at once: each holds a position in the
/// history and a share of the stream's buffer.
pub const MAX_WATCHERS_PER_STREAM: usize = 10_000;

/// What etcd puts in `cancel_reason` when the caller may not read the watched range.
const WATCH_PERMISSION_DENIED: &str =
    "rpc error: code = PermissionDenied desc = etcdserver: permission denied";

async fn serve_requests(
    ctx: ApiContext,
    caller: super::Caller,
    mut inbound: Streaming<WatchRequest>,
    tx: mpsc::Sender<Control>,
    live: LiveIds,
) {
    let mut next_id: i64 = 0;
    loop {
        // The stream's answer side gone (the client left) ends this task too, even
        // while the client's request side stays open.
        let msg = tokio::select! {
            m = inbound.next() => m,
            _ = tx.closed() => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let rev = ctx.kv.current_revision();
        let control = match msg.request_union {
            Some(RequestUnion::CreateRequest(c)) => {
                let read = crate::proto::authpb::permission::Type::Read;
                let denied = match &caller {
                    super::Caller::User(u) => ctx
                        .kv
                        .auth()
                        .check_range(u, &c.key, &c.range_end, read)
                        .is_err(),
                    super::Caller::Anyone => false,
                };
                if denied {
                    Control::Send(WatchResponse {
                        header: ctx.header(rev),
                        watch_id: c.watch_id,
                        created: true,
                        canceled: true,
                        cancel_reason: WATCH_PERMISSION_DENIED.into(),
                        ..Default::default()
                    })
                } else {
                    create(&ctx, c, rev, &mut next_id, &live)
                }
            }
            Some(RequestUnion::CancelRequest(c)) => {
                if !lock(&live).remove(&c.watch_id) {
                    continue;
                }
                Control::Cancel(
                    c.watch_id,
                    WatchResponse {
                        header: ctx.header(rev),
                        watch_id: c.watch_id,
                        canceled: true,
                        ..Default::default()
                    },
                )
            }
            // Not tied to one watcher (etcd answers with watch ID -1). Every watcher has
            // delivered what it will read up to `rev` once it is idle.
            Some(RequestUnion::ProgressRequest(_)) => Control::Send(WatchResponse {
                header: ctx.header(rev),
                watch_id: -1,
                ..Default::default()
            }),
            None => continue,
        };
        if tx.send(control).await.is_err() {
            break;
        }
    }
}

/// A create request: its watcher, or the duplicate-ID error.
fn create(
    ctx: &ApiContext,
    c: WatchCreateRequest,
    rev: i64,
    next_id: &mut i64,
    live: &LiveIds,
) -> Control {
    let mut ids = lock(live);
    if ids.len() >= MAX_WATCHERS_PER_STREAM {
        return Control::Send(WatchResponse {
            header: ctx.header(rev),
            watch_id: if c.watch_id != 0 { c.watch_id } else { -1 },
            created: true,
            canceled: true,
            cancel_reason: format!(
                "etcdserver: too many watchers on this stream (limit {MAX_WATCHERS_PER_STREAM}); open another stream"
            ),
            ..Default::default()
        });
    }
    let id = if c.watch_id != 0 {
        if ids.contains(&c.watch_id) {
            return Control::Send(WatchResponse {
                header: ctx.header(rev),
                watch_id: -1,
                created: true,
                canceled: true,
                cancel_reason: "etcdserver: duplicate watch ID".into(),
                ..Default::default()
            });
        }
        c.watch_id
    } else {
        while ids.contains(next_id) {
            *next_id += 1;
        }
        *next_id
    };
    *next_id = (*next_id).max(id.saturating_add(1));
    ids.insert(id);
    let start = if c.start_revision > 0 {
        c.start_revision
    } else {
        rev + 1
    };
    let created = WatchResponse {
        header: ctx.header(rev),
        watch_id: id,
        created: true,
        ..Default::default()
    };
    let w = Watcher::new(ctx, id, c, start);
    Control::Created(created, Box::new(w))
}

/// The sending half of one Watch stream, polled by hyper for its next message.
///
/// Written as a plain `poll_next` that registers for wake-ups only when it has nothing
/// to send: a message costs one look at the client's requests, one at the applied
/// revision and one step per watcher. (An `async` loop moved the whole state in and
/// out per message.)
struct Outbound {
    ctx: ApiContext,
    /// The applied revision: events up to it may be read.
    applied: tokio::sync::watch::Receiver<i64>,
    /// Wakes the stream when the applied revision moves; polled only before sleeping.
    moved: RevisionStream<i64>,
    control: mpsc::Receiver<Control>,
    /// Checked in turn; a watcher that answered goes to the back.
    watchers: VecDeque<Box<Watcher>>,
    live: LiveIds,
    /// Armed only while a watcher asked for progress notifications.
    progress_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Outbound {
    type Item = Result<WatchResponse, Status>;

    /// The stream's next message; None ends the stream (the client stopped sending
    /// and nothing is left to say, or the node is stopping).
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            // What the client asked for goes first, in its order.
            match this.control.try_recv() {
                Ok(c) => return Poll::Ready(Some(Ok(this.take(c)))),
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => return Poll::Ready(None),
            }
            let current = *this.applied.borrow_and_update();
            for _ in 0..this.watchers.len() {
                let mut w = this.watchers.pop_front().expect("counted");
                match w.step(&this.ctx, current) {
                    Step::Idle => this.watchers.push_back(w),
                    Step::Send(resp) => {
                        this.watchers.push_back(w);
                        return Poll::Ready(Some(Ok(resp)));
                    }
                    Step::Ended(resp) => {
                        lock(&this.live).remove(&w.id);
                        return Poll::Ready(Some(Ok(resp)));
                    }
                }
            }
            // Nothing to send: register for what can change that, then look again if
            // something already did.
            match this.control.poll_recv(cx) {
                Poll::Ready(Some(c)) => return Poll::Ready(Some(Ok(this.take(c)))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            match Pin::new(&mut this.moved).poll_next(cx) {
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {}
            }
            let Some(deadline) = this.watchers.iter().filter_map(|w| w.progress_at).min() else {
                this.progress_timer = None;
                return Poll::Pending;
            };
            let now = Instant::now();
            for w in this.watchers.iter_mut() {
                if let Some(resp) = w.progress(&this.ctx, now) {
                    return Poll::Ready(Some(Ok(resp)));
                }
            }
            let timer = this
                .progress_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The deadline passed between the check above and the poll: look again.
        }
    }
}

impl Outbound {
    fn take(&mut self, c: Control) -> WatchResponse {
        match c {
            Control::Send(resp) => resp,
            Control::Created(resp, w) => {
                self.watchers.push_back(w);
                resp
            }
            Control::Cancel(id, resp) => {
                self.watchers.retain(|w| w.id != id);
                resp
            }
        }
    }
}

enum Step {
    /// Nothing to send now.
    Idle,
    Send(WatchResponse),
    /// The watcher is canceled (this is its last response).
    Ended(WatchResponse),
}

struct Watcher {
    id: i64,
    req: WatchCreateRequest,
    next: i64,
    no_put: bool,
    no_delete: bool,
    /// With `progress_notify`: when to send an empty response if nothing was sent.
    progress_at: Option<Instant>,
    sent_since_progress: bool,
    _open: crate::metrics::GaugeGuard,
}

impl Watcher {
    fn new(ctx: &ApiContext, id: i64, req: WatchCreateRequest, start: i64) -> Watcher {
        let no_put = req.filters.contains(&(FilterType::Noput as i32));
        let no_delete = req.filters.contains(&(FilterType::Nodelete as i32));
        let progress_at = req
            .progress_notify
            .then(|| Instant::now() + ctx.limits.progress_notify_interval);
        Watcher {
            id,
            req,
            next: start,
            no_put,
            no_delete,
            progress_at,
            sent_since_progress: false,
            _open: crate::metrics::GaugeGuard::new(&ctx.watchers),
        }
    }

    /// The events from `next` up to `current`, if there are any to send.
    fn step(&mut self, ctx: &ApiContext, current: i64) -> Step {
        while self.next <= current {
            let read = ctx.kv.events(
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
                    return Step::Ended(WatchResponse {
                        header: ctx.header(current),
                        watch_id: self.id,
                        canceled: true,
                        compact_revision,
                        cancel_reason: e.to_string(),
                        ..Default::default()
                    });
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
                self.sent_since_progress = true;
                return Step::Send(WatchResponse {
                    header: ctx.header(current),
                    watch_id: self.id,
                    events,
                    ..Default::default()
                });
            }
        }
        Step::Idle
    }

    /// The progress notification, if one is due.
    fn progress(&mut self, ctx: &ApiContext, now: Instant) -> Option<WatchResponse> {
        let at = self.progress_at?;
        if now < at {
            return None;
        }
        self.progress_at = Some(now + ctx.limits.progress_notify_interval);
        if std::mem::take(&mut self.sent_since_progress) {
            return None;
        }
        Some(WatchResponse {
            header: ctx.header(self.next - 1),
            watch_id: self.id,
            ..Default::default()
        })
    }
}
