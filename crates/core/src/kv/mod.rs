//! The replicated state machine: etcd v3 MVCC revisions over redb tables.
//!
//! `KvStore` serves concurrent reads from redb read transactions; the Raft driver
//! applies committed entries through one `ApplyBatch` at a time and publishes it
//! together with the applied index. A batch of plain writes stays in memory (its
//! records wait in `pending`); one that changes anything else opens a redb write
//! transaction, writes the pending records first, and commits.
//!
//! As in etcd, records are stored by revision (`kv_revs`) and an index in memory maps
//! each key to its revisions, so a write appends instead of rewriting random pages.
//!
//! Layout:
//! - `tables`: table definitions, record encoding, meta counters
//! - `index`: the in-memory key index and the view a read or a batch has of the store
//! - `pending`: records applied but not yet in redb, and the counters readers see
//! - `range`: key intervals, live and historical scans, shaping Range results
//! - `exec`: executing Put / DeleteRange / Range / Txn over an overlay of the request's own writes
//! - `history`: applying changes, compaction, watch replay, hash, snapshot export/import
//! - `check`: etcd's request validation (`check_txn`, `validate_*`)
//! - `lease`: the replicated lease table (grant, revoke with its keys, lookups)
//! - `auth`: the replicated auth store (users, roles, permissions) and simple tokens
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use redb::{Durability, ReadableTable, TableHandle};

use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::{MemberRecord, StoreSnapshot};
use crate::proto::mvccpb;
use crate::storage::Db;

/// Evaluates `$body` with `$t` bound to table `$def` as of batch `$batch`: its write
/// transaction's, or without one the committed table (only a batch with a write
/// transaction changes a table besides `kv_revs`).
macro_rules! with_batch_table {
    ($batch:expr, $def:expr, |$t:ident| $body:expr) => {
        match &$batch.txn {
            Some(txn) => {
                let $t = txn.open_table($def)?;
                let value = $body;
                value
            }
            None => {
                let $t = $batch.store.db.begin_read()?.open_table($def)?;
                let value = $body;
                value
            }
        }
    };
}

mod apply;
mod auth;
mod check;
mod compaction;
mod exec;
mod history;
mod index;
mod lease;
mod pending;
mod range;
pub mod snapfile;
mod tables;
#[cfg(test)]
mod tests;

pub use apply::{Applied, AppliedKind, Effect, Outcome};
pub use auth::{AuthState, DEFAULT_TOKEN_TTL, ROOT};
pub use check::{check_txn, is_read_only, validate_delete_range, validate_put, validate_range};
pub use lease::MAX_LEASE_TTL;

use exec::Exec;
use history::WriteTables;
use index::{KeyIndex, Shared, Version, View};
use pending::{Pending, Revs};
pub(crate) use range::Interval;
use tables::{Meta, ALARMS, MEMBERS, META, REVS};

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The requested revision is older than the compact revision (retryable with a newer one).
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    /// The requested revision has not happened yet.
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    /// ignore_value / ignore_lease on a missing key, or an empty op in a txn.
    #[error("etcdserver: key not found")]
    KeyNotFound,
    /// The store itself failed: never the request's fault, and fatal to applying.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A request without a key.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    /// A Put with ignore_value that also carries a value.
    #[error("etcdserver: value is provided")]
    ValueProvided,
    /// A Put with ignore_lease that also carries a lease.
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    /// A Range with an unknown sort order or target.
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    /// A Txn branch (or compare list) longer than the configured maximum.
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    /// A key put twice, or put and deleted, within one Txn branch.
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    /// A NOSPACE alarm is active: writes that add data are refused until it is disarmed.
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    /// An alarm request with an action or type the state machine does not apply.
    #[error("etcdserver: invalid alarm request")]
    InvalidAlarm,
    /// A Put names a lease that does not exist, or a revoke / keep-alive an unknown lease.
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    /// A grant with a client-chosen ID that is already taken.
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    /// A grant whose TTL exceeds the maximum.
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// `txn_read` was given a Txn that may write.
    #[error("kv: txn_read given a txn that writes")]
    WriteInReadOnlyTxn,
    /// The auth store changed between the permission check of a write and its apply:
    /// the proposer checks again and proposes again (clients do not see it).
    #[error("etcdserver: revision of auth store is old")]
    AuthOldRevision,
    /// A read's snapshot and the key index disagreed (a compaction or a restore was
    /// being committed): the read starts over and callers never see this.
    #[error("kv: the key index changed during a read")]
    Stale,

    // -- auth (etcd's texts) --
    /// Auth enable without a `root` user.
    #[error("etcdserver: root user does not exist")]
    RootUserNotExist,
    /// Auth enable while `root` lacks the `root` role.
    #[error("etcdserver: root user does not have root role")]
    RootRoleNotExist,
    #[error("etcdserver: user name already exists")]
    UserAlreadyExist,
    /// A user operation without a user name, or a request without a token when auth
    /// is enabled.
    #[error("etcdserver: user name is empty")]
    UserEmpty,
    #[error("etcdserver: user name not found")]
    UserNotFound,
    #[error("etcdserver: role name already exists")]
    RoleAlreadyExist,
    #[error("etcdserver: role name not found")]
    RoleNotFound,
    #[error("etcdserver: role name is empty")]
    RoleEmpty,
    /// Wrong user or password (or a user without a password).
    #[error("etcdserver: authentication failed, invalid user ID or password")]
    AuthFailed,
    #[error("etcdserver: permission not given")]
    PermissionNotGiven,
    /// The user lacks the permission (or the root role) the request needs.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    #[error("etcdserver: role is not granted to the user")]
    RoleNotGranted,
    #[error("etcdserver: permission is not granted to the role")]
    PermissionNotGranted,
    #[error("etcdserver: authentication is not enabled")]
    AuthNotEnabled,
    /// A token that is unknown or expired.
    #[error("etcdserver: invalid auth token")]
    InvalidAuthToken,
    /// Deleting root, or its root role, while auth is enabled.
    #[error("etcdserver: invalid auth management")]
    InvalidAuthMgmt,
}

