//! Advertising the worker over mDNS: registered once the gRPC listener is bound,
//! re-checked every second so that what coordinators see (state, memory) follows
//! the worker, and withdrawn first on shutdown, before the gRPC server stops.
//!
//! mDNS is a convenience: when it cannot start (no multicast, the port held by
//! another mDNS stack alone) the worker says why and serves on without it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use strata_discovery::{Advertisement, Advertiser, AdvertiserOptions, ClusterTag};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::WorkerConfig;
use crate::service::WorkerService;

/// How often the advertisement is compared with the worker's description.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// How long shutdown waits for the goodbye to go out.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A running advertisement; [`Advertising::leave`] withdraws it.
pub struct Advertising {
    leave: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Advertising {
    /// Starts advertising `service`, whose gRPC server is bound to `local`; `None`
    /// (after a warning) when mDNS cannot run here.
    pub async fn start(service: WorkerService, config: &WorkerConfig, local: SocketAddr) -> Option<Self> {
        let (addresses, port) = match advertised(config.advertise.as_deref(), local).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("not advertising over mDNS: {e}");
                return None;
            }
        };
        let cluster = ClusterTag::of(&config.cluster);
        let options = AdvertiserOptions {
            instance: config.name.clone(),
            ipv6: addresses.iter().any(IpAddr::is_ipv6),
            addresses,
            interfaces: Vec::new(),
        };
        let first = Advertisement::from_description(&service.description(), port, &cluster);
        let advertiser = match Advertiser::start(options, first) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("not advertising over mDNS: {e}");
                return None;
            }
        };
        let (leave, left) = oneshot::channel();
        let task = tokio::spawn(refresh(advertiser, service, port, cluster, left));
        Some(Self { leave, task })
    }

    /// Withdraws the advertisement (goodbye packets) and waits until it is gone.
    pub async fn leave(self) {
        let _ = self.leave.send(());
        if tokio::time::timeout(LEAVE_TIMEOUT, self.task).await.is_err() {
            tracing::warn!("the mDNS goodbye took longer than {LEAVE_TIMEOUT:?}; going on");
        }
    }
}

/// Keeps the advertisement in step with the worker until `left` fires (or its
/// sender is dropped), then unregisters it.
async fn refresh(
    mut advertiser: Advertiser,
    service: WorkerService,
    port: u16,
    cluster: ClusterTag,
    mut left: oneshot::Receiver<()>,
) {
    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut left => break,
            _ = tick.tick() => {
                let now = Advertisement::from_description(&service.description(), port, &cluster);
                if let Err(e) = advertiser.update(now) {
                    tracing::warn!(error = %e, "cannot update the mDNS advertisement");
                }
            }
        }
    }
    if let Err(e) = advertiser.shutdown().await {
        tracing::warn!(error = %e, "the mDNS advertisement did not end cleanly");
    }
}

/// The addresses and port to advertise: those of `--advertise HOST:PORT` when
/// given; else the bound address, or (bound to an unspecified address) none, which
/// advertises every address of the host and follows its changes.
async fn advertised(advertise: Option<&str>, local: SocketAddr) -> Result<(Vec<IpAddr>, u16), String> {
    let Some(advertise) = advertise else {
        let addresses = if local.ip().is_unspecified() { Vec::new() } else { vec![local.ip()] };
        return Ok((addresses, local.port()));
    };
    let host_port = advertise.strip_prefix("http://").unwrap_or(advertise);
    if let Ok(address) = host_port.parse::<SocketAddr>() {
        return Ok((vec![address.ip()], address.port()));
    }
    let resolved: Vec<SocketAddr> = tokio::net::lookup_host(host_port)
        .await
        .map_err(|e| format!("cannot resolve --advertise {advertise}: {e}"))?
        .collect();
    // One address: IPv4 when there is one.
    let best = resolved
        .iter()
        .find(|a| a.is_ipv4())
        .or(resolved.first())
        .ok_or_else(|| format!("--advertise {advertise} resolves to no address"))?;
    Ok((vec![best.ip()], best.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_advertised_address_follows_the_flags() {
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        assert_eq!(advertised(None, any).await.unwrap(), (vec![], 7070));
        let one: SocketAddr = "10.0.0.5:7071".parse().unwrap();
        assert_eq!(advertised(None, one).await.unwrap(), (vec![one.ip()], 7071));
        let given = advertised(Some("192.168.1.9:9000"), any).await.unwrap();
        assert_eq!(given, (vec!["192.168.1.9".parse().unwrap()], 9000));
        let named = advertised(Some("localhost:9001"), any).await.unwrap();
        assert_eq!(named.1, 9001);
        assert!(named.0[0].is_loopback());
    }
}
