//! The compare-and-swap loop: read the semaphore with its mod_revision, apply a pure
//! change, write it back in a Txn that only succeeds if nobody wrote in between, and
//! retry on conflict. Creation on first use is guarded by `create_revision == 0`.
//! Transient failures (no leader, unreachable member) are retried for `retry_for`.
use std::time::{Duration, Instant};

use mesh_core::client::{Client, ClientError};
use mesh_core::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request;
use pb::response_op::Response;

use crate::semaphore::{LockOutcome, Refusal, Semaphore, SemaphoreError};

/// A failed locksmith operation; [`LockError::exit_code`] maps it to the documented code.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The semaphore is valid but refused the change (full, or not a holder).
    #[error("{refusal}")]
    Refused {
        refusal: Refusal,
        /// The mod_revision of the value that refused: a watch from the next revision
        /// sees every change after it.
        mod_revision: i64,
    },
    /// The stored value is not a valid semaphore; nothing was written.
    #[error("{key}: {problem} (locksmith never rewrites an invalid semaphore: correct the value by hand)")]
    Invalid {
        key: String,
        problem: SemaphoreError,
    },
    /// The cluster did not answer or answered with an error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `lock --wait --timeout` ran out before a slot became free.
    #[error("timed out after {waited} waiting for a free slot ({last})")]
    WaitTimeout { waited: String, last: Refusal },
}

/// Exit code: a generic error.
pub const EXIT_ERROR: u8 = 1;
/// Exit code: bad usage (clap's own code, also used for invalid flag values).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: no free slot (without `--wait`, or when `--timeout` expired).
pub const EXIT_NO_SLOT: u8 = 3;
/// Exit code: unlock by an ID that does not hold the lock.
pub const EXIT_NOT_HOLDER: u8 = 4;

impl LockError {
    /// The documented exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            LockError::Refused {
                refusal: Refusal::NoFreeSlot { .. },
                ..
            }
            | LockError::WaitTimeout { .. } => EXIT_NO_SLOT,
            LockError::Refused {
                refusal: Refusal::NotHolder { .. },
                ..
            } => EXIT_NOT_HOLDER,
            LockError::Invalid { .. } | LockError::Client(_) => EXIT_ERROR,
        }
    }
}

/// A semaphore value together with the revision it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub semaphore: Semaphore,
    /// The key's mod_revision: the compare of the next write.
    pub mod_revision: i64,
}

/// Whether an earlier write of this operation may have been applied although it
/// reported an error (the member died after receiving it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attempt {
    pub after_ambiguous_write: bool,
}

/// One semaphore key on a cluster.
#[derive(Debug, Clone)]
pub struct LockClient {
    client: Client,
    key: String,
    /// How long transient cluster errors are retried before giving up.
    retry_for: Duration,
}

