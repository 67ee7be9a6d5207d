//! One gRPC connection per worker, shared by the executor's tasks and the
//! pipeline keeper, made on first use and forgotten when the worker is gone (the
//! next use connects afresh: the old connection may be the broken part).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures::future::join_all;
use strata_proto::v1::{self, WorkerState};

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

    /// Each worker's state, asked of all at once: `None` for one that does not
    /// answer within [`HEALTH_TIMEOUT`]. Connecting counts too: to a worker cut off
    /// from the network it would take the whole connect timeout.
    pub async fn health(&self, addresses: &[String]) -> Vec<Option<WorkerState>> {
        join_all(addresses.iter().map(|address| async move {
            let check = async {
                let mut c = self.get(address).await.ok()?;
                let state = c.health(v1::HealthRequest {}).await.ok()?.into_inner().state;
                Some(WorkerState::try_from(state).unwrap_or(WorkerState::Unspecified))
            };
            tokio::time::timeout(HEALTH_TIMEOUT, check).await.ok().flatten()
        }))
        .await
    }
}
