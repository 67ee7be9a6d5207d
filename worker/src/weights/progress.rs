//! The worker's pulls in progress: each one's bytes and rate, for the LoadProgress
//! events a pull emits and the heartbeats that carry them to the coordinator
//! (`strata status` shows them).
//!
//! The registry also keeps two loads in this worker from pulling the same shard at
//! once: a pull registers its shard file before it touches the partial file, and a
//! second pull of it waits until the first one's entry is gone (see `pull`).

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_proto::v1::{self, worker_event, LoadProgress};

use crate::events::{lock, EventHub};

/// The rate is the bytes received over about this long.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The pulls of one worker.
#[derive(Debug)]
pub struct Pulls {
    hub: Arc<EventHub>,
    /// By the shard file pulled into.
    active: Mutex<HashMap<PathBuf, Progress>>,
}

/// One pull's figures.
#[derive(Debug, Clone)]
struct Progress {
    layers: Range<usize>,
    /// Bytes of the file held (kept from an earlier pull included), and its size; 0
    /// until the manifest came.
    done: u64,
    total: u64,
    rate: Rate,
}

impl Pulls {
    pub fn new(hub: Arc<EventHub>) -> Self {
        Self { hub, active: Mutex::default() }
    }

    /// Registers a pull of the shard file `dest`, until the entry is dropped; `None`
    /// while another pull of that file in this worker holds it.
    pub fn start(&self, dest: &Path, layers: Range<usize>, now: Instant) -> Option<PullEntry<'_>> {
        let mut active = lock(&self.active);
        if active.contains_key(dest) {
            return None;
        }
        active.insert(dest.to_path_buf(), Progress { layers, done: 0, total: 0, rate: Rate::new(now) });
        Some(PullEntry { pulls: self, dest: dest.to_path_buf() })
    }

    /// Every pull whose manifest came, as heartbeats carry them.
    pub fn snapshot(&self, now: Instant) -> Vec<v1::PullProgress> {
        let mut active = lock(&self.active);
        let mut out: Vec<v1::PullProgress> = active
            .values_mut()
            .filter(|p| p.total > 0)
            .map(|p| v1::PullProgress {
                layer_start: p.layers.start as u32,
                layer_end: p.layers.end as u32,
                bytes_done: p.done,
                bytes_total: p.total,
                bytes_per_second: p.rate.per_second(now),
            })
            .collect();
        out.sort_by_key(|p| (p.layer_start, p.layer_end));
        out
    }
}

/// A registered pull; dropping it ends the registration.
#[derive(Debug)]
pub struct PullEntry<'a> {
    pulls: &'a Pulls,
    dest: PathBuf,
}

impl PullEntry<'_> {
    /// A manifest came at `now`: the file has `total` bytes, of which the worker
    /// holds `done` (kept from an earlier pull). The rate counts from here: the wait
    /// before (the coordinator cutting the shard file, seconds for a large one) is
    /// no part of the stream's speed.
    pub fn begin(&self, done: u64, total: u64, now: Instant) {
        self.update(|p| {
            p.done = done;
            p.total = total;
            p.rate = Rate::new(now);
        });
    }

    /// `bytes` more were received at `now`.
    pub fn advance(&self, bytes: u64, now: Instant) {
        self.update(|p| {
            p.done += bytes;
            p.rate.record(bytes, now);
        });
    }

    fn update(&self, change: impl FnOnce(&mut Progress)) {
        let event = {
            let mut active = lock(&self.pulls.active);
            let Some(p) = active.get_mut(&self.dest) else { return };
            change(p);
            LoadProgress { bytes_done: p.done, bytes_total: p.total }
        };
        self.pulls.hub.emit(worker_event::Kind::LoadProgress(event));
    }
}

impl Drop for PullEntry<'_> {
    fn drop(&mut self) {
        lock(&self.pulls.active).remove(&self.dest);
    }
}

/// Bytes received per second over the last [`RATE_WINDOW`].
#[derive(Debug, Clone)]
struct Rate {
    /// (when, bytes received by then), oldest first: the newest at least the window
    /// old, then every later one.
    samples: Vec<(Instant, u64)>,
    received: u64,
}

impl Rate {
    fn new(now: Instant) -> Self {
        Self { samples: vec![(now, 0)], received: 0 }
    }

    fn record(&mut self, bytes: u64, now: Instant) {
        self.received += bytes;
        self.samples.push((now, self.received));
        self.forget(now);
    }