impl KvError {
    /// A failure of the store itself (the disk, the engine, a record that fails its
    /// checksum), as opposed to an answer about the request.
    pub fn is_fatal(&self) -> bool {
        matches!(self, KvError::Store(_))
    }
}

/// A failure of the store itself: the disk, the engine, or data that does not decode
/// or fails its checksum. The source error is kept for the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A read or write of the disk failed (the disk, not the data, is the problem:
    /// e.g. it is full). The Raft driver recovers by reopening the database.
    #[error("storage: {0}")]
    Io(#[source] redb::Error),
    /// The engine failed otherwise (e.g. it found its own file damaged).
    #[error("storage: {0}")]
    Engine(#[source] redb::Error),
    /// A stored record does not decode.
    #[error("storage: undecodable record: {0}")]
    Decode(#[source] prost::DecodeError),
    /// A snapshot file could not be read or written.
    #[error("storage: snapshot file: {0}")]
    File(#[source] std::io::Error),
    /// Stored data contradicts itself (a snapshot file's framing, the key index
    /// against its table).
    #[error("storage: {0}")]
    Inconsistent(String),
    /// A stored record failed its checksum: the data dir is corrupt and the record is
    /// not served. Clients get etcd's corruption error (DataLoss); the log gets this.
    #[error("data dir is corrupt: {detail} in {table}")]
    Corrupt { table: &'static str, detail: String },
}

/// Every redb error becomes `Io` (the disk failed) or `Storage` (anything else).
macro_rules! storage_error_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for KvError {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
                        KvError::Store(StoreError::Io(e))
                    }
                    e => KvError::Store(StoreError::Engine(e)),
                }
            }
        }
    )*};
}
storage_error_from!(
    redb::Error,
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError,
);

impl From<prost::DecodeError> for KvError {
    fn from(e: prost::DecodeError) -> Self {
        KvError::Store(StoreError::Decode(e))
    }
}

pub struct KvStore {
    db: Arc<Db>,
    /// Last published values; readers that need them consistent take `pending.meta`.
    applied_index: AtomicU64,
    current_revision: AtomicI64,
    compact_revision: AtomicI64,
    /// Whether a NOSPACE alarm is active (as of the last commit).
    nospace: AtomicBool,
    /// Announces the current revision after each commit.
    revision_tx: tokio::sync::watch::Sender<i64>,
    /// The auth store as of the last commit.
    auth: std::sync::RwLock<Arc<AuthState>>,
    /// Simple tokens this member knows (in memory only).
    tokens: auth::Tokens,
    /// The newest revisions' events, shared by the watchers that ask for them.
    recent_events: std::sync::Mutex<EventCache>,
    /// Every kept version of every key (see `index`).
    index: RwLock<KeyIndex>,
    /// Records redb does not hold yet, and the published counters (see `pending`).
    pending: RwLock<Pending>,
    /// A record failed its checksum when the store was opened for Raft.
    corrupt_at_open: std::sync::Mutex<Option<String>>,
    /// What the compactions applied so far still have to remove (see `compaction`).
    compaction: std::sync::Mutex<compaction::Job>,
    /// The compact revision whose removals are all done.
    physically_compacted: tokio::sync::watch::Sender<i64>,
}

/// The newest revisions' events (every key, with previous values), read from the
/// store once and kept for the watchers that follow: a put watched by thousands of
/// watchers, each at its own position, is read once, not once per watcher. The
/// window is contiguous: every event of revisions `first..=last` is here, oldest
/// first (a revision with none has none here). Applied revisions never change, so
/// the window stays right until compaction removes its revisions or the store is
/// replaced (a snapshot, a reopen), which clear it.
#[derive(Default)]
struct EventCache {
    /// `(first, last)` revision held.
    window: Option<(i64, i64)>,
    events: std::collections::VecDeque<mvccpb::Event>,
}

/// The revision an event belongs to.
fn event_revision(e: &mvccpb::Event) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// Removes from the index, and from the pending records, what a dropped batch added.
struct Rollback<'a> {
    store: &'a KvStore,
    /// The published revision the batch started from.
    base_revision: i64,
    /// Whether the batch added versions that no commit has made permanent.
    pending: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.pending {
            index::write(&self.store.index).rollback(self.base_revision);
            pending::write(&self.store.pending).truncate_above(self.base_revision);
        }
    }
}

enum IndexEffect {
    /// A compaction to this revision: its removals start after the commit.
    Compact(i64),
    Replace(KeyIndex),
}

/// How many times a read starts over on `KvError::Stale` before it gives up: the
/// window it waits out is one commit's index update.
const STALE_RETRIES: u32 = 10_000;

/// Only spans this short start a new cache window (live delivery, not replay of
/// history).
const EVENT_CACHE_SPAN: i64 = 64;
/// Most revisions, and events beyond the reader's own, the cache keeps.
const EVENT_CACHE_REVISIONS: i64 = 4096;
const EVENT_CACHE_EVENTS: usize = 65_536;

