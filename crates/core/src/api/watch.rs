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
//!
//! Watchers that have caught up with the applied revision share one read per stream
//! (a [`Group`], as etcd's synced watcher group): the group reads each new span once,
//! for every key, and hands each event to the watchers of its key (found by key for
//! single-key watchers). A watcher replaying history, or one created while the group
//! is behind, steps on its own until it reaches the group's revision.

use std::collections::{HashMap, HashSet, VecDeque};
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
use crate::kv::{Interval, KvError};
use crate::proto::etcdserverpb::{
    watch_create_request::FilterType, watch_request::RequestUnion, watch_server::Watch,
    WatchCreateRequest, WatchRequest, WatchResponse,
};
use crate::proto::mvccpb::{event::EventType, Event};

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
            group: Group::default(),
            ready: VecDeque::new(),
            group_first: false,
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
    /// Watchers stepping on their own, checked in turn; one that answered goes to the
    /// back.
    watchers: VecDeque<Box<Watcher>>,
    /// Watchers caught up with each other, read for together.
    group: Group,
    /// The group's responses of its last read, sent before it reads again.
    ready: VecDeque<WatchResponse>,
    /// Whether the group or the watchers on their own get the next look (alternating,
    /// so that steady live traffic does not hold up a replay, nor the reverse).
    group_first: bool,
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
            if let Some(resp) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(resp)));
            }
            let current = *this.applied.borrow_and_update();
            this.group_first = !this.group_first;
            if this.group_first {
                if let Some(resp) = this.step_group(current) {
                    return Poll::Ready(Some(Ok(resp)));
                }
            }
            if let Some(resp) = this.step_watchers(current) {
                return Poll::Ready(Some(Ok(resp)));
            }
            if !this.group_first {
                if let Some(resp) = this.step_group(current) {
                    return Poll::Ready(Some(Ok(resp)));
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
            let all = || this.watchers.iter().chain(this.group.members.values());
            let Some(deadline) = all().filter_map(|w| w.progress_at).min() else {
                this.progress_timer = None;
                return Poll::Pending;
            };
            let now = Instant::now();
            let group = this.group.members.values_mut();
            for w in this.watchers.iter_mut().chain(group) {
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
                self.group.remove(id);
                self.ready.retain(|r| r.watch_id != id);
                resp
            }
        }
    }

    /// One response from the watchers stepping on their own, if any has one. One that
    /// is idle at the group's revision joins the group.
    fn step_watchers(&mut self, current: i64) -> Option<WatchResponse> {
        for _ in 0..self.watchers.len() {
            let mut w = self.watchers.pop_front().expect("counted");
            match w.step(&self.ctx, current) {
                Step::Idle if w.next == current + 1 && self.group.accepts(w.next) => {
                    self.group.add(w);
                }
                Step::Idle => self.watchers.push_back(w),
                Step::Send(resp) => {
                    self.watchers.push_back(w);
                    return Some(resp);
                }
                Step::Ended(resp) => {
                    lock(&self.live).remove(&w.id);
                    return Some(resp);
                }
            }
        }
        None
    }

    /// Reads the group's next span once and queues each member's events; the first
    /// response, if there is one. A failed read (the span was compacted while the
    /// client was slow) hands the members back to step on their own, each then
    /// canceled with the reason.
    fn step_group(&mut self, current: i64) -> Option<WatchResponse> {
        while self.ready.is_empty() && !self.group.members.is_empty() {
            if self.group.next > current {
                return None;
            }
            match self.group.read(&self.ctx, current) {
                Ok(responses) => self.ready.extend(responses),
                Err(_) => {
                    let next = self.group.next;
                    for (_, mut w) in self.group.members.drain() {
                        w.next = next;
                        self.watchers.push_back(w);
                    }
                    self.group = Group::default();
                    return None;
                }
            }
        }
        self.ready.pop_front()
    }
}

/// A stream's watchers that have delivered every event before `next`: each span is
/// read once for all of them.
#[derive(Default)]
struct Group {
    next: i64,
    members: HashMap<i64, Box<Watcher>>,
    /// Single-key watchers by their key.
    by_key: HashMap<Vec<u8>, Vec<i64>>,
    /// Every other watcher, with the keys it watches.
    ranges: Vec<(i64, Interval)>,
    /// Members that asked for each event's previous value.
    prev_kv: usize,
}

impl Group {
    fn accepts(&self, next: i64) -> bool {
        self.members.is_empty() || self.next == next
    }

    fn add(&mut self, w: Box<Watcher>) {
        if self.members.is_empty() {
            self.next = w.next;
        }
        if w.req.range_end.is_empty() {
            self.by_key.entry(w.req.key.clone()).or_default().push(w.id);
        } else {
            self.ranges
                .push((w.id, Interval::new(&w.req.key, &w.req.range_end)));
        }
        self.prev_kv += usize::from(w.req.prev_kv);
        self.members.insert(w.id, w);
    }

    fn remove(&mut self, id: i64) {
        let Some(w) = self.members.remove(&id) else {
            return;
        };
        if let Some(ids) = self.by_key.get_mut(&w.req.key) {
            ids.retain(|&i| i != id);
            if ids.is_empty() {
                self.by_key.remove(&w.req.key);
            }
        }
        self.ranges.retain(|(i, _)| *i != id);
        self.prev_kv -= usize::from(w.req.prev_kv);
    }

    /// The members' responses for the events from `next` (up to `current`, at most
    /// [`EVENTS_PER_READ`] of them in whole revisions); `next` moves past them.
    fn read(&mut self, ctx: &ApiContext, current: i64) -> Result<Vec<WatchResponse>, KvError> {
        let events = ctx.kv.events(
            self.next,
            current,
            &[0],
            &[0],
            self.prev_kv > 0,
            EVENTS_PER_READ,
        )?;
        let more = events.len() >= EVENTS_PER_READ;
        self.next = match events.last().and_then(|e| e.kv.as_ref()) {
            Some(kv) if more => kv.mod_revision + 1,
            _ => current + 1,
        };
        // Each member's events, in revision order; members in the order first reached.
        let mut order = Vec::new();
        let mut out: HashMap<i64, Vec<Event>> = HashMap::new();
        for e in &events {
            let Some(kv) = &e.kv else { continue };
            let single = self.by_key.get(&kv.key).into_iter().flatten().copied();
            let ranged = self
                .ranges
                .iter()
                .filter(|(_, r)| r.contains(&kv.key))
                .map(|(id, _)| *id);
            for id in single.chain(ranged) {
                let w = &self.members[&id];
                if !w.wants(e) {
                    continue;
                }
                let mut e = e.clone();
                if !w.req.prev_kv {
                    e.prev_kv = None;
                }
                out.entry(id)
                    .or_insert_with(|| {
                        order.push(id);
                        Vec::new()
                    })
                    .push(e);
            }
        }
        for w in self.members.values_mut() {
            w.next = self.next;
        }
        Ok(order
            .into_iter()
            .map(|id| {
                let w = self.members.get_mut(&id).expect("a member");
                w.sent_since_progress = true;
                WatchResponse {
                    header: ctx.header(current),
                    watch_id: id,
                    events: out.remove(&id).unwrap_or_default(),
                    ..Default::default()
                }
            })
            .collect())
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
            let events: Vec<_> = events.into_iter().filter(|e| self.wants(e)).collect();
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

    /// Whether the watcher's filters let `e` through.
    fn wants(&self, e: &Event) -> bool {
        let put = e.r#type == EventType::Put as i32;
        !(put && self.no_put || !put && self.no_delete)
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