impl LockClient {
    pub fn new(client: Client, key: String, retry_for: Duration) -> LockClient {
        LockClient {
            client,
            key,
            retry_for,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn parse(&self, kv: &mesh_core::proto::mvccpb::KeyValue) -> Result<Versioned, LockError> {
        let semaphore = Semaphore::parse(&kv.value).map_err(|problem| LockError::Invalid {
            key: self.key.clone(),
            problem,
        })?;
        Ok(Versioned {
            semaphore,
            mod_revision: kv.mod_revision,
        })
    }

    /// Retries `op` on transient errors until `retry_for` has passed.
    async fn retrying<T, F, Fut>(&self, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let deadline = Instant::now() + self.retry_for;
        let mut pause = Duration::from_millis(50);
        loop {
            match op().await {
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    tracing::debug!(error = %e, "transient error, retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// The current semaphore, created (max 1) if the key does not exist yet.
    pub async fn read(&self) -> Result<Versioned, LockError> {
        loop {
            let key = self.key.clone();
            if let Some(kv) = self.retrying(|| self.client.get(key.clone())).await? {
                return self.parse(&kv);
            }
            if let Some(v) = self.create().await? {
                return Ok(v);
            }
        }
    }

    /// Writes the initial semaphore if the key still does not exist; returns the value
    /// now stored (ours or a concurrent creator's), or `None` if it vanished again.
    async fn create(&self) -> Result<Option<Versioned>, LockError> {
        let initial = Semaphore::initial();
        let req = pb::TxnRequest {
            compare: vec![self.compare(CompareTarget::Create, TargetUnion::CreateRevision(0))],
            success: vec![self.put_op(&initial)],
            failure: vec![self.range_op()],
        };
        // Creating twice is harmless (the second compare fails), so resending is safe.
        let resp = self.retrying(|| self.client.txn(req.clone())).await?;
        if resp.succeeded {
            tracing::info!(key = %self.key, "created the semaphore with max 1");
            let mod_revision = resp.header.map(|h| h.revision).unwrap_or_default();
            return Ok(Some(Versioned {
                semaphore: initial,
                mod_revision,
            }));
        }
        self.value_of_failed_txn(&resp)
    }

    fn compare(&self, target: CompareTarget, value: TargetUnion) -> pb::Compare {
        pb::Compare {
            result: CompareResult::Equal as i32,
            target: target as i32,
            key: self.key.as_bytes().to_vec(),
            range_end: Vec::new(),
            target_union: Some(value),
        }
    }

    fn put_op(&self, s: &Semaphore) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestPut(pb::PutRequest {
                key: self.key.as_bytes().to_vec(),
                value: s.to_json().into_bytes(),
                ..Default::default()
            })),
        }
    }

    fn range_op(&self) -> pb::RequestOp {
        pb::RequestOp {
            request: Some(Request::RequestRange(pb::RangeRequest {
                key: self.key.as_bytes().to_vec(),
                ..Default::default()
            })),
        }
    }

    /// The value returned by the `range_op` of a failed txn.
    fn value_of_failed_txn(&self, resp: &pb::TxnResponse) -> Result<Option<Versioned>, LockError> {
        let kv = resp.responses.iter().find_map(|r| match &r.response {
            Some(Response::ResponseRange(rr)) => rr.kvs.first(),
            _ => None,
        });
        kv.map(|kv| self.parse(kv)).transpose()
    }

    /// Applies `change` atomically: read, change a copy, write it back only if the key's
    /// mod_revision is unchanged, else retry with the newer value. A change that leaves
    /// the value as it was writes nothing. A refusal or an invalid value is returned
    /// at once; a transient error is retried and marks later attempts with
    /// [`Attempt::after_ambiguous_write`] when the failed request was a write.
    pub async fn modify<T>(
        &self,
        mut change: impl FnMut(&mut Semaphore, Attempt) -> Result<T, Refusal>,
    ) -> Result<(T, Versioned), LockError> {
        let deadline = Instant::now() + self.retry_for;
        let mut attempt = Attempt::default();
        let mut pause = Duration::from_millis(50);
        let mut current = self.read().await?;
        loop {
            let mut next = current.semaphore.clone();
            let out = change(&mut next, attempt).map_err(|refusal| LockError::Refused {
                refusal,
                mod_revision: current.mod_revision,
            })?;
            if next == current.semaphore {
                return Ok((out, current));
            }
            let req = pb::TxnRequest {
                compare: vec![self.compare(
                    CompareTarget::Mod,
                    TargetUnion::ModRevision(current.mod_revision),
                )],
                success: vec![self.put_op(&next)],
                failure: vec![self.range_op()],
            };
            match self.client.txn(req).await {
                Ok(resp) if resp.succeeded => {
                    let mod_revision = resp.header.map(|h| h.revision).unwrap_or_default();
                    return Ok((
                        out,
                        Versioned {
                            semaphore: next,
                            mod_revision,
                        },
                    ));
                }
                Ok(resp) => {
                    // Someone else wrote first: start over from what they wrote.
                    current = match self.value_of_failed_txn(&resp)? {
                        Some(v) => v,
                        None => self.read().await?,
                    };
                }
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    if !e.was_not_sent() {
                        attempt.after_ambiguous_write = true;
                    }
                    tracing::debug!(error = %e, "write failed, re-reading the semaphore");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                    current = self.read().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes a slot for `id` (no waiting): a holder locking again succeeds unchanged.
    pub async fn lock(&self, id: &str) -> Result<(LockOutcome, Versioned), LockError> {
        // After an ambiguous write our own earlier lock may be what we now read: that
        // shows up as `AlreadyHeld`, which is the truth from the caller's point of view
        // only if it had not held the lock before; report it as acquired then.
        self.modify(|s, attempt| {
            s.lock(id).map(|o| match o {
                LockOutcome::AlreadyHeld if attempt.after_ambiguous_write => LockOutcome::Acquired,
                o => o,
            })
        })
        .await
    }

    /// Releases the slot of `id`; refused if `id` does not hold it.
    pub async fn unlock(&self, id: &str) -> Result<Versioned, LockError> {
        self.modify(|s, attempt| match s.unlock(id) {
            // Our own earlier unlock was applied although its answer was lost.
            Err(Refusal::NotHolder { .. }) if attempt.after_ambiguous_write => Ok(()),
            other => other,
        })
        .await
        .map(|((), v)| v)
    }

    /// Sets the limit (and the free-slot count with it); returns the previous limit.
    pub async fn set_max(&self, max: i64) -> Result<(i64, Versioned), LockError> {
        self.modify(|s, _| {
            let old = s.max;
            s.set_max(max);
            Ok(old)
        })
        .await
    }
}
