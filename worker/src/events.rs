//! Fan-out of worker events to every Events subscriber, and the counters the Stats
//! RPC reports.
//!
//! The compute thread emits events without ever waiting: each subscriber has an
//! unbounded queue, and a subscriber that went away is dropped on the next emit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use strata_platform::local_socket::LocalStream;
use strata_proto::v1::{self, worker_event, ErrorCode, WorkerEvent};
use tokio::sync::mpsc;

#[derive(Default)]
pub struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub").field("subscribers", &lock(&self.subscribers).len()).finish()
    }
}

/// Where a subscriber's events go.
enum Subscriber {
    /// An Events stream's queue.
    Stream(mpsc::UnboundedSender<WorkerEvent>),
    /// A local lane to the coordinator ([`crate::local_lane`]), written by whoever
    /// emits: a token's event then costs one write, not a wake of the runtime and
    /// an HTTP/2 frame. A write waits only while the coordinator's reading thread
    /// is behind by a socket buffer.
    Lane { lane: LocalStream, buffer: Vec<u8> },
}

impl EventHub {
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<WorkerEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.subscribers).push(Subscriber::Stream(tx));
        rx
    }

    /// Sends the events from now on over `lane` too.
    pub fn subscribe_lane(&self, lane: LocalStream) {
        lock(&self.subscribers).push(Subscriber::Lane { lane, buffer: Vec::new() });
    }

    pub fn emit(&self, kind: worker_event::Kind) {
        let event = WorkerEvent { kind: Some(kind) };
        lock(&self.subscribers).retain_mut(|s| match s {
            Subscriber::Stream(tx) => tx.send(event.clone()).is_ok(),
            Subscriber::Lane { lane, buffer } => {
                let written = lane.write_encoded(buffer, |b| event.encode(b).map_err(std::io::Error::other));
                if let Err(e) = &written {
                    // The coordinator hears of it: its end of the lane closes.
                    tracing::warn!(error = %e, "the events lane to the coordinator broke");
                    lane.close();
                }
                written.is_ok()
            }
        });
    }

    pub fn sequence_error(&self, seq_id: u64, code: ErrorCode, message: String, stage_index: u32) {
        self.emit(sequence_error(seq_id, code, message, stage_index));
    }
}

/// The event that fails sequence `seq_id` (logged as it is made).
pub fn sequence_error(seq_id: u64, code: ErrorCode, message: String, stage_index: u32) -> worker_event::Kind {
    tracing::debug!(seq_id, ?code, %message, "sequence error");
    worker_event::Kind::Error(v1::SequenceError { seq_id, code: code as i32, message, stage_index })
}

/// Holds `m` even if a thread panicked while holding it: the data here (queues,
/// counters) stays consistent across a panic.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

const MAX_HOP_SAMPLES: usize = 100_000;

/// What the Stats RPC reports, collected since the last reset.
#[derive(Debug, Default)]
pub struct Stats {
    hops: Mutex<VecDeque<u32>>,
    batches: AtomicU64,
    frames: AtomicU64,
    busy_nanos: AtomicU64,
    lifetime: Lifetime,
    weight_loaded_bytes: AtomicU64,
    weight_peak_bytes: AtomicU64,
}

/// Counters since the worker started, for heartbeats: the Stats RPC's reset does
/// not touch them.
#[derive(Debug, Default)]
struct Lifetime {
    tokens: AtomicU64,
    batches: AtomicU64,
    busy_nanos: AtomicU64,
    frames: AtomicU64,
    queue_nanos: AtomicU64,
}

/// What [`Stats::lifetime`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LifetimeCounters {
    pub tokens: u64,
    pub batches: u64,
    pub busy_seconds: f64,
    pub frames: u64,
    /// Summed over the frames: how long each waited from arriving to the start
    /// of its forward.
    pub queue_seconds: f64,
}

