//! `meshpb.FaultInjection`: test-only control over the mesh's link faults, so a
//! harness driving spawned `meshd` processes can partition, drop and delay links, and
//! a panic in the Raft driver.
//! Registered only with `--unsafe-fault-injection`; answers loopback callers only.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::mesh::{LinkFault, Mesh};
use crate::proto::meshpb::{
    fault_injection_server, ClearFaultsRequest, ClearFaultsResponse, CorruptRecordRequest,
    CorruptRecordResponse, PanicDriverRequest, PanicDriverResponse, SetLinkFaultRequest,
    SetLinkFaultResponse,
};
use crate::raft::NodeHandle;

/// Longest delay accepted: long enough for any test, short enough that a typo (a
/// value in microseconds) does not wedge a link for hours.
const MAX_DELAY_MS: u32 = 60_000;

pub struct FaultInjectionApi {
    pub mesh: Arc<Mesh>,
    pub node: NodeHandle,
    pub kv: Arc<crate::kv::KvStore>,
}

/// Refuses callers that are not on this machine: the service can cut the node off.
fn check_loopback<T>(req: &Request<T>) -> Result<(), Status> {
    match req.remote_addr() {
        Some(a) if a.ip().is_loopback() => Ok(()),
        Some(a) => Err(Status::permission_denied(format!(
            "fault injection is only served to loopback callers, not {a}"
        ))),
        None => Err(Status::permission_denied(
            "fault injection is only served to loopback callers (caller address unknown)",
        )),
    }
}

#[tonic::async_trait]
impl fault_injection_server::FaultInjection for FaultInjectionApi {
    async fn set_link_fault(
        &self,
        req: Request<SetLinkFaultRequest>,
    ) -> Result<Response<SetLinkFaultResponse>, Status> {
        check_loopback(&req)?;
        let r = req.into_inner();
        if r.peer == 0 {
            return Err(Status::invalid_argument("peer name must not be 0"));
        }
        if r.delay_ms > MAX_DELAY_MS {
            return Err(Status::invalid_argument(format!(
                "delay_ms {} is above the limit of {MAX_DELAY_MS}",
                r.delay_ms
            )));
        }
        let fault = LinkFault {
            drop_out: r.drop_out,
            drop_in: r.drop_in,
            delay: (r.delay_ms > 0).then(|| Duration::from_millis(r.delay_ms.into())),
        };
        tracing::warn!(peer = %crate::mesh::peer_name_string(r.peer), ?fault, "fault injected on mesh link");
        self.mesh.set_link_fault(r.peer, fault);
        Ok(Response::new(SetLinkFaultResponse {}))
    }

    async fn clear_faults(
        &self,
        req: Request<ClearFaultsRequest>,
    ) -> Result<Response<ClearFaultsResponse>, Status> {
        check_loopback(&req)?;
        tracing::warn!("mesh link faults cleared");
        self.mesh.clear_faults();
        Ok(Response::new(ClearFaultsResponse {}))
    }

    async fn panic_driver(
        &self,
        req: Request<PanicDriverRequest>,
    ) -> Result<Response<PanicDriverResponse>, Status> {
        check_loopback(&req)?;
        tracing::warn!("fault injected: the Raft driver thread panics");
        self.node.inject_panic();
        Ok(Response::new(PanicDriverResponse {}))
    }

    async fn corrupt_record(
        &self,
        req: Request<CorruptRecordRequest>,
    ) -> Result<Response<CorruptRecordResponse>, Status> {
        check_loopback(&req)?;
        let key = req.into_inner().key;
        let found = self
            .kv
            .range(&crate::proto::etcdserverpb::RangeRequest {
                key,
                ..Default::default()
            })
            .map_err(super::kv_status)?;
        let revision = found
            .kvs
            .first()
            .map(|kv| kv.mod_revision)
            .ok_or_else(|| Status::not_found("no such key on this member"))?;
        self.node
            .inject_corruption(revision)
            .await
            .map_err(super::propose_status)?;
        Ok(Response::new(CorruptRecordResponse { revision }))
    }
}
