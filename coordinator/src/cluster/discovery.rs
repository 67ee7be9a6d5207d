//! Workers found over mDNS: each advertisement of this cluster is confirmed with a
//! Describe call to the address it gives and added to the [`Membership`]; a
//! goodbye removes the worker again.
//!
//! mDNS only finds workers. Whether one stays alive is for the cluster's
//! heartbeats to tell: a worker that dies without a goodbye keeps its mDNS records
//! for their 120 s lifetime. Discovery follows the membership's changes for that:
//! once a worker it found is gone, its next announcement (it restarted) is
//! confirmed again rather than taken for an update.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use strata_discovery::{Browser, BrowserOptions, ClusterTag, Event, NodeState};
use tokio::sync::broadcast;
use tokio::task::JoinSet;

use super::membership::{self, Added, Change, Member, Membership, NodeStatus};
use super::ClusterError;

/// How long a found worker gets to answer Describe.
pub const DESCRIBE_WAIT: Duration = Duration::from_secs(10);

/// Browses for the workers of `cluster` (a `--cluster` name) until `stop`
/// completes, keeping `membership` in step. Fails only when mDNS cannot start.
pub async fn run(
    membership: Arc<Membership>,
    cluster: String,
    stop: impl Future<Output = ()>,
) -> Result<(), strata_discovery::Error> {
    let mut browser =
        Browser::start(BrowserOptions { cluster: ClusterTag::of(&cluster), interfaces: Vec::new(), ipv6: false })?;
    let mut changes = membership.changes();
    let mut found = Found::new(membership);
    let mut describing = JoinSet::new();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => break,
            event = browser.next() => match event {
                Some(event) => {
                    if let Some(confirm) = found.event(event) {
                        describing.spawn(confirm.run());
                    }
                }
                None => {
                    tracing::warn!("the mDNS daemon stopped; no more workers will be found over mDNS");
                    break;
                }
            },
            Some(Ok((confirm, result))) = describing.join_next() => found.described(confirm, result),
            change = changes.recv() => match change {
                Ok(change) => found.changed(&change.change),
                // Missed some: whoever is gone is found so again on the next change.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    describing.abort_all();
    browser.shutdown().await
}

/// A Describe call to make to a worker found at an address.
struct Confirm {
    instance: String,
    address: String,
    node_id: String,
}

impl Confirm {
    async fn run(self) -> (Self, Result<Member, ClusterError>) {
        let result = membership::describe(&self.address, DESCRIBE_WAIT).await;
        (self, result)
    }
}

/// Which address each instance was last found at, and what to do on each event.
struct Found {
    membership: Arc<Membership>,
    addresses: HashMap<String, String>,
}

impl Found {
    fn new(membership: Arc<Membership>) -> Self {
        Self { membership, addresses: HashMap::new() }
    }

    /// Handles one mDNS event; a worker found at a new address must be confirmed.
    fn event(&mut self, event: Event) -> Option<Confirm> {
        let address = event.grpc_address().map(|a| a.to_string());
        match (event, address) {
            (Event::Resolved { instance, advertisement, .. }, Some(address)) => {
                let previous = self.addresses.get(&instance);
                if previous == Some(&address) {
                    // An update of what it advertises; its heartbeats say the rest.
                    tracing::debug!(%instance, state = advertisement.state.as_str(), "mDNS advertisement updated");
                    return None;
                }
                if previous.is_none() && advertisement.state == NodeState::Draining {
                    tracing::debug!(%instance, %address, "ignoring a draining worker");
                    return None;
                }
                if let Some(old) = self.addresses.insert(instance.clone(), address.clone()) {
                    tracing::info!(%instance, from = %old, to = %address, "worker moved");
                    self.membership.remove(&old);
                }
                Some(Confirm { instance, address, node_id: advertisement.node_id })
            }
            (Event::Removed { instance }, _) => {
                if let Some(address) = self.addresses.remove(&instance) {
                    tracing::info!(%instance, %address, "worker left (mDNS goodbye)");
                    self.membership.remove(&address);
                }
                None
            }
            (Event::Resolved { .. }, None) => None,
        }
    }

    /// A change to the membership: a worker found here that is now gone is
    /// forgotten, so that its next announcement is confirmed (and it is taken back
    /// at once) rather than taken for an update of one already known.
    fn changed(&mut self, change: &Change) {
        if let Change::Updated(m) = change {
            if matches!(m.status, NodeStatus::Gone { .. }) {
                self.addresses.retain(|_, address| *address != m.address);
            }
        }
    }

    /// Adds a confirmed worker, unless it left or moved while it was asked.
    fn described(&mut self, confirm: Confirm, result: Result<Member, ClusterError>) {
        let Confirm { instance, address, node_id } = confirm;
        if self.addresses.get(&instance) != Some(&address) {
            return;
        }
        let member = match result {
            Ok(member) => member,
            Err(ClusterError::Refused { reason, .. }) => {
                // Forgotten too: a worker given the right token later is confirmed anew.
                self.membership.refuse(&address, &format!("found over mDNS as {instance}: {reason}"));
                self.addresses.remove(&instance);
                return;
            }
            Err(e) => {
                tracing::warn!(%instance, %address, error = %e, "a worker found over mDNS does not answer");
                self.addresses.remove(&instance);
                return;
            }
        };
        if member.description.node_id != node_id {
            tracing::warn!(
                %instance,
                %address,
                advertised = %node_id,
                answered = %member.description.node_id,
                "another worker answers at the advertised address"
            );
            self.addresses.remove(&instance);
            return;
        }
        let name = member.description.name.clone();
        match self.membership.add(member) {
            Added::KnownElsewhere(elsewhere) => {
                tracing::info!(%instance, %address, %elsewhere, "worker already known at another address")
            }
            _ => tracing::info!(%instance, %address, %name, "worker found over mDNS"),
        }
    }
}

#[cfg(test)]
mod tests {
    use strata_discovery::{Advertisement, DeviceSummary};
    use strata_proto::v1::WorkerDescription;

    use super::*;

    fn resolved(instance: &str, ip: &str, state: NodeState) -> Event {
        Event::Resolved {
            instance: instance.into(),
            addresses: vec![ip.parse().unwrap()],
            port: 7070,
            advertisement: Advertisement {
                protocol_version: strata_proto::PROTOCOL_VERSION,
                node_id: format!("id-{instance}"),
                grpc_port: 7070,
                devices: DeviceSummary::default(),
                memory_offered_bytes: 0,
                speed: 0,
                state,
                cluster: ClusterTag::of("strata"),
            },
        }
    }

    fn start() -> (Arc<Membership>, Found) {
        let membership = Arc::new(Membership::default());
        (membership.clone(), Found::new(membership))
    }

    /// The worker answers Describe as the one advertised.
    fn answer(found: &mut Found, confirm: Confirm) {
        let description = WorkerDescription { node_id: confirm.node_id.clone(), ..Default::default() };
        let member = Member::new(confirm.address.clone(), description);
        found.described(confirm, Ok(member));
    }

    fn addresses(membership: &Membership) -> Vec<String> {
        membership.members().into_iter().map(|m| m.address).collect()
    }

    #[test]
    fn a_found_worker_that_is_gone_is_confirmed_again_when_it_announces_itself() {
        let (membership, mut found) = start();
        let mut changes = membership.changes();
        let confirm = found.event(resolved("w1", "10.0.0.1", NodeState::Idle)).expect("a new worker is described");
        answer(&mut found, confirm);
        let gone = NodeStatus::Gone { since: std::time::Instant::now(), reason: "no heartbeat".into() };
        membership.set_status("10.0.0.1:7070", gone);
        while let Ok(c) = changes.try_recv() {
            found.changed(&c.change);
        }
        // It restarted: the same announcement is confirmed again, not ignored.
        assert!(found.event(resolved("w1", "10.0.0.1", NodeState::Idle)).is_some());
    }

    #[test]
    fn found_workers_are_confirmed_once_and_removed_on_goodbye() {
        let (membership, mut found) = start();
        let confirm = found.event(resolved("w1", "10.0.0.1", NodeState::Idle)).expect("a new worker is described");
        assert_eq!(confirm.address, "10.0.0.1:7070");
        assert!(found.event(resolved("w1", "10.0.0.1", NodeState::Ready)).is_none(), "an update is not");
        answer(&mut found, confirm);
        assert_eq!(addresses(&membership), ["10.0.0.1:7070"]);
        found.event(Event::Removed { instance: "w1".into() });
        assert!(addresses(&membership).is_empty());
    }

    #[test]
    fn a_worker_that_leaves_while_described_is_not_added() {
        let (membership, mut found) = start();
        let confirm = found.event(resolved("w1", "10.0.0.1", NodeState::Idle)).unwrap();
        found.event(Event::Removed { instance: "w1".into() });
        answer(&mut found, confirm);
        assert!(addresses(&membership).is_empty());
    }

    #[test]
    fn a_moved_worker_is_described_again_and_its_old_address_dropped() {
        let (membership, mut found) = start();
        let first = found.event(resolved("w1", "10.0.0.1", NodeState::Idle)).unwrap();
        answer(&mut found, first);
        let second = found.event(resolved("w1", "10.0.0.9", NodeState::Idle)).expect("a new address is described");
        assert!(addresses(&membership).is_empty(), "the old address is gone at once");
        answer(&mut found, second);
        assert_eq!(addresses(&membership), ["10.0.0.9:7070"]);
    }

    #[test]
    fn draining_strangers_and_impostors_are_not_added() {
        let (membership, mut found) = start();
        assert!(found.event(resolved("w1", "10.0.0.1", NodeState::Draining)).is_none());
        let confirm = found.event(resolved("w2", "10.0.0.2", NodeState::Idle)).unwrap();
        let description = WorkerDescription { node_id: "someone-else".into(), ..Default::default() };
        let impostor = Ok(Member::new(confirm.address.clone(), description));
        found.described(confirm, impostor);
        assert!(addresses(&membership).is_empty());
    }
}