impl Stats {
    /// Records the hop of a frame stamped `sent_unix_nanos` by its sender.
    pub fn record_hop(&self, sent_unix_nanos: u64) {
        if sent_unix_nanos == 0 {
            return;
        }
        let micros = unix_nanos().saturating_sub(sent_unix_nanos) / 1_000;
        let mut hops = lock(&self.hops);
        if hops.len() == MAX_HOP_SAMPLES {
            hops.pop_front();
        }
        hops.push_back(micros.min(u32::MAX as u64) as u32);
    }

    /// Records a forward of `frames` frames holding `tokens` token positions, and
    /// how long those frames waited for it, summed.
    pub fn record_batch(&self, frames: usize, tokens: usize, busy: Duration, queued: Duration) {
        let busy = busy.as_nanos() as u64;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.busy_nanos.fetch_add(busy, Ordering::Relaxed);
        self.lifetime.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.lifetime.batches.fetch_add(1, Ordering::Relaxed);
        self.lifetime.busy_nanos.fetch_add(busy, Ordering::Relaxed);
        self.lifetime.frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.lifetime.queue_nanos.fetch_add(queued.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn lifetime(&self) -> LifetimeCounters {
        LifetimeCounters {
            tokens: self.lifetime.tokens.load(Ordering::Relaxed),
            batches: self.lifetime.batches.load(Ordering::Relaxed),
            busy_seconds: self.lifetime.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            frames: self.lifetime.frames.load(Ordering::Relaxed),
            queue_seconds: self.lifetime.queue_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Counts the bytes of weights a shard load read.
    pub fn record_load(&self, loaded_bytes: u64) {
        self.weight_loaded_bytes.fetch_add(loaded_bytes, Ordering::Relaxed);
    }

    /// Raises the peak of weights held, given what is held now.
    pub fn note_weights(&self, resident_bytes: u64) {
        self.weight_peak_bytes.fetch_max(resident_bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self, reset: bool) -> v1::StatsResponse {
        let mut hops = lock(&self.hops);
        let response = v1::StatsResponse {
            hop_micros: hops.iter().copied().collect(),
            batches: self.batches.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            busy_seconds: self.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            weight_loaded_bytes: self.weight_loaded_bytes.load(Ordering::Relaxed),
            weight_peak_bytes: self.weight_peak_bytes.load(Ordering::Relaxed),
        };
        if reset {
            hops.clear();
            self.batches.store(0, Ordering::Relaxed);
            self.frames.store(0, Ordering::Relaxed);
            self.busy_nanos.store(0, Ordering::Relaxed);
            self.weight_loaded_bytes.store(0, Ordering::Relaxed);
            self.weight_peak_bytes.store(0, Ordering::Relaxed);
        }
        response
    }
}

/// Now, in nanoseconds since the unix epoch (0 if the clock is before it).
pub fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use strata_platform::local_socket;

    use super::*;

    #[test]
    fn a_lane_gets_every_event_until_it_breaks_and_is_then_dropped() {
        let address = format!("127.0.0.1:event-hub-{}", std::process::id());
        let (acceptor, _socket) = local_socket::bind(&address).unwrap();
        let mut coordinator = local_socket::connect(&address).unwrap();
        let hub = EventHub::default();
        let mut stream = hub.subscribe();
        hub.subscribe_lane(acceptor.accept().unwrap());
        hub.sequence_error(7, ErrorCode::NoShard, "a test".into(), 1);
        let mut record = Vec::new();
        assert!(coordinator.read_record(&mut record, 1024).unwrap());
        let over_lane = WorkerEvent::decode(record.as_slice()).unwrap();
        assert_eq!(Some(over_lane), stream.try_recv().ok(), "the same event on the lane and the stream");
        coordinator.close();
        hub.sequence_error(8, ErrorCode::NoShard, "a test".into(), 1);
        assert_eq!(lock(&hub.subscribers).len(), 1, "the broken lane is dropped, the stream kept");
    }
}