/// What the Raft driver applies at once, committed or published together. Dropping
/// it aborts.
pub struct ApplyBatch<'a> {
    store: &'a KvStore,
    /// redb's write transaction, once the batch needs one (see `pending`); the pending
    /// records are written into it first.
    txn: Option<redb::WriteTransaction>,
    /// Until then, what redb has committed: every record up to `pending.flushed`, and
    /// the tables only a batch with a write transaction changes.
    committed: Option<Committed>,
    /// The versions this batch added to the key index, taken back if it is dropped.
    added: Rollback<'a>,
    /// Index changes that must wait for the commit: older snapshots still need what
    /// they remove.
    index_effects: Vec<IndexEffect>,
    /// A snapshot was restored: the index no longer describes this batch's tables.
    restored: bool,
    /// The counters as this batch has changed them, written to `kv_meta` on commit.
    meta: Meta,
    /// Whether a NOSPACE alarm is active, as of this batch's own changes.
    nospace: bool,
    /// The auth store changed: republish it on commit.
    auth_changed: bool,
    /// Token changes to make once the batch is committed.
    token_effects: Vec<auth::TokenEffect>,
}

/// A batch's read of what redb has committed.
struct Committed {
    txn: redb::ReadTransaction,
    revs: ReadRevs,
    /// `pending.flushed` when it began: `revs` holds every record up to this.
    covers: i64,
}

impl Committed {
    fn open(store: &KvStore) -> Result<Committed, KvError> {
        let covers = pending::read(&store.pending).flushed;
        let txn = store.db.begin_read()?;
        let revs = txn.open_table(REVS)?;
        Ok(Committed { txn, revs, covers })
    }
}

impl KvStore {
    /// [`KvStore::open`] for a member: a record that fails its checksum while the key
    /// index is built does not stop the open; the store then holds no keys and
    /// [`KvStore::corrupt_at_open`] says why, and the member must serve nothing from it.
    pub fn open_for_raft(db: Arc<Db>) -> Result<KvStore, KvError> {
        let store = KvStore::new(db)?;
        store.load(true)?;
        Ok(store)
    }

    pub fn open(db: Arc<Db>) -> Result<KvStore, KvError> {
        let store = KvStore::new(db)?;
        store.reload()?;
        Ok(store)
    }

    fn new(db: Arc<Db>) -> Result<KvStore, KvError> {
        create_tables(&db)?;
        convert_legacy_layout(&db)?;
        let (revision_tx, _) = tokio::sync::watch::channel(0);
        let store = KvStore {
            db,
            applied_index: AtomicU64::new(0),
            current_revision: AtomicI64::new(0),
            compact_revision: AtomicI64::new(0),
            nospace: AtomicBool::new(false),
            revision_tx,
            auth: std::sync::RwLock::new(Arc::new(AuthState::default())),
            tokens: auth::Tokens::default(),
            recent_events: Default::default(),
            index: RwLock::new(KeyIndex::default()),
            pending: RwLock::new(Pending::new(Meta::default())),
            corrupt_at_open: std::sync::Mutex::new(None),
            compaction: Default::default(),
            physically_compacted: tokio::sync::watch::channel(0).0,
        };
        Ok(store)
    }

    /// Re-reads the counters, alarms, auth store and key index from the database, after it was
    /// reopened from disk: commits made since the last durable one are gone, and the
    /// driver applies those entries again. Watchers keep their own next revision, so
    /// the revision going back and forward again sends no event twice.
    pub fn reload(&self) -> Result<(), KvError> {
        self.load(false)
    }

    /// What made [`KvStore::open_for_raft`] find the store corrupt, if it did.
    pub fn corrupt_at_open(&self) -> Option<String> {
        self.corrupt_at_open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn load(&self, lenient: bool) -> Result<(), KvError> {
        self.clear_event_cache();
        let txn = self.db.begin_read()?;
        let meta = Meta::load(&txn.open_table(META)?)?;
        let nospace = nospace_active(&txn.open_table(ALARMS)?)?;
        let auth = AuthState::from_snapshot(&auth::load(&txn.open_table(auth::AUTH)?)?);
        let started = std::time::Instant::now();
        let loaded = KeyIndex::load(&txn.open_table(REVS)?, meta.index_epoch);
        if let Ok(index) = &loaded {
            tracing::info!(
                keys = index.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "key index rebuilt from every record"
            );
        }
        let mut whole = true;
        let loaded = match (loaded, lenient) {
            (Ok(index), _) => index,
            // Opening for Raft: the member starts quarantined instead of not at all,
            // so the cluster hears about it (see `KvStore::corrupt_at_open`).
            (Err(e @ KvError::Store(StoreError::Corrupt { .. })), true) => {
                *self
                    .corrupt_at_open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                whole = false;
                KeyIndex::default()
            }
            (Err(e), _) => return Err(e),
        };
        *index::write(&self.index) = loaded;
        {
            let mut job = compaction::lock(&self.compaction);
            // A quarantined member's empty index lists nothing to remove, and must not
            // record that as done.
            let rev = if whole { meta.compact_revision } else { 0 };
            job.restart(rev, meta.removed_through);
            self.publish_compacted(&job);
        }
        *pending::write(&self.pending) = Pending::new(meta);
        self.applied_index
            .store(meta.applied_index, Ordering::Release);
        self.current_revision
            .store(meta.current_revision, Ordering::Release);
        self.compact_revision
            .store(meta.compact_revision, Ordering::Release);
        self.nospace.store(nospace, Ordering::Release);
        *self.auth.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(auth);
        self.revision_tx.send_replace(meta.current_revision);
        Ok(())
    }

    /// The auth store as of the last commit.
    pub fn auth(&self) -> Arc<AuthState> {
        self.auth.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The user a simple token belongs to, if it is live (its expiry is refreshed).
    pub fn token_user(&self, token: &str) -> Option<String> {
        self.tokens.user(token)
    }

    /// How many simple tokens this member holds live now (counting refreshes none).
    pub fn live_tokens(&self) -> usize {
        self.tokens.live()
    }

    /// How long a simple token lives after its last use (`--auth-token-ttl`).
    pub fn set_token_ttl(&self, ttl: std::time::Duration) {
        self.tokens.set_ttl(ttl);
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::Acquire)
    }

    pub fn current_revision(&self) -> i64 {
        self.current_revision.load(Ordering::Acquire)
    }

    pub fn compact_revision(&self) -> i64 {
        self.compact_revision.load(Ordering::Acquire)
    }

    /// A receiver that sees the current revision after every commit.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.revision_tx.subscribe()
    }

