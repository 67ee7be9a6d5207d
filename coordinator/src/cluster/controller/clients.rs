//! One gRPC connection per worker, shared by the executor's tasks and the
//! pipeline keeper, made on first use and forgotten when the worker is gone (the
//! next use connects afresh: the old connection may be the broken part).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use std::future::Future;

use futures::future::join_all;
use strata_proto::v1::{self, WorkerState};
use strata_proto::{CallError, FailureKind, PipelineId};
use tonic::{Code, Response, Status};

use super::super::{connect, ClusterError, WorkerClient};

/// How long a worker may take to answer Health before it counts as gone.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct Clients {
    cache: Mutex<HashMap<String, WorkerClient>>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, WorkerClient>> {
        // Nothing panics while holding it; the map stays whole.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection to `address`, if one is made.
    pub fn cached(&self, address: &str) -> Option<WorkerClient> {
        self.lock().get(address).cloned()
    }

    /// The connection to `address`, made now if there is none (never holding the
    /// lock while connecting).
    pub async fn get(&self, address: &str) -> Result<WorkerClient, ClusterError> {
        if let Some(c) = self.cached(address) {
            return Ok(c);
        }
        let c = connect(address).await?;
        Ok(self.lock().entry(address.to_string()).or_insert(c).clone())
    }

    pub fn forget(&self, address: &str) {
        self.lock().remove(address);
    }

    /// Makes one call to the worker at `address` within `timeout` (connecting
    /// included: to a worker cut off from the network that alone takes long): its
    /// answer, or why not as a [`CallError`] whose kind the caller decides on. A
    /// call that did not get through drops the connection, so the next one makes
    /// a new one (the old may be the broken part).
    pub async fn call<T, F, Fut>(&self, address: &str, timeout: Duration, call: F) -> Result<T, CallError>
    where
        F: FnOnce(WorkerClient) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let attempt = async {
            let client =
                self.get(address).await.map_err(|e| CallError { code: Code::Unavailable, message: e.to_string() })?;
            call(client).await.map(Response::into_inner).map_err(CallError::from)
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(CallError { code: Code::DeadlineExceeded, message: format!("no answer within {timeout:?}") }),
        };
        if let Err(e) = &result {
            if e.kind() == FailureKind::Unreachable {
                self.forget(address);
            }
        }
        result
    }

    /// Each worker's state (as far as `pipeline` is concerned, where named), asked
    /// of all at once: `None` for one that does not answer within [`HEALTH_TIMEOUT`].
    pub async fn health(&self, addresses: &[String], pipeline: Option<PipelineId>) -> Vec<Option<WorkerState>> {
        let pipeline_id = pipeline.map_or(0, PipelineId::get);
        join_all(addresses.iter().map(|address| async move {
            let ask = |mut c: WorkerClient| async move { c.health(v1::HealthRequest { pipeline_id }).await };
            let answer = self.call(address, HEALTH_TIMEOUT, ask);
            match answer.await {
                Ok(h) => Some(WorkerState::try_from(h.state).unwrap_or(WorkerState::Unspecified)),
                // It answered, if only with an error: it is there.
                Err(e) if e.kind() != FailureKind::Unreachable => Some(WorkerState::Unspecified),
                Err(_) => None,
            }
        }))
        .await
    }
}