    /// Samples older than one at least a window old say nothing about the window.
    fn forget(&mut self, now: Instant) {
        let Some(cutoff) = now.checked_sub(RATE_WINDOW) else { return };
        let old = self.samples.iter().take_while(|(t, _)| *t <= cutoff).count();
        if old > 1 {
            self.samples.drain(..old - 1);
        }
    }

    /// From the first sample of the window to `now`: a pull that stalls slows down
    /// to 0 as the window passes, rather than showing its last speed.
    fn per_second(&mut self, now: Instant) -> f64 {
        self.forget(now);
        let Some(&(since, base)) = self.samples.first() else { return 0.0 };
        let seconds = now.saturating_duration_since(since).as_secs_f64();
        if seconds <= 0.0 {
            return 0.0;
        }
        (self.received - base) as f64 / seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn the_rate_is_what_came_over_the_last_window() {
        let t0 = Instant::now();
        let mut rate = Rate::new(t0);
        assert_eq!(rate.per_second(t0), 0.0);
        // 10 MB a second for ten seconds, in 100 ms steps.
        for step in 1..=100 {
            rate.record(MB, at(t0, step * 100));
        }
        assert_eq!(rate.per_second(at(t0, 10_000)), 10.0 * MB as f64);
        // Then 1 MB a second: after a whole window, only the slow part counts.
        for step in 1..=60 {
            rate.record(MB / 10, at(t0, 10_000 + step * 100));
        }
        let slow = rate.per_second(at(t0, 16_000));
        assert!((slow - MB as f64).abs() < 1.0, "{slow}");
        assert!(rate.samples.len() <= 52, "old samples are forgotten: {}", rate.samples.len());
        // A stall: nothing comes for a window, and the rate falls to 0.
        let stalled = rate.per_second(at(t0, 18_000));
        assert!(stalled < slow, "{stalled}");
        assert_eq!(rate.per_second(at(t0, 21_100)), 0.0);
    }

    #[test]
    fn a_pull_reports_what_it_holds_and_its_rate_until_it_ends() {
        let hub = Arc::new(EventHub::default());
        let mut events = hub.subscribe();
        let pulls = Pulls::new(hub);
        let t0 = Instant::now();
        let dest = Path::new("/cache/h/layers-0-4.gguf");
        let entry = pulls.start(dest, 0..4, t0).unwrap();
        // A second pull of the same file waits; another file does not.
        assert!(pulls.start(dest, 0..4, t0).is_none());
        assert!(pulls.start(Path::new("/cache/h/layers-4-8.gguf"), 4..8, t0).is_some());
        // Nothing to show before the manifest.
        assert!(pulls.snapshot(t0).is_empty());
        // Resumed: 400 MB of 1000 MB were kept; 100 MB more come in two seconds.
        entry.begin(400 * MB, 1000 * MB, t0);
        entry.advance(50 * MB, at(t0, 1000));
        entry.advance(50 * MB, at(t0, 2000));
        let shown = pulls.snapshot(at(t0, 2000));
        assert_eq!(shown.len(), 1);
        let p = &shown[0];
        assert_eq!((p.layer_start, p.layer_end, p.bytes_done, p.bytes_total), (0, 4, 500 * MB, 1000 * MB));
        assert_eq!(p.bytes_per_second, 50.0 * MB as f64, "kept bytes are not received bytes");
        let mut last = None;
        while let Ok(e) = events.try_recv() {
            if let Some(worker_event::Kind::LoadProgress(p)) = e.kind {
                last = Some(p);
            }
        }
        assert_eq!(last, Some(LoadProgress { bytes_done: 500 * MB, bytes_total: 1000 * MB }));
        drop(entry);
        assert!(pulls.snapshot(at(t0, 2000)).is_empty());
        assert!(pulls.start(dest, 0..4, t0).is_some(), "the shard may be pulled again");
    }

    #[test]
    fn the_rate_counts_from_the_manifest_not_from_the_wait_for_it() {
        let pulls = Pulls::new(Arc::new(EventHub::default()));
        let t0 = Instant::now();
        let entry = pulls.start(Path::new("/cache/h/layers-0-1.gguf"), 0..1, t0).unwrap();
        // The coordinator takes 10 s to cut the shard, then 50 MB come a second.
        entry.begin(0, 1000 * MB, at(t0, 10_000));
        entry.advance(50 * MB, at(t0, 11_000));
        entry.advance(50 * MB, at(t0, 12_000));
        assert_eq!(pulls.snapshot(at(t0, 12_000))[0].bytes_per_second, 50.0 * MB as f64);
    }
}