    /// Starts a batch for applying entries. It opens redb's write transaction only
    /// when it needs one (see `pending`). redb allows one writer at a time: that blocks
    /// while another batch (or any other writer of the database) holds it, so the one
    /// thread that writes must commit or drop a batch before the next.
    pub fn begin(&self) -> Result<ApplyBatch<'_>, KvError> {
        // The driver is the only writer: what it published last is the state.
        let meta = pending::read(&self.pending).meta;
        Ok(ApplyBatch {
            store: self,
            txn: None,
            committed: None,
            added: Rollback {
                store: self,
                base_revision: meta.current_revision,
                pending: false,
            },
            index_effects: Vec::new(),
            restored: false,
            meta,
            nospace: self.nospace(),
            auth_changed: false,
            token_effects: Vec::new(),
        })
    }

    /// redb's write transaction with the pending records written into it: everything
    /// applied so far, for a batch that changes more than `kv_revs`.
    fn begin_write_flushed(&self) -> Result<redb::WriteTransaction, KvError> {
        let txn = self.db.begin_write()?;
        {
            let p = pending::read(&self.pending);
            if !p.rows().is_empty() {
                let mut revs = txn.open_table(REVS)?;
                for (rev, record) in p.rows() {
                    revs.insert(*rev, record.as_slice())?;
                }
            }
        }
        Ok(txn)
    }

    /// How many records wait in memory for a commit (see `pending`).
    pub fn pending_records(&self) -> usize {
        pending::read(&self.pending).rows().len()
    }

    /// Writes the pending records into redb with a commit of their own (fsync'ed only
    /// if `durable`).
    pub fn write_pending(&self, durable: bool) -> Result<(), KvError> {
        let mut batch = self.begin()?;
        batch.write_txn()?;
        batch.commit(durable)?;
        Ok(())
    }

    /// Test-only fault (`meshpb.FaultInjection`): flips one byte of the stored record of
    /// revision `rev` behind the state machine's back, with a valid database commit, as
    /// a disk that returns other bytes than it was given would. Only the record's own
    /// checksum can tell. Must run on the thread that writes the database.
    pub fn inject_corruption(&self, rev: i64) -> Result<(), KvError> {
        self.write_pending(true)?;
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(REVS)?;
            let mut raw = match t.get((rev, 0))? {
                Some(v) => v.value().to_vec(),
                None => return Err(KvError::FutureRevision),
            };
            let at = raw.len() / 2;
            raw[at] ^= 0x01;
            t.insert((rev, 0), raw.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// What a view reads besides its own table.
    fn shared(&self) -> Shared<'_> {
        Shared {
            pending: &self.pending,
            db: &self.db,
            index: &self.index,
        }
    }

    /// Run `f` on one consistent view (the published counters, a read transaction
    /// begun after them, and the pending records), starting over while the key index
    /// is being brought in step with a commit.
    fn snapshot_read<T>(
        &self,
        f: impl Fn(View<'_>, &Meta, &redb::ReadTransaction) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        for attempt in 0..STALE_RETRIES {
            let (meta, covers) = {
                let p = pending::read(&self.pending);
                (p.meta, p.flushed)
            };
            let txn = self.db.begin_read()?;
            let stored = Meta::load(&txn.open_table(META)?)?;
            let revs = txn.open_table(REVS)?;
            // A commit between taking the counters and beginning the transaction (one
            // that compacted, or changed a table only commits change) is published
            // next: start over with it.
            let result = if stored.index_epoch != meta.index_epoch
                || stored.applied_index > meta.applied_index
            {
                Err(KvError::Stale)
            } else {
                let view = View::snapshot(
                    Revs::Read(&revs),
                    covers,
                    self.shared(),
                    meta.current_revision,
                    meta.index_epoch,
                );
                f(view, &meta, &txn)
            };
            match result {
                Err(KvError::Stale) if attempt < 100 => std::thread::yield_now(),
                Err(KvError::Stale) => std::thread::sleep(std::time::Duration::from_millis(1)),
                done => return done,
            }
        }
        Err(KvError::Store(StoreError::Inconsistent(
            "the key index stayed out of step with the store".into(),
        )))
    }

    /// Run a read-only request against one consistent read transaction.
    fn read<T>(&self, f: impl Fn(&mut Exec<'_>) -> Result<T, KvError>) -> Result<T, KvError> {
        self.snapshot_read(|view, meta, _| {
            let mut exec = Exec::new(
                view,
                None,
                meta.current_revision,
                meta.compact_revision,
                false,
            );
            f(&mut exec)
        })
    }

    pub fn range(&self, req: &pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        self.read(|exec| exec.range(req))
    }

    /// Evaluate a Txn that cannot write against the current state.
    pub fn txn_read(&self, req: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        if !is_read_only(req) {
            return Err(KvError::WriteInReadOnlyTxn);
        }
        self.read(|exec| exec.txn_top(req))
    }

    /// Events with `start ≤ main revision ≤ end` on keys in the watch range, in
    /// revision order, at most `limit` (0 = all) but never splitting a revision.
    pub fn events(
        &self,
        start: i64,
        end: i64,
        key: &[u8],
        range_end: &[u8],
        prev_kv: bool,
        limit: usize,
    ) -> Result<Vec<mvccpb::Event>, KvError> {
        let interval = Interval::new(key, range_end);
        // Only applied revisions are cached: later ones may still come. The compact
        // revision's own events are read from the store, which knows what the
        // compaction removed (see `history::events`).
        if start <= end && start > self.compact_revision() && end <= self.current_revision() {
            let mut cache = self.recent_events.lock().unwrap_or_else(|p| p.into_inner());
            if !self.cache_events(&mut cache, start, end)? {
                drop(cache);
                return self.events_from_store(start, end, &interval, prev_kv, limit);
            }
            let from = cache.events.partition_point(|e| event_revision(e) < start);
            let mut out = Vec::new();
            let mut last_main = None;
            for e in cache.events.range(from..) {
                if event_revision(e) > end {
                    break;
                }
                let Some(kv) = &e.kv else { continue };
                // Whole revisions only, as the store read below.
                if limit > 0 && out.len() >= limit && last_main != Some(kv.mod_revision) {
                    break;
                }
                if !interval.contains(&kv.key) {
                    continue;
                }
                let mut e = e.clone();
                if !prev_kv {
                    e.prev_kv = None;
                }
                out.push(e);
                last_main = Some(kv.mod_revision);
            }
            return Ok(out);
        }
        self.events_from_store(start, end, &interval, prev_kv, limit)
    }

    /// Makes the cache hold every event of revisions `start..=end` (applied, not
    /// compacted), reading from the store only the revisions it lacks: a reader whose
    /// span starts in the window, however far behind the head, is served from it,
    /// as a watcher that fell behind under load must not fall further by reading
    /// the store. False if the span is older than the window, or a long one outside
    /// it (a replay of history): such a reader reads the store itself rather than
    /// pull the window away from the watchers at the head.
    ///
    /// Called with the cache locked: the watchers that wake together for the same
    /// revisions wait for one read instead of each doing it.
    fn cache_events(&self, cache: &mut EventCache, start: i64, end: i64) -> Result<bool, KvError> {
        let all = Interval::From(Vec::new());
        match cache.window {
            Some((first, _)) if start < first => return Ok(false),
            Some((first, last)) if start <= last + 1 => {
                if end > last {
                    let more = self.events_from_store(last + 1, end, &all, true, 0)?;
                    cache.events.extend(more);
                    cache.window = Some((first, end));
                }
            }
            _ if end - start >= EVENT_CACHE_SPAN => return Ok(false),
            _ => {
                cache.events = self.events_from_store(start, end, &all, true, 0)?.into();
                cache.window = Some((start, end));
            }
        }
        // Trim the oldest revisions, never those this reader asked for.
        let Some((mut first, last)) = cache.window else {
            return Ok(true);
        };
        while first < start
            && (last - first >= EVENT_CACHE_REVISIONS || cache.events.len() > EVENT_CACHE_EVENTS)
        {
            first += 1;
            while cache
                .events
                .front()
                .is_some_and(|e| event_revision(e) < first)
            {
                cache.events.pop_front();
            }
        }
        cache.window = Some((first, last));
        Ok(true)
    }

    fn clear_event_cache(&self) {
        let mut cache = self.recent_events.lock().unwrap_or_else(|p| p.into_inner());
        cache.window = None;
        cache.events.clear();
    }

    fn events_from_store(
        &self,
        start: i64,
        end: i64,
        interval: &Interval,
        prev_kv: bool,
        limit: usize,
    ) -> Result<Vec<mvccpb::Event>, KvError> {
        self.snapshot_read(|view, meta, _| {
            if start < meta.compact_revision {
                return Err(KvError::Compacted {
                    compact_revision: meta.compact_revision,
                });
            }
            history::events(
                &view,
                (start, end),
                interval,
                prev_kv,
                limit,
                meta.compact_revision,
            )
        })
    }

    pub fn members(&self) -> Result<Vec<MemberRecord>, KvError> {
        let txn = self.db.begin_read()?;
        read_members(&txn.open_table(MEMBERS)?)
    }

    /// The applied index and the whole replicated state, from one consistent view.
    pub fn snapshot(&self) -> Result<(u64, StoreSnapshot), KvError> {
        self.snapshot_read(|view, meta, txn| {
            let snap = StoreSnapshot {
                history: history::export(&view, meta.compact_revision)?,
                ..snapshot_without_history(meta, txn)?
            };
            Ok((meta.applied_index, snap))
        })
    }

    /// `(hash, compact_revision, hash_revision)` over the history up to `rev` (0 = current).
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64), KvError> {
        self.snapshot_read(|view, meta, _| {
            let rev = if rev <= 0 { meta.current_revision } else { rev };
            if rev > meta.current_revision {
                return Err(KvError::FutureRevision);
            }
            if rev < meta.compact_revision {
                return Err(KvError::Compacted {
                    compact_revision: meta.compact_revision,
                });
            }
            let mut hasher = history::HashKv::default();
            hasher.records(&view, rev, meta.compact_revision)?;
            Ok((hasher.finish(), meta.compact_revision, rev))
        })
    }

    /// Every active alarm, ordered by member ID then type.
    pub fn alarms(&self) -> Result<Vec<pb::AlarmMember>, KvError> {
        let txn = self.db.begin_read()?;
        read_alarms(&txn.open_table(ALARMS)?)
    }

    /// Whether a NOSPACE alarm is active (writes that add data are refused).
    pub fn nospace(&self) -> bool {
        self.nospace.load(Ordering::Acquire)
    }

    /// A checksum of the whole replicated state (etcd's Hash): every history record,
    /// the revision counters, the member table and the alarms, from one read txn.
    pub fn hash(&self) -> Result<u32, KvError> {
        self.snapshot_read(|view, meta, txn| {
            let mut hasher = history::KvHasher::default();
            hasher.records(&view, i64::MAX, meta.compact_revision)?;
            hasher.extra(&meta.current_revision.to_le_bytes());
            hasher.extra(&meta.compact_revision.to_le_bytes());
            for m in read_members(&txn.open_table(MEMBERS)?)? {
                hasher.extra(&m.encode_to_vec());
            }
            for a in read_alarms(&txn.open_table(ALARMS)?)? {
                hasher.extra(&a.encode_to_vec());
            }
            Ok(hasher.finish())
        })
    }
}

