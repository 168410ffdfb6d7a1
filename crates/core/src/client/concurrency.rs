//! Lock and Election calls. `lock` and `campaign` wait as long as it takes (no request
//! timeout), so they are sent to one endpoint, failing over only when it is unreachable.
use std::future::Future;

use super::{Client, ClientError, Retry};
use crate::proto::v3electionpb::{self as el, election_client::ElectionClient};
use crate::proto::v3lockpb::{self as lk, lock_client::LockClient};

impl Client {
    /// Runs a call that may legitimately wait forever: no request timeout.
    async fn call_waiting<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(super::Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (idx, ch) = self.first_channel().await?;
        let endpoint = &self.inner.endpoints[idx].name;
        call(ch)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| ClientError::from_status(&s, endpoint))
    }

    /// Waits until the lock `name` is held with `lease`; returns the ownership key.
    pub async fn lock(&self, name: &[u8], lease: i64) -> Result<lk::LockResponse, ClientError> {
        let req = lk::LockRequest {
            name: name.to_vec(),
            lease,
        };
        self.call_waiting(|ch| {
            let req = req.clone();
            async move { LockClient::new(ch).lock(req).await }
        })
        .await
    }

    /// Releases a lock by its ownership key.
    pub async fn unlock(&self, key: &[u8]) -> Result<lk::UnlockResponse, ClientError> {
        let req = lk::UnlockRequest { key: key.to_vec() };
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = req.clone();
            async move { LockClient::new(ch).unlock(req).await }
        })
        .await
    }

    /// Waits until this proposal leads the election `name`.
    pub async fn campaign(
        &self,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<el::CampaignResponse, ClientError> {
        let req = el::CampaignRequest {
            name: name.to_vec(),
            lease,
            value: value.to_vec(),
        };
        self.call_waiting(|ch| {
            let req = req.clone();
            async move { ElectionClient::new(ch).campaign(req).await }
        })
        .await
    }

    /// Replaces the value of a leadership still held.
    pub async fn proclaim(
        &self,
        leader: el::LeaderKey,
        value: &[u8],
    ) -> Result<el::ProclaimResponse, ClientError> {
        let req = el::ProclaimRequest {
            leader: Some(leader),
            value: value.to_vec(),
        };
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = req.clone();
            async move { ElectionClient::new(ch).proclaim(req).await }
        })
        .await
    }

    /// The current leader's key-value.
    pub async fn leader(&self, name: &[u8]) -> Result<el::LeaderResponse, ClientError> {
        let req = el::LeaderRequest {
            name: name.to_vec(),
        };
        self.with_failover(Retry::Idempotent, |ch| {
            let req = req.clone();
            async move { ElectionClient::new(ch).leader(req).await }
        })
        .await
    }

    /// A stream of every leader value of election `name`, in order.
    pub async fn observe(
        &self,
        name: &[u8],
    ) -> Result<tonic::Streaming<el::LeaderResponse>, ClientError> {
        let req = el::LeaderRequest {
            name: name.to_vec(),
        };
        self.call_waiting(|ch| {
            let req = req.clone();
            async move { ElectionClient::new(ch).observe(req).await }
        })
        .await
    }

    /// Gives up a leadership (or a place in line).
    pub async fn resign(&self, leader: el::LeaderKey) -> Result<el::ResignResponse, ClientError> {
        let req = el::ResignRequest {
            leader: Some(leader),
        };
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = req.clone();
            async move { ElectionClient::new(ch).resign(req).await }
        })
        .await
    }
}
