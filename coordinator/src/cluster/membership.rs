//! The workers a coordinator knows — given on the command line, joined with Join,
//! or found over mDNS — and what is known of each: its description, whether it may
//! hold layers, and its last heartbeat.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strata_proto::v1::worker_client::WorkerClient;
use strata_proto::v1::{self, DescribeRequest, WorkerDescription, WorkerState};
use strata_proto::{CoordinatorError, NodeId, PROTOCOL_VERSION};
use strata_trust::names::{self, CertIdentity};
use strata_trust::{Authority, Dial, SeenCertificate};
use tokio::sync::{broadcast, watch};
use tonic::transport::Channel;

use super::report::PullReport;
use super::ClusterError;

/// How long after the coordinator sets a worker's status heartbeats may not undo it.
const STATUS_SETTLE: Duration = Duration::from_secs(1);

/// Whether a worker may hold layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeStatus {
    /// Answering, and takes layers.
    Ready,
    /// Asked to leave (`strata drain`, or at the machine itself): holds no layers
    /// once the cluster has moved off it.
    Draining,
    /// Not answering since `since`; retried until it comes back.
    Gone { since: Instant, reason: String },
}

impl NodeStatus {
    pub fn label(&self) -> &'static str {
        match self {
            NodeStatus::Ready => "ready",
            NodeStatus::Draining => "draining",
            NodeStatus::Gone { .. } => "gone",
        }
    }
}

/// The live figures a worker's heartbeats carry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Heartbeat {
    pub memory_used_bytes: u64,
    /// Of that, the KV caches.
    pub kv_cache_bytes: u64,
    /// Its links to the workers it streams frames to.
    pub links: Vec<strata_proto::v1::LinkReport>,
    pub sequences: u32,
    pub pipelines: Vec<u64>,
    /// Cumulative since the worker started: token positions computed, forward
    /// batches, busy seconds.
    pub tokens_computed: u64,
    pub batches: u64,
    pub busy_seconds: f64,
    /// Cumulative too: frames computed, and the seconds they waited in the queue
    /// before their forward, summed.
    pub frames: u64,
    pub queue_seconds: f64,
    /// Why the worker drains by itself (`yielding to game.exe (pid 4)`); empty when
    /// it does not.
    pub drain_reason: String,
    /// Shards it is pulling from this coordinator.
    pub pulls: Vec<PullReport>,
}

/// What tells one worker apart from another across restarts and new addresses:
/// its node id, or, for a worker that gives none, its address. What the
/// coordinator knows of a worker itself (a failed load, its rates) is keyed by
/// this; what concerns a connection (a client, a followed stream) by address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKey {
    Id(NodeId),
    Address(String),
}

impl std::fmt::Display for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeKey::Id(id) => id.fmt(f),
            NodeKey::Address(a) => a.fmt(f),
        }
    }
}

/// A worker the coordinator may place a stage on.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Where peers reach it: the address given on the command line for a static
    /// worker, the one it advertised for a joined or discovered one.
    pub address: String,
    pub description: WorkerDescription,
    pub status: NodeStatus,
    /// When the coordinator last set `status` itself: heartbeats sent before that
    /// may still be on their way and must not undo it.
    pub status_set_at: Option<Instant>,
    pub heartbeat: Heartbeat,
    /// Its events come over a local lane (see `controller::event_lane`).
    pub events_local_lane: bool,
}

impl Member {
    pub fn new(address: String, description: WorkerDescription) -> Self {
        let status =
            if description.state == WorkerState::Draining as i32 { NodeStatus::Draining } else { NodeStatus::Ready };
        Self {
            address,
            description,
            status,
            status_set_at: None,
            heartbeat: Heartbeat::default(),
            events_local_lane: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.description.name
    }

    pub fn key(&self) -> NodeKey {
        self.description.node().map_or_else(|| NodeKey::Address(self.address.clone()), NodeKey::Id)
    }

    /// Whether `node` names this worker: its name, address or node id.
    pub fn is(&self, node: &str) -> bool {
        self.description.name == node || self.address == node || self.description.node_id == node
    }
}

/// What [`Membership::add`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Added {
    New,
    /// The member at that address, or this node gone from another address, was
    /// replaced.
    Updated,
    /// This node is live at the address given; nothing changed.
    KnownElsewhere(String),
}

/// One change to the membership, numbered: generation N is the state after the
/// Nth change, so a consumer that saw N knows what it has missed.
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipChange {
    pub generation: u64,
    pub change: Change,
}

/// What changed, with the member as it is after the change (before, if removed).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(Member),
    /// Its status or description changed, or it moved to another address.
    Updated(Member),
    Removed(Member),
}