pub(crate) type ReadRevs = redb::ReadOnlyTable<(i64, i64), &'static [u8]>;

/// Everything a snapshot holds but the history: counters, members, alarms, leases,
/// auth.
fn snapshot_without_history(
    meta: &Meta,
    txn: &redb::ReadTransaction,
) -> Result<StoreSnapshot, KvError> {
    Ok(StoreSnapshot {
        revision: meta.current_revision,
        compact_revision: meta.compact_revision,
        history: Vec::new(),
        members: read_members(&txn.open_table(MEMBERS)?)?,
        alarms: read_alarms(&txn.open_table(ALARMS)?)?,
        leases: lease::export(&txn.open_table(tables::LEASES)?)?,
        auth: Some(auth::load(&txn.open_table(auth::AUTH)?)?),
    })
}

fn read_members<T: ReadableTable<u64, &'static [u8]>>(
    table: &T,
) -> Result<Vec<MemberRecord>, KvError> {
    let mut out = Vec::new();
    for entry in table.range::<u64>(..)? {
        out.push(MemberRecord::decode(entry?.1.value())?);
    }
    Ok(out)
}

fn read_alarms<T: ReadableTable<(u64, i32), ()>>(
    table: &T,
) -> Result<Vec<pb::AlarmMember>, KvError> {
    let mut out = Vec::new();
    for entry in table.range::<(u64, i32)>(..)? {
        let (member_id, alarm) = entry?.0.value();
        out.push(pb::AlarmMember { member_id, alarm });
    }
    Ok(out)
}

