//! A member that found its state machine corrupt serves no data: a tower layer on the
//! client API refuses KV, Watch, Lease, Lock and Election calls with etcd's corruption
//! error, and reports a record that failed its checksum while serving a client to the
//! Raft driver (which stops applying and raises the CORRUPT alarm). Maintenance and
//! Cluster stay available, so operators can see the alarm and replace the member.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;

use crate::raft::NodeHandle;

/// Services whose answers come from the state machine.
const DATA_SERVICES: [&str; 5] = [
    "etcdserverpb.KV",
    "etcdserverpb.Watch",
    "etcdserverpb.Lease",
    "v3lockpb.Lock",
    "v3electionpb.Election",
];

#[derive(Clone)]
pub struct CorruptGate {
    pub node: NodeHandle,
}

impl<S> tower_layer::Layer<S> for CorruptGate {
    type Service = CorruptGateService<S>;
    fn layer(&self, inner: S) -> CorruptGateService<S> {
        CorruptGateService {
            inner,
            node: self.node.clone(),
        }
    }
}

#[derive(Clone)]
pub struct CorruptGateService<S> {
    inner: S,
    node: NodeHandle,
}

fn is_data_service(path: &str) -> bool {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    DATA_SERVICES.contains(&service)
}

impl<S, B> Service<http::Request<B>> for CorruptGateService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let data = is_data_service(req.uri().path());
        if data && self.node.status.is_corrupt() {
            let refused = tonic::Status::data_loss(super::ERR_CORRUPT).into_http();
            return Box::pin(async move { Ok(refused) });
        }
        let node = self.node.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let data_loss = resp
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == b"15");
            if data && data_loss {
                node.report_corrupt("a stored record failed its checksum while serving a client");
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_services_are_recognized_by_path() {
        assert!(super::is_data_service("/etcdserverpb.KV/Range"));
        assert!(super::is_data_service("/v3lockpb.Lock/Lock"));
        assert!(!super::is_data_service("/etcdserverpb.Maintenance/Status"));
        assert!(!super::is_data_service("/etcdserverpb.Cluster/MemberList"));
    }
}