/// A worker that reached the coordinator (found over mDNS, joined, or given with
/// `--worker`) and was not taken: it does not hold this cluster's join token, was
/// revoked, or claims another node's name.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub address: String,
    pub reason: String,
    pub at: Instant,
}

/// The refusals `strata status` shows: the newest, each once.
const REFUSALS_KEPT: usize = 8;

/// How many changes a slow consumer may fall behind before it is told it lagged
/// (and reads the whole list instead).
const CHANGES_BUFFERED: usize = 256;

/// Known workers, in the order they became known. Cheap to share: a watch channel
/// whose value is the list, so waiters wake on every change, and a stream of the
/// changes themselves with their generation, for consumers that act on each.
#[derive(Debug)]
pub struct Membership {
    members: watch::Sender<Vec<Member>>,
    changes: broadcast::Sender<MembershipChange>,
    generation: AtomicU64,
    refusals: Mutex<VecDeque<Refusal>>,
    /// Bytes of shard files the workers pulled from this coordinator.
    weights_served: AtomicU64,
}

impl Default for Membership {
    fn default() -> Self {
        Self {
            members: watch::channel(Vec::new()).0,
            changes: broadcast::channel(CHANGES_BUFFERED).0,
            generation: AtomicU64::new(0),
            refusals: Mutex::new(VecDeque::new()),
            weights_served: AtomicU64::new(0),
        }
    }
}

impl Membership {
    /// Applies `modify` to the list; the change it reports (if any) is numbered and
    /// published while the list is still locked, so generations follow the order
    /// in which the list changed.
    fn modify(&self, modify: impl FnOnce(&mut Vec<Member>) -> Option<Change>) -> bool {
        self.members.send_if_modified(|members| match modify(members) {
            Some(change) => {
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                // No consumer is no error: the list itself is the truth.
                let _ = self.changes.send(MembershipChange { generation, change });
                true
            }
            None => false,
        })
    }

    /// The changes from now on.
    pub fn changes(&self) -> broadcast::Receiver<MembershipChange> {
        self.changes.subscribe()
    }

    /// How many changes the membership has seen.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The members and the generation they are at, read together.
    pub fn snapshot(&self) -> (u64, Vec<Member>) {
        // Changes are numbered under the list's write lock; this read lock keeps
        // both still.
        let members = self.members.borrow();
        (self.generation(), members.clone())
    }