/// Creates the keyspace's tables in a fresh database (one durable commit).
fn create_tables(db: &Db) -> Result<(), KvError> {
    let txn = db.begin_write()?;
    txn.open_table(REVS)?;
    txn.open_table(MEMBERS)?;
    txn.open_table(ALARMS)?;
    txn.open_table(tables::LEASES)?;
    txn.open_table(tables::LEASE_KEYS)?;
    txn.open_table(auth::AUTH)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(())
}

/// Moves a data dir written before `kv_revs` to it (one durable commit): the
/// versions-by-key table holds every kept version, and the other two are derived.
fn convert_legacy_layout(db: &Db) -> Result<(), KvError> {
    use tables::{LEGACY_HISTORY, LEGACY_LATEST, LEGACY_REVLOG};
    let txn = db.begin_write()?;
    let legacy = txn
        .list_tables()?
        .any(|t| t.name() == LEGACY_HISTORY.name());
    if !legacy {
        return Ok(());
    }
    let mut versions = 0usize;
    {
        let history = txn.open_table(LEGACY_HISTORY)?;
        let mut revs = txn.open_table(REVS)?;
        for entry in history.range::<(&[u8], i64, i64)>(..)? {
            let (hk, raw) = entry?;
            let (_, main, sub) = hk.value();
            revs.insert((main, sub), raw.value())?;
            versions += 1;
        }
    }
    txn.delete_table(LEGACY_HISTORY)?;
    txn.delete_table(LEGACY_LATEST)?;
    txn.delete_table(LEGACY_REVLOG)?;
    txn.commit()?;
    tracing::info!(
        versions,
        "converted the keyspace to the revision-keyed layout"
    );
    Ok(())
}

