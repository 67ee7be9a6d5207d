//! A worker's events over a local lane, where the worker runs on this machine: a
//! thread of ours reads them from a Unix socket and hands them to the scheduler,
//! past both tokio runtimes and HTTP/2.
//!
//! Why: every token a pipeline makes is an event to the coordinator. Over the Events
//! stream it took ~115 µs of the last worker's runtime to send and ~120 µs of ours
//! to take (a `perf sched` trace, 2026-12-05, three workers on two cores), CPU time
//! taken from the first stage, which computes the next token meanwhile. Over a lane
//! it is one write by the worker's compute thread and one read here.
//!
//! The worker's Events stream stays open for heartbeats (`heartbeats_only`), so a
//! worker that goes silent is found gone as before; a lane that closes is a worker
//! gone as well. Who may use the lane is as for the workers' own lanes (see the
//! worker's `local_lane`): processes of this user, and the worker must answer as the
//! node this coordinator knows at that address.

use std::sync::{Arc, Mutex, PoisonError};

use prost::Message as _;
use strata_platform::local_socket::LocalStream;
use strata_proto::local_lane::{self, LaneGreeting};
use strata_proto::v1::{worker_event, WorkerEvent};
use strata_proto::{NodeId, MAX_MESSAGE_BYTES};
use tokio::sync::{mpsc, oneshot};

use super::super::messages::SchedulerMsg;
use super::super::HopSamples;

/// The events of one worker coming over a local lane.
pub struct EventLane {
    /// A handle on the socket, to close it while the reading thread waits on it.
    closer: LocalStream,
    /// Whether events still go to the scheduler; the reading thread forwards each
    /// under this lock, so none follows the worker's loss once it is reported.
    forwarding: Arc<Mutex<bool>>,
    ended: oneshot::Receiver<String>,
}

impl EventLane {
    /// Opens the lane of the worker at `address` if it serves one on this machine
    /// and answers as `expected` (any node where `None`), and starts forwarding its
    /// events. `None`: take them over the Events stream.
    pub async fn open(
        address: &str,
        expected: Option<NodeId>,
        scheduler: mpsc::UnboundedSender<SchedulerMsg>,
        token_hops: Arc<HopSamples>,
    ) -> Option<Self> {
        let owned = address.to_string();
        let opened =
            tokio::task::spawn_blocking(move || local_lane::open(&owned, &LaneGreeting::Events, expected.as_ref()));
        let lane = match opened.await {
            Ok(Ok(Some(lane))) => lane,
            Ok(Ok(None)) | Err(_) => return None,
            Ok(Err(e)) => {
                tracing::warn!(%address, error = %e, "a local event lane was given up; using the Events stream");
                return None;
            }
        };
        let closer = lane.try_clone().ok()?;
        let forwarding = Arc::new(Mutex::new(true));
        let (ended_tx, ended) = oneshot::channel();
        let gate = forwarding.clone();
        let spawned = std::thread::Builder::new().name("event-lane".into()).spawn(move || {
            let _ = ended_tx.send(forward(lane, &scheduler, &token_hops, &gate));
        });
        if let Err(e) = spawned {
            tracing::warn!(%address, error = %e, "cannot read a local event lane; using the Events stream");
            return None;
        }
        tracing::info!(%address, "this worker's events come over a local lane");
        Some(Self { closer, forwarding, ended })
    }

    /// Why the lane ended, once it has.
    pub async fn ended(&mut self) -> String {
        (&mut self.ended).await.unwrap_or_else(|_| "its reading thread ended".into())
    }

    /// Stops forwarding (no event reaches the scheduler after this returns) and
    /// closes the lane.
    pub fn close(self) {
        *self.forwarding.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.closer.close();
    }
}

/// Hands the lane's events to the scheduler until it ends; returns why it ended.
fn forward(
    mut lane: LocalStream,
    scheduler: &mpsc::UnboundedSender<SchedulerMsg>,
    token_hops: &HopSamples,
    forwarding: &Mutex<bool>,
) -> String {
    let mut buffer = Vec::new();
    loop {
        match lane.read_record(&mut buffer, MAX_MESSAGE_BYTES) {
            Ok(true) => {}
            Ok(false) => return "the worker closed it".into(),
            Err(e) => return e.to_string(),
        }
        let event = match WorkerEvent::decode(buffer.as_slice()) {
            Ok(event) => event,
            Err(e) => return format!("an event that does not decode: {e}"),
        };
        if let Some(worker_event::Kind::Token(t)) = &event.kind {
            token_hops.record(t.sent_unix_nanos);
        }
        let forwarding = forwarding.lock().unwrap_or_else(PoisonError::into_inner);
        if !*forwarding || scheduler.send(SchedulerMsg::Event { event }).is_err() {
            return "no longer followed".into();
        }
    }
}