    pub fn members(&self) -> Vec<Member> {
        self.members.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Vec<Member>> {
        self.members.subscribe()
    }

    /// Adds a worker, or updates the one at the same address. A worker that comes
    /// back keeps a drain asked of it before.
    ///
    /// The same worker can be reached at several addresses (found over mDNS at its
    /// LAN address, joined with the address it was told to give, or at a new DHCP
    /// lease). It is one member, told apart by its node id: a live member keeps the
    /// address it is known at (its stages run there); a gone one moves to the new.
    pub fn add(&self, member: Member) -> Added {
        let mut added = Added::New;
        self.modify(|members| {
            let node = member.description.node();
            let same_node = |m: &Member| node.is_some() && m.description.node() == node;
            let existing = match members.iter().position(|m| m.address == member.address) {
                Some(i) => Some(i),
                None => members.iter().position(same_node),
            };
            let Some(i) = existing else {
                members.push(member.clone());
                return Some(Change::Added(member.clone()));
            };
            let existing = &mut members[i];
            if existing.address != member.address && !matches!(existing.status, NodeStatus::Gone { .. }) {
                added = Added::KnownElsewhere(existing.address.clone());
                return None;
            }
            added = Added::Updated;
            let drained = existing.status == NodeStatus::Draining;
            *existing = member.clone();
            if drained {
                existing.status = NodeStatus::Draining;
            }
            Some(Change::Updated(existing.clone()))
        });
        added
    }

    /// Forgets a worker (an mDNS goodbye).
    pub fn remove(&self, address: &str) {
        self.modify(|members| {
            let i = members.iter().position(|m| m.address == address)?;
            Some(Change::Removed(members.remove(i)))
        });
    }

    /// The key of the worker at `address` (the address itself if none is there).
    pub fn key_of(&self, address: &str) -> NodeKey {
        self.members
            .borrow()
            .iter()
            .find(|m| m.address == address)
            .map_or_else(|| NodeKey::Address(address.to_string()), Member::key)
    }

    /// The worker `node` names (name, address or node id).
    pub fn find(&self, node: &str) -> Option<Member> {
        self.members.borrow().iter().find(|m| m.is(node)).cloned()
    }

    /// Sets a worker's status; false when it is unknown or already so.
    pub fn set_status(&self, address: &str, status: NodeStatus) -> bool {
        self.modify(|members| match members.iter_mut().find(|m| m.address == address) {
            Some(m) if m.status != status => {
                m.status = status;
                m.status_set_at = Some(Instant::now());
                Some(Change::Updated(m.clone()))
            }
            _ => None,
        })
    }

    /// Records whether the worker's events come over a local lane: shown in the
    /// status, no change to whom the plan may use (so no one is woken).
    pub fn set_events_local_lane(&self, address: &str, on: bool) {
        self.modify(|members| {
            if let Some(m) = members.iter_mut().find(|m| m.address == address) {
                m.events_local_lane = on;
            }
            None
        });
    }

    /// Records a heartbeat. The worker says whether it is draining (it may have been
    /// drained or undrained at its own machine); watchers wake only when that
    /// changes whether it may hold layers.
    pub fn heartbeat(&self, address: &str, state: WorkerState, beat: Heartbeat) {
        self.modify(|members| {
            let m = members.iter_mut().find(|m| m.address == address)?;
            m.heartbeat = beat;
            m.description.state = state as i32;
            if m.status_set_at.is_some_and(|t| t.elapsed() < STATUS_SETTLE) {
                return None;
            }
            let draining = state == WorkerState::Draining;
            let next = match (&m.status, draining) {
                (NodeStatus::Ready, true) => NodeStatus::Draining,
                (NodeStatus::Draining, false) => NodeStatus::Ready,
                _ => return None,
            };
            tracing::info!(%address, status = next.label(), "the worker changed its drain state");
            m.status = next;
            Some(Change::Updated(m.clone()))
        });
    }

    /// A Join request from `peer`, checked.
    pub async fn join(&self, mut description: WorkerDescription, peer: Option<IpAddr>) -> Result<(), CoordinatorError> {
        if description.protocol_version != PROTOCOL_VERSION {
            return Err(CoordinatorError::ProtocolVersion {
                got: description.protocol_version,
                expected: PROTOCOL_VERSION,
            });
        }
        if description.grpc_address.is_empty() {
            return Err(CoordinatorError::BadRequest("the worker gave no grpc_address".into()));
        }
        if let Some(peer) = peer {
            description.grpc_address = reachable_address(&description.grpc_address, peer);
        }
        if strata_trust::transport().secure() {
            // The description is the caller's word; with mutual TLS only a worker that
            // answers at that address with this cluster's certificate (enrolled now if
            // it proves it holds the token) is taken, as it describes itself there.
            let reached = description.grpc_address.clone();
            let member = describe_once(&reached).await.map_err(|e| {
                if let ClusterError::Refused { address, reason } = &e {
                    self.refuse(address, reason);
                }
                CoordinatorError::NotTrusted(e.to_string())
            })?;
            description = WorkerDescription { grpc_address: reached, ..member.description };
        }
        let (address, name) = (description.grpc_address.clone(), description.name.clone());
        match self.add(Member::new(address.clone(), description)) {
            Added::KnownElsewhere(elsewhere) => {
                tracing::info!(%address, %name, %elsewhere, "worker joined; already known at another address")
            }
            _ => tracing::info!(%address, %name, "worker joined"),
        }
        Ok(())
    }

    /// Records that the worker at `address` was refused, so `strata status` can say
    /// why a machine that was started is not in the cluster.
    pub fn refuse(&self, address: &str, reason: &str) {
        tracing::warn!(%address, %reason, "refused a worker");
        let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        refusals.retain(|r| r.address != address || r.reason != reason);
        if refusals.len() == REFUSALS_KEPT {
            refusals.pop_front();
        }
        refusals.push_back(Refusal { address: address.to_string(), reason: reason.to_string(), at: Instant::now() });
    }

    /// Counts `bytes` of a shard file sent to a worker pulling it.
    pub fn count_weights_served(&self, bytes: u64) {
        self.weights_served.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes of shard files the workers pulled since the coordinator started.
    pub fn weights_served(&self) -> u64 {
        self.weights_served.load(Ordering::Relaxed)
    }

    /// The workers refused lately, oldest first.
    pub fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Waits until at least `count` workers may hold layers, for at most `wait`.
    pub async fn wait_for(&self, count: usize, wait: Duration) -> Result<Vec<Member>, ClusterError> {
        let mut rx = self.members.subscribe();
        let ready = |m: &Vec<Member>| m.iter().filter(|m| m.status == NodeStatus::Ready).count();
        let found = tokio::time::timeout(wait, rx.wait_for(|m| ready(m) >= count))
            .await
            .ok()
            .and_then(|r| r.ok().map(|m| m.clone()));
        found.ok_or_else(|| ClusterError::NotEnoughWorkers {
            found: ready(&self.members.borrow()),
            wanted: count,
            waited: wait,
        })
    }
}

/// Where a joining worker is reached. A worker listening on every address with no
/// `--advertise` only knows itself as 127.0.0.1; from another machine it is reached
/// at the address its Join came from.
fn reachable_address(given: &str, peer: IpAddr) -> String {
    match given.parse::<SocketAddr>() {
        Ok(a) if (a.ip().is_loopback() || a.ip().is_unspecified()) && !peer.is_loopback() => {
            SocketAddr::new(peer, a.port()).to_string()
        }
        _ => given.to_string(),
    }
}

/// Describes a worker once. With mutual TLS, a worker not enrolled yet is enrolled
/// first if its certificate carries the token's proof, and the node its
/// certificate names is remembered for `address` (and must be the one it
/// describes).
pub async fn describe_once(address: &str) -> Result<Member, ClusterError> {
    let worker = |message: String| ClusterError::Worker { address: address.to_string(), message };
    let refused = |reason: String| ClusterError::Refused { address: address.to_string(), reason };
    let transport = strata_trust::transport();
    let seen = SeenCertificate::default();
    let channel = transport
        .connect(address, Dial::Discover(seen.clone()))
        .await
        .map_err(|e| worker(format!("cannot connect: {e}")))?;
    let mut client = WorkerClient::new(channel);
    let node = match transport.authority() {
        Some(authority) => Some(enrol_if_new(address, &mut client, authority, seen).await.map_err(refused)?),
        None => None,
    };
    let description =
        client.describe(DescribeRequest {}).await.map_err(|s| worker(s.message().to_string()))?;
    let description = description.into_inner();
    if let Some(node) = node {
        if description.node_id != node.as_str() {
            return Err(refused(format!(
                "its certificate is node {node}'s but it describes itself as {:?}",
                description.node_id
            )));
        }
    }
    if description.protocol_version != PROTOCOL_VERSION {
        return Err(worker(format!(
            "speaks protocol version {}, this coordinator {PROTOCOL_VERSION}",
            description.protocol_version
        )));
    }
    Ok(Member::new(address.to_string(), description))
}

/// The node of the worker `client` reached at `address`, enrolled now if it was
/// waiting to be, and remembered for that address.
async fn enrol_if_new(
    address: &str,
    client: &mut WorkerClient<Channel>,
    authority: &Authority,
    seen: SeenCertificate,
) -> Result<NodeId, String> {
    let transport = strata_trust::transport();
    let certificate = seen.get().ok_or("no certificate")?;
    let identity = names::cert_info(&certificate).map(|i| i.identity);
    let node = match identity {
        Some(CertIdentity::Worker(node)) if transport.is_revoked(&node) => return Err(format!("node {node} was revoked")),
        Some(CertIdentity::Worker(node)) => node,
        Some(CertIdentity::Enrolling { .. }) => {
            let enrolment = authority.enrol(&certificate).map_err(|e| e.to_string())?;
            let request = v1::EnrollRequest {
                certificate_der: enrolment.certificate_der,
                ca_certificate_der: authority.ca_der().to_vec(),
                revoked_node_ids: authority.revoked().iter().map(|n| n.to_string()).collect(),
            };
            client.enroll(request).await.map_err(|s| format!("enrolment failed: {}", s.message()))?;
            tracing::info!(%address, node = %enrolment.node, "enrolled a worker");
            enrolment.node
        }
        _ => return Err("it did not present a worker's certificate".into()),
    };
    transport.learn(address, &node);
    Ok(node)
}

/// Describes a worker, retrying until it answers or `wait` runs out.
pub async fn describe(address: &str, wait: Duration) -> Result<Member, ClusterError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut delay = Duration::from_millis(50);
    loop {
        match describe_once(address).await {
            Ok(member) => return Ok(member),
            // It answered, and will answer the same again.
            Err(e @ ClusterError::Refused { .. }) => return Err(e),
            Err(e) if tokio::time::Instant::now() + delay >= deadline => return Err(e),
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(address: &str, node_id: &str) -> Member {
        let description = WorkerDescription { node_id: node_id.into(), name: node_id.into(), ..Default::default() };
        Member::new(address.into(), description)
    }

    fn addresses(membership: &Membership) -> Vec<String> {
        membership.members().into_iter().map(|m| m.address).collect()
    }

    #[tokio::test]
    async fn a_worker_found_and_then_joined_at_another_address_is_one_member() {
        let membership = Membership::default();
        assert_eq!(membership.add(member("10.0.0.5:7070", "n1")), Added::New);
        // The same worker, joining with the address it was told to give.
        assert_eq!(membership.add(member("gaming-pc:7070", "n1")), Added::KnownElsewhere("10.0.0.5:7070".into()));
        assert_eq!(addresses(&membership), ["10.0.0.5:7070"]);
        assert_eq!(
            membership.join(
                WorkerDescription {
                    protocol_version: PROTOCOL_VERSION,
                    grpc_address: "gaming-pc:7070".into(),
                    node_id: "n1".into(),
                    ..Default::default()
                },
                None
            )
            .await,
            Ok(())
        );
        assert_eq!(addresses(&membership), ["10.0.0.5:7070"]);
        assert_eq!(membership.add(member("10.0.0.6:7070", "n2")), Added::New);
        assert_eq!(addresses(&membership), ["10.0.0.5:7070", "10.0.0.6:7070"]);
    }

    #[test]
    fn a_gone_worker_back_at_a_new_address_moves_there() {
        let membership = Membership::default();
        membership.add(member("10.0.0.5:7070", "n1"));
        membership.set_status("10.0.0.5:7070", NodeStatus::Draining);
        assert_eq!(membership.add(member("10.0.0.5:7070", "n1")), Added::Updated);
        assert_eq!(membership.members()[0].status, NodeStatus::Draining, "a drain outlives a restart");
        membership.set_status("10.0.0.5:7070", NodeStatus::Gone { since: Instant::now(), reason: "cut".into() });
        assert_eq!(membership.add(member("10.0.0.9:7070", "n1")), Added::Updated);
        assert_eq!(addresses(&membership), ["10.0.0.9:7070"]);
    }

    #[test]
    fn refusals_are_kept_once_each_and_only_the_newest() {
        let membership = Membership::default();
        membership.refuse("10.0.0.4:7070", "no token");
        membership.refuse("10.0.0.4:7070", "found over mDNS: no token");
        membership.refuse("10.0.0.4:7070", "no token");
        let reasons: Vec<String> = membership.refusals().into_iter().map(|r| r.reason).collect();
        assert_eq!(reasons, ["found over mDNS: no token", "no token"], "the same refusal again moves to the end");
        for i in 0..REFUSALS_KEPT {
            membership.refuse(&format!("10.0.1.{i}:7070"), "no token");
        }
        let refusals = membership.refusals();
        assert_eq!(refusals.len(), REFUSALS_KEPT);
        assert_eq!(refusals[0].address, "10.0.1.0:7070");
        assert!(membership.members().is_empty(), "a refused worker is never a member");
    }

    #[test]
    fn a_worker_that_only_knows_itself_as_loopback_is_reached_where_its_join_came_from() {
        let lan: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(reachable_address("127.0.0.1:7070", lan), "10.0.0.7:7070");
        assert_eq!(reachable_address("0.0.0.0:7070", lan), "10.0.0.7:7070");
        assert_eq!(reachable_address("10.0.0.9:7070", lan), "10.0.0.9:7070", "an advertised address is kept");
        assert_eq!(reachable_address("gaming-pc:7070", lan), "gaming-pc:7070");
        assert_eq!(reachable_address("127.0.0.1:7070", "127.0.0.1".parse().unwrap()), "127.0.0.1:7070");
    }

    #[test]
    fn every_change_is_published_once_with_the_next_generation() {
        let m = Membership::default();
        let mut changes = m.changes();
        m.add(member("a:1", "n1"));
        m.set_status("a:1", NodeStatus::Draining);
        m.set_status("a:1", NodeStatus::Draining);
        m.heartbeat("a:1", WorkerState::Serving, Heartbeat::default());
        m.remove("a:1");
        let mut seen = Vec::new();
        while let Ok(c) = changes.try_recv() {
            let kind = match &c.change {
                Change::Added(_) => "added",
                Change::Updated(m) => m.status.label(),
                Change::Removed(_) => "removed",
            };
            seen.push((c.generation, kind));
        }
        // Setting the same status twice is no change; the heartbeat came too soon
        // after the coordinator set it to undo it.
        assert_eq!(seen, [(1, "added"), (2, "draining"), (3, "removed")]);
        assert_eq!(m.generation(), 3);
    }

    #[test]
    fn workers_without_a_node_id_are_told_apart_by_address() {
        let membership = Membership::default();
        membership.add(member("127.0.0.1:1", ""));
        membership.add(member("127.0.0.1:2", ""));
        assert_eq!(addresses(&membership), ["127.0.0.1:1", "127.0.0.1:2"]);
    }
}