fn nospace_active<T: ReadableTable<(u64, i32), ()>>(table: &T) -> Result<bool, KvError> {
    for entry in table.range::<(u64, i32)>(..)? {
        if entry?.0.value().1 == pb::AlarmType::Nospace as i32 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a Txn may put (in either branch, nested txns included): refused under NOSPACE.
fn txn_puts(req: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as Op;
    req.success
        .iter()
        .chain(&req.failure)
        .any(|op| match &op.request {
            Some(Op::RequestPut(_)) => true,
            Some(Op::RequestTxn(t)) => txn_puts(t),
            _ => false,
        })
}

impl<'a> ApplyBatch<'a> {
    /// The records kept beside the keyspace (the Raft log's point and conf state, the
    /// member identity), written in this batch's transaction to commit with it.
    pub fn side(&mut self) -> Result<crate::storage::SideTxn<'_>, KvError> {
        Ok(crate::storage::SideTxn::new(self.write_txn()?))
    }

    /// The write transaction, opened now if the batch has none.
    pub(crate) fn write_txn(&mut self) -> Result<&redb::WriteTransaction, KvError> {
        self.committed = None;
        let txn = match &mut self.txn {
            Some(txn) => txn,
            slot @ None => slot.insert(self.store.begin_write_flushed()?),
        };
        Ok(txn)
    }

    /// Execute one write request; store its changes only if all of it succeeded.
    fn apply<T>(
        &mut self,
        run: impl FnOnce(&mut Exec<'_>) -> Result<T, KvError>,
    ) -> Result<T, KvError> {
        self.ensure_index_current()?;
        let main = self.meta.current_revision + 1;
        let (base, compact) = (self.meta.current_revision, self.meta.compact_revision);
        let shared = self.store.shared();
        let (response, changes) = if let Some(txn) = &self.txn {
            let mut tables = WriteTables::open(txn)?;
            let leases = exec::TxnLeases(txn);
            let (response, changes) = {
                let view = View::batch(Revs::Write(&tables.revs), i64::MAX, shared);
                let mut exec = Exec::new(view, Some(&leases), base, compact, true);
                let response = run(&mut exec)?;
                (response, exec.into_changes())
            };
            tables.apply(main, &changes)?;
            (response, changes)
        } else {
            let c = match &mut self.committed {
                Some(c) => c,
                slot @ None => slot.insert(Committed::open(self.store)?),
            };
            let leases = exec::ReadLeases(&c.txn);
            let view = View::batch(Revs::Read(&c.revs), c.covers, shared);
            let mut exec = Exec::new(view, Some(&leases), base, compact, true);
            let response = run(&mut exec)?;
            let changes = exec.into_changes();
            if changes.iter().any(exec::Change::moves_lease) {
                // The lease attachments are a table: this batch needs its transaction.
                WriteTables::open(self.write_txn()?)?.apply(main, &changes)?;
            } else if !changes.is_empty() {
                let mut p = pending::write(&self.store.pending);
                for (sub, change) in changes.iter().enumerate() {
                    let record = tables::encode_record(change.tombstone, &change.kv);
                    p.push((main, sub as i64), record);
                }
            }
            (response, changes)
        };
        if !changes.is_empty() {
            let mut index = index::write(&self.store.index);
            for (sub, change) in changes.into_iter().enumerate() {
                let version = Version::new(main, sub as i64, change.tombstone, &change.kv);
                index.add(change.kv.key, version);
            }
            self.added.pending = true;
            self.meta.current_revision = main;
        }
        Ok(response)
    }

    /// Requests and compactions read the live key index; after a restore in this
    /// batch it describes the tables no longer (the driver commits a restore on its
    /// own, so this never refuses anything it sends).
    fn ensure_index_current(&self) -> Result<(), KvError> {
        if self.restored {
            return Err(KvError::Store(StoreError::Inconsistent(
                "a batch that restored a snapshot must be committed before it applies requests"
                    .into(),
            )));
        }
        Ok(())
    }

    pub fn put(&mut self, req: &pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        if self.nospace {
            return Err(KvError::NoSpace);
        }
        self.apply(|exec| exec.put(req))
    }

    pub fn delete_range(
        &mut self,
        req: &pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        self.apply(|exec| exec.delete_range(req))
    }

    pub fn txn(&mut self, req: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        if self.nospace && txn_puts(req) {
            return Err(KvError::NoSpace);
        }
        self.apply(|exec| exec.txn_top(req))
    }

    /// Drop history older than `rev`; does not create a revision.
    pub fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        if rev > self.meta.current_revision {
            return Err(KvError::FutureRevision);
        }
        if rev <= self.meta.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.meta.compact_revision,
            });
        }
        self.ensure_index_current()?;
        // The new counters are committed with this batch's transaction; what the
        // revision supersedes goes after the commit (see `compaction`).
        self.write_txn()?;
        self.index_effects.push(IndexEffect::Compact(rev));
        self.meta.compact_revision = rev;
        self.meta.index_epoch += 1;
        Ok(())
    }

    /// A member record as of this batch (including its own changes).
    pub fn member(&self, id: u64) -> Result<Option<MemberRecord>, KvError> {
        with_batch_table!(self, MEMBERS, |table| match table.get(id)? {
            Some(v) => Ok(Some(MemberRecord::decode(v.value())?)),
            None => Ok(None),
        })
    }

    pub fn put_member(&mut self, m: &MemberRecord) -> Result<(), KvError> {
        self.write_txn()?
            .open_table(MEMBERS)?
            .insert(m.id, m.encode_to_vec().as_slice())?;
        Ok(())
    }

    pub fn remove_member(&mut self, id: u64) -> Result<(), KvError> {
        self.write_txn()?.open_table(MEMBERS)?.remove(id)?;
        Ok(())
    }

    /// Whether a NOSPACE alarm is active as of this batch: requests that add data
    /// (Put, Txn with puts, LeaseGrant) must be refused with [`KvError::NoSpace`].
    pub fn nospace(&self) -> bool {
        self.nospace
    }

    /// Raises (ACTIVATE) or clears (DEACTIVATE) one alarm; returns the alarm if it
    /// changed anything, as etcd does.
    pub fn alarm(&mut self, req: &pb::AlarmRequest) -> Result<Vec<pb::AlarmMember>, KvError> {
        use pb::alarm_request::AlarmAction;
        if req.alarm == pb::AlarmType::None as i32 || pb::AlarmType::try_from(req.alarm).is_err() {
            return Err(KvError::InvalidAlarm);
        }
        let member = pb::AlarmMember {
            member_id: req.member_id,
            alarm: req.alarm,
        };
        let (changed, nospace) = {
            let mut table = self.write_txn()?.open_table(ALARMS)?;
            let changed = match AlarmAction::try_from(req.action) {
                Ok(AlarmAction::Activate) => {
                    table.insert((req.member_id, req.alarm), ())?.is_none()
                }
                Ok(AlarmAction::Deactivate) => table.remove((req.member_id, req.alarm))?.is_some(),
                _ => return Err(KvError::InvalidAlarm),
            };
            (changed, nospace_active(&table)?)
        };
        self.nospace = nospace;
        Ok(if changed || req.action == AlarmAction::Activate as i32 {
            vec![member]
        } else {
            vec![]
        })
    }

    /// Replace every kv table's contents with the snapshot's.
    pub fn restore(&mut self, snap: &StoreSnapshot) -> Result<(), KvError> {
        self.store.clear_event_cache();
        let txn = self.write_txn()?;
        WriteTables::open(txn)?.restore(snap)?;
        let mut members = txn.open_table(MEMBERS)?;
        members.retain(|_, _| false)?;
        for m in &snap.members {
            members.insert(m.id, m.encode_to_vec().as_slice())?;
        }
        let mut alarms = txn.open_table(ALARMS)?;
        alarms.retain(|_, _| false)?;
        for a in &snap.alarms {
            alarms.insert((a.member_id, a.alarm), ())?;
        }
        let nospace = nospace_active(&alarms)?;
        auth::store(
            &mut txn.open_table(auth::AUTH)?,
            &snap.auth.clone().unwrap_or_default(),
        )?;
        drop((members, alarms));
        self.nospace = nospace;
        self.meta.index_epoch += 1;
        self.index_effects
            .push(IndexEffect::Replace(KeyIndex::from_records(
                &snap.history,
                self.meta.index_epoch,
            )));
        self.restored = true;
        self.auth_changed = true;
        // Tokens are not part of a snapshot: the ones this member knew may be stale.
        self.token_effects.push(auth::TokenEffect::Clear);
        self.meta.current_revision = snap.revision.max(tables::INITIAL_REVISION);
        self.meta.compact_revision = snap.compact_revision;
        self.meta.removed_through = 0;
        Ok(())
    }

    pub fn set_applied_index(&mut self, index: u64) {
        self.meta.applied_index = index;
    }

    /// The revision after what this batch has applied so far.
    pub fn revision(&self) -> i64 {
        self.meta.current_revision
    }

    /// Commit (fsync'd only if `durable`: the Raft log is the durable record, and a
    /// later durable commit makes this one durable too), then publish the new state.
    ///
    /// A batch without a write transaction is only published: its records wait in
    /// `pending`. A durable commit opens one, so everything applied reaches the disk.
    /// Returns whether redb committed (false: only published).
    pub fn commit(mut self, durable: bool) -> Result<bool, KvError> {
        if durable {
            self.write_txn()?;
        }
        self.committed = None;
        let flushed = match self.txn.take() {
            Some(mut txn) => {
                self.meta.store(&mut txn.open_table(META)?)?;
                txn.set_durability(if durable {
                    Durability::Immediate
                } else {
                    Durability::None
                })?;
                txn.commit()?;
                true
            }
            None => false,
        };
        let store = self.store;
        // Committed: the batch's versions stay, and what waited for the commit happens.
        self.added.pending = false;
        if !self.index_effects.is_empty() {
            let (mut replaced, mut compacted) = (false, None);
            {
                let mut index = index::write(&store.index);
                for effect in self.index_effects.drain(..) {
                    match effect {
                        IndexEffect::Compact(rev) => compacted = Some(rev),
                        IndexEffect::Replace(new) => {
                            *index = new;
                            replaced = true;
                        }
                    }
                }
                index.epoch = self.meta.index_epoch;
            }
            let mut job = compaction::lock(&store.compaction);
            if replaced {
                job.restart(self.meta.compact_revision, self.meta.removed_through);
            } else if let Some(rev) = compacted {
                job.start(rev);
            }
        }
        {
            let mut p = pending::write(&store.pending);
            if flushed {
                p.flushed_through(self.meta.current_revision);
            }
            p.meta = self.meta;
        }
        store
            .applied_index
            .store(self.meta.applied_index, Ordering::Release);
        store
            .compact_revision
            .store(self.meta.compact_revision, Ordering::Release);
        store
            .current_revision
            .store(self.meta.current_revision, Ordering::Release);
        store.nospace.store(self.nospace, Ordering::Release);
        if self.auth_changed {
            let state = auth::load(&store.db.begin_read()?.open_table(auth::AUTH)?)?;
            *store.auth.write().unwrap_or_else(|p| p.into_inner()) =
                Arc::new(AuthState::from_snapshot(&state));
        }
        for effect in self.token_effects.drain(..) {
            match effect {
                auth::TokenEffect::None => {}
                auth::TokenEffect::Insert { token, user } => store.tokens.insert(token, user),
                auth::TokenEffect::ForgetUser(u) => store.tokens.forget_user(&u),
                auth::TokenEffect::Clear => store.tokens.clear(),
            }
        }
        store.revision_tx.send_replace(self.meta.current_revision);
        Ok(flushed)
    }
}
