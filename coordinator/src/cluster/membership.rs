//! The workers a coordinator knows: those given on the command line, checked with
//! Describe, and those that announced themselves with Join.

use std::time::Duration;

use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{DescribeRequest, WorkerDescription};
use strata_proto::{CoordinatorError, PROTOCOL_VERSION};
use tokio::sync::watch;

use super::ClusterError;

/// A worker the coordinator may place a stage on.
#[derive(Debug, Clone)]
pub struct Member {
    /// Where peers reach it: the address given on the command line for a static
    /// worker, the one it advertised for a joined one.
    pub address: String,
    pub description: WorkerDescription,
}

/// Known workers, in the order they became known. Cheap to share: a watch channel
/// whose value is the list, so waiters wake on every change.
#[derive(Debug)]
pub struct Membership {
    members: watch::Sender<Vec<Member>>,
}

impl Default for Membership {
    fn default() -> Self {
        Self { members: watch::channel(Vec::new()).0 }
    }
}

impl Membership {
    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    /// Adds a worker, or updates the one at the same address.
    pub fn add(&self, member: Member) {
        self.members.send_modify(|members| match members.iter_mut().find(|m| m.address == member.address) {
            Some(existing) => *existing = member,
            None => members.push(member),
        });
    }

    /// Forgets the worker at `address`; returns whether it was known.
    pub fn remove(&self, address: &str) -> bool {
        self.members.send_if_modified(|members| {
            let before = members.len();
            members.retain(|m| m.address != address);
            members.len() != before
        })
    }

    /// A Join request, checked.
    pub fn join(&self, description: WorkerDescription) -> Result<(), CoordinatorError> {
        if description.protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolVersion {
                got: description.protocol_version,
                expected: PROTOCOL_VERSION,
            });
        }
        if description.grpc_address.is_empty() {
            return Err(CoordinatorError::BadRequest("the worker gave no grpc_address".into()));
        }
        tracing::info!(address = %description.grpc_address, name = %description.name, "worker joined");
        self.add(Member { address: description.grpc_address.clone(), description });
        Ok(())
    }

    /// Waits until at least `count` workers are known, for at most `wait`.
    pub async fn wait_for(&self, count: usize, wait: Duration) -> Result<Vec<Member>, ClusterError> {
        let mut rx = self.members.subscribe();
        let found = tokio::time::timeout(wait, rx.wait_for(|m| m.len() >= count))
            .await
            .ok()
            .and_then(|r| r.ok().map(|m| m.clone()));
        found.ok_or_else(|| ClusterError::NotEnoughWorkers {
            found: self.members.borrow().len(),
            wanted: count,
            waited: wait,
        })
    }
}

/// Describes a static worker, retrying until it answers or `wait` runs out.
pub async fn describe(address: &str, wait: Duration) -> Result<Member, ClusterError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(50);
    loop {
        let attempt = async {
            let endpoint = strata_proto::transport::endpoint(address).map_err(|e| e.to_string())?;
            let channel = endpoint.connect().await.map_err(|e| e.to_string())?;
            WorkerClient::new(channel).describe(DescribeRequest {}).await.map_err(|s| s.message().to_string())
        };
        match attempt.await {
            Ok(response) => {
                let description = response.into_inner();
                if description.protocol_version != PROTOCOL_VERSION {
                    return Err(ClusterError::Worker {
                        address: address.to_string(),
                        message: format!(
                            "speaks protocol {}, this coordinator {PROTOCOL_VERSION}",
                            description.protocol_version
                        ),
                    });
                }
                return Ok(Member { address: address.to_string(), description });
            }
            Err(message) if tokio::time::Instant::now() + delay >= deadline => {
                return Err(ClusterError::Worker { address: address.to_string(), message })
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}
