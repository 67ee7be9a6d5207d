//! What a worker measures of its links to the workers it streams to (the next stage,
//! or stage 0 for direct-return tokens): bytes sent, and the round-trip time of a
//! small call over the same connection. Heartbeats carry them to the coordinator,
//! which shows them per link (`strata status`, `/metrics`, the dashboard): a slow
//! link holds back every token that crosses it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_proto::v1;
use strata_proto::v1::worker_client::WorkerClient;
use tokio::sync::watch;
use tonic::transport::Channel;

/// How often a link's round trip is measured.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// One link's figures.
#[derive(Debug, Default)]
pub struct LinkGauge {
    bytes_sent: AtomicU64,
    /// The last round trip in microseconds; 0 while none succeeded.
    rtt_micros: AtomicU64,
    /// Frames go over a local lane ([`crate::local_lane`]).
    local_lane: AtomicBool,
}

impl LinkGauge {
    pub fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn set_local_lane(&self, on: bool) {
        self.local_lane.store(on, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub fn is_local_lane(&self) -> bool {
        self.local_lane.load(Ordering::Relaxed)
    }

    fn round_trip(&self, took: Option<Duration>) {
        let micros = took.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
        self.rtt_micros.store(micros, Ordering::Relaxed);
    }
}

/// Every link of this worker, by peer address, for as long as the worker runs (a
/// re-plan that streams to the same peer again keeps counting).
#[derive(Debug, Default)]
pub struct Links {
    by_address: Mutex<BTreeMap<String, Arc<LinkGauge>>>,
}

impl Links {
    pub fn to(&self, address: &str) -> Arc<LinkGauge> {
        let mut links = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        links.entry(address.to_string()).or_default().clone()
    }

    /// The links in use: those a shard's forwarders hold (a link to a peer of an
    /// unloaded pipeline is left out until it is used again).
    pub fn snapshot(&self) -> Vec<v1::LinkReport> {
        let links = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        links
            .iter()
            .filter(|(_, g)| Arc::strong_count(g) > 1)
            .map(|(address, g)| v1::LinkReport {
                address: address.clone(),
                bytes_sent: g.bytes_sent.load(Ordering::Relaxed),
                rtt_seconds: g.rtt_micros.load(Ordering::Relaxed) as f64 / 1e6,
                local_lane: g.local_lane.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Measures the round trip to the peer on `channel` every [`PING_INTERVAL`] with a
/// Health call (a few bytes each way over the connection the frames use) until the
/// worker stops; a failed call leaves the link without a figure.
pub async fn ping(channel: Channel, gauge: Arc<LinkGauge>, mut stop: watch::Receiver<bool>) {
    let mut client = WorkerClient::new(channel);
    loop {
        let started = tokio::time::Instant::now();
        let answered = tokio::time::timeout(PING_INTERVAL, client.health(v1::HealthRequest::default())).await;
        gauge.round_trip(matches!(answered, Ok(Ok(_))).then(|| started.elapsed()));
        tokio::select! {
            _ = tokio::time::sleep(PING_INTERVAL) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_counts_across_re_plans_and_reports_its_round_trip() {
        let links = Links::default();
        let held = [links.to("10.0.0.2:7000"), links.to("10.0.0.3:7000")];
        links.to("10.0.0.2:7000").sent(100);
        links.to("10.0.0.2:7000").sent(20);
        links.to("10.0.0.3:7000").round_trip(Some(Duration::from_micros(1500)));
        links.to("10.0.0.3:7000").set_local_lane(true);
        links.to("10.0.0.4:7000");
        let report = links.snapshot();
        assert_eq!(report.len(), 2);
        assert_eq!(
            (report[0].address.as_str(), report[0].bytes_sent, report[0].rtt_seconds),
            ("10.0.0.2:7000", 120, 0.0)
        );
        assert_eq!((report[1].bytes_sent, report[1].rtt_seconds, report[1].local_lane), (0, 0.0015, true));
        assert!(!report[0].local_lane);
        links.to("10.0.0.3:7000").round_trip(None);
        assert_eq!(links.snapshot()[1].rtt_seconds, 0.0, "a failed call leaves no figure");
        drop(held);
        assert!(links.snapshot().is_empty(), "links no forwarder holds are left out");
    }
}
