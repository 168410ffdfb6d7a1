//! `etcdserverpb.Maintenance`: Status, Alarm, Defragment, Hash, HashKV, Snapshot and
//! MoveLeader. Alarms change through Raft; Defragment and MoveLeader go to the driver;
//! hashes and snapshots are read from one consistent read transaction.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{kv_status, propose_status, ApiContext, ERR_CORRUPT, ETCD_API_VERSION};
use crate::proto::etcdserverpb::{
    alarm_request::AlarmAction, maintenance_server::Maintenance, AlarmMember, AlarmRequest,
    AlarmResponse, AlarmType, DefragmentRequest, DefragmentResponse, HashKvRequest, HashKvResponse,
    HashRequest, HashResponse, MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest,
    SnapshotResponse, StatusRequest, StatusResponse,
};
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::raft::AppliedKind;

/// Size of one Snapshot blob (etcd sends 32 KiB chunks too).
pub const SNAPSHOT_CHUNK: usize = 32 * 1024;

pub struct MaintenanceApi {
    ctx: ApiContext,
}

impl MaintenanceApi {
    pub fn new(ctx: ApiContext) -> MaintenanceApi {
        MaintenanceApi { ctx }
    }
}

/// An alarm as etcd prints it in Status errors: `memberID:<decimal> alarm:<NAME>`.
pub fn alarm_text(a: &AlarmMember) -> String {
    let name = AlarmType::try_from(a.alarm)
        .map_or_else(|_| a.alarm.to_string(), |t| t.as_str_name().to_string());
    format!("memberID:{} alarm:{name}", a.member_id)
}

/// Snapshot chunks written ahead of the client.
const SNAPSHOT_CHUNKS_QUEUED: usize = 16;

/// Sends what is written to it as snapshot responses of [`SNAPSHOT_CHUNK`] bytes, each
/// saying how many bytes remain after it. Writing blocks while the client is behind.
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Result<SnapshotResponse, Status>>,
    header: Option<crate::proto::etcdserverpb::ResponseHeader>,
    buf: Vec<u8>,
    /// Bytes not yet sent: the file's length until the first chunk goes.
    remaining: u64,
}

impl ChunkSender {
    fn send(&mut self, blob: Vec<u8>) -> std::io::Result<()> {
        self.remaining = self.remaining.saturating_sub(blob.len() as u64);
        let chunk = SnapshotResponse {
            header: self.header,
            remaining_bytes: self.remaining,
            blob,
        };
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }

    /// Sends the last, partial chunk.
    fn send_rest(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let blob = std::mem::take(&mut self.buf);
        self.send(blob)
    }
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(SNAPSHOT_CHUNK);
        }
        let n = bytes.len().min(SNAPSHOT_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&bytes[..n]);
        if self.buf.len() == SNAPSHOT_CHUNK {
            let blob = std::mem::take(&mut self.buf);
            self.send(blob)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceApi {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.ctx.node.status;
        let db_size = self.ctx.db.file_size() as i64;
        let mut errors = Vec::new();
        if !s.is_running() {
            errors.push("raft driver stopped".to_string());
        } else if s.storage_failed() {
            errors.push("storage write failed; reopening the database".to_string());
        } else if s.leader() == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        if let Some(why) = s.corruption() {
            errors.push(format!("{ERR_CORRUPT}: {why}"));
        }
        errors.extend(
            self.ctx
                .kv
                .alarms()
                .map_err(kv_status)?
                .iter()
                .map(alarm_text),
        );
        Ok(Response::new(StatusResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            version: ETCD_API_VERSION.into(),
            db_size,
            leader: s.leader(),
            raft_index: s.commit_index(),
            raft_term: s.term(),
            raft_applied_index: s.applied_index(),
            errors,
            db_size_in_use: db_size,
            is_learner: s.is_learner(),
        }))
    }

    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        // Listing alarms needs an authenticated user; raising or clearing one (which
        // stops or resumes writes cluster-wide) needs root.
        if req.get_ref().action == AlarmAction::Get as i32 {
            self.ctx.require_user(req.metadata())?;
        } else {
            self.ctx.require_admin(req.metadata())?;
        }
        let req = req.into_inner();
        let alarms = match AlarmAction::try_from(req.action) {
            Ok(AlarmAction::Get) => {
                self.ctx.linearize().await?;
                // As etcd: GET filters by alarm type only (NONE: all), not by member.
                let all = self.ctx.kv.alarms().map_err(kv_status)?;
                all.into_iter()
                    .filter(|a| req.alarm == AlarmType::None as i32 || a.alarm == req.alarm)
                    .collect()
            }
            Ok(AlarmAction::Activate | AlarmAction::Deactivate) => {
                let applied = self
                    .ctx
                    .node
                    .propose(Internal::Alarm(req))
                    .await
                    .map_err(propose_status)?;
                match applied.kind {
                    AppliedKind::Alarm(changed) => changed,
                    other => return Err(Status::internal(format!("alarm applied as {other:?}"))),
                }
            }
            Err(_) => {
                return Err(Status::invalid_argument(
                    "etcdserver: invalid alarm request",
                ))
            }
        };
        Ok(Response::new(AlarmResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            alarms,
        }))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        self.ctx.node.defragment().await.map_err(propose_status)?;
        Ok(Response::new(DefragmentResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
        }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let hash = self.ctx.kv.hash().map_err(kv_status)?;
        Ok(Response::new(HashResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let (hash, compact_revision, hash_revision) = self
            .ctx
            .kv
            .hash_kv(req.into_inner().revision)
            .map_err(kv_status)?;
        Ok(Response::new(HashKvResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let kv = self.ctx.kv.clone();
        let header = self.ctx.header(0);
        // The file is written as it is sent, from one read transaction, on a blocking
        // thread; the channel holds a few chunks, so a slow client slows the writer
        // and memory stays small whatever the store's size.
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_QUEUED);
        tokio::task::spawn_blocking(move || {
            let mut out = ChunkSender {
                tx: tx.clone(),
                header,
                buf: Vec::new(),
                remaining: 0,
            };
            let told = |out: &mut ChunkSender, len: u64, revision: i64| {
                out.remaining = len;
                if let Some(h) = out.header.as_mut() {
                    h.revision = revision;
                }
                Ok(())
            };
            let sent = kv
                .write_etcd_snapshot(&mut out, told)
                .map_err(kv_status)
                .and_then(|_| {
                    out.send_rest()
                        .map_err(|e| Status::unavailable(format!("snapshot: {e}")))
                });
            if let Err(status) = sent {
                // The client may have gone: then nobody is told.
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        self.ctx
            .node
            .move_leader(req.into_inner().target_id)
            .await
            .map_err(propose_status)?;
        Ok(Response::new(MoveLeaderResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_count_down_to_zero() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(SNAPSHOT_CHUNKS_QUEUED);
        let bytes: Vec<u8> = (0..SNAPSHOT_CHUNK * 2 + 5).map(|i| i as u8).collect();
        let mut out = ChunkSender {
            tx,
            header: None,
            buf: Vec::new(),
            remaining: bytes.len() as u64,
        };
        // Writes of odd sizes: chunks are cut at SNAPSHOT_CHUNK whatever they are.
        for part in bytes.chunks(1000) {
            std::io::Write::write_all(&mut out, part).unwrap();
        }
        out.send_rest().unwrap();
        drop(out);
        let mut chunks = Vec::new();
        while let Ok(c) = rx.try_recv() {
            chunks.push(c.unwrap());
        }
        let remaining: Vec<u64> = chunks.iter().map(|c| c.remaining_bytes).collect();
        assert_eq!(remaining, [SNAPSHOT_CHUNK as u64 + 5, 5, 0]);
        let joined: Vec<u8> = chunks.into_iter().flat_map(|c| c.blob).collect();
        assert_eq!(joined, bytes);
    }

    #[test]
    fn alarm_text_matches_etcd() {
        let a = AlarmMember {
            member_id: 42,
            alarm: AlarmType::Nospace as i32,
        };
        assert_eq!(alarm_text(&a), "memberID:42 alarm:NOSPACE");
    }
}
