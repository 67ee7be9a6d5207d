//! Following one worker: its Events stream carries tokens and errors (to the
//! scheduler) and heartbeats (to the membership); a silent or closed stream means
//! the worker is gone. A worker on this machine sends its tokens and errors over a
//! local lane instead ([`super::event_lane`]), and the stream only heartbeats.

use std::sync::Arc;
use std::time::Instant;

use strata_proto::v1::{self, worker_event, WorkerState};
use tokio::sync::mpsc;

use super::super::membership::{Heartbeat, Membership, NodeKey, NodeStatus};
use super::super::messages::SchedulerMsg;
use super::super::{HopSamples, WorkerClient, HEARTBEAT_TIMEOUT};
use super::event_lane::EventLane;
use super::events::Event;

/// Follows one worker's Events: tokens and errors go to the scheduler, heartbeats
/// to the membership; a silent or closed stream means the worker is gone.
pub async fn follow_worker(
    address: String,
    mut client: WorkerClient,
    scheduler: mpsc::UnboundedSender<SchedulerMsg>,
    events: mpsc::UnboundedSender<Event>,
    membership: Arc<Membership>,
    token_hops: Arc<HopSamples>,
) {
    // Under mutual TLS only a worker that answers as the node we enrolled; an
    // --insecure cluster checks what it can, the node the worker described.
    let expected = match membership.key_of(&address) {
        NodeKey::Id(node) => Some(node),
        NodeKey::Address(_) => None,
    };
    let mut lane = if expected.is_some() || !strata_trust::transport().secure() {
        EventLane::open(&address, expected, scheduler.clone(), token_hops.clone()).await
    } else {
        None
    };
    let heartbeats_only = lane.is_some();
    membership.set_events_local_lane(&address, heartbeats_only);
    let reason = match client.events(v1::EventsRequest { heartbeats_only }).await {
        Err(s) => format!("cannot subscribe to its events: {}", s.message()),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            loop {
                let message = tokio::time::timeout(HEARTBEAT_TIMEOUT, stream.message());
                let message = match &mut lane {
                    None => message.await,
                    Some(lane) => tokio::select! {
                        message = message => message,
                        why = lane.ended() => break format!("its local event lane closed: {why}"),
                    },
                };
                match message {
                    Ok(Ok(Some(event))) => match &event.kind {
                        Some(worker_event::Kind::Heartbeat(h)) => {
                            let state = WorkerState::try_from(h.state).unwrap_or(WorkerState::Unspecified);
                            let beat = Heartbeat {
                                memory_used_bytes: h.memory_used_bytes,
                                kv_cache_bytes: h.kv_cache_bytes,
                                links: h.links.clone(),
                                sequences: h.sequences,
                                pipelines: h.pipelines.clone(),
                                tokens_computed: h.tokens_computed,
                                batches: h.batches,
                                busy_seconds: h.busy_seconds,
                                frames: h.frames,
                                queue_seconds: h.queue_seconds,
                                drain_reason: h.drain_reason.clone(),
                                pulls: h.pulls.iter().map(Into::into).collect(),
                            };
                            membership.heartbeat(&address, state, beat);
                        }
                        Some(worker_event::Kind::Token(t)) => {
                            token_hops.record(t.sent_unix_nanos);
                            if scheduler.send(SchedulerMsg::Event { event }).is_err() {
                                return;
                            }
                        }
                        _ => {
                            if scheduler.send(SchedulerMsg::Event { event }).is_err() {
                                return;
                            }
                        }
                    },
                    Ok(Ok(None)) => break "its event stream ended".to_string(),
                    Ok(Err(s)) => break format!("its event stream failed: {}", s.message()),
                    Err(_) => break format!("no heartbeat for {HEARTBEAT_TIMEOUT:?}"),
                }
            }
        }
    };
    if let Some(lane) = lane {
        lane.close();
        membership.set_events_local_lane(&address, false);
    }
    // Marked here, not only by the controller: a load in progress must notice
    // this at once (and status shows it).
    membership.set_status(&address, NodeStatus::Gone { since: Instant::now(), reason: reason.clone() });
    let _ = events.send(Event::Lost { address, reason });
}
