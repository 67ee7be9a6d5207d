//! Where a worker pulls weights from: the coordinator's gRPC address *as that
//! worker reaches it*.
//!
//! A coordinator bound to `0.0.0.0` has no one address to hand out: 127.0.0.1 is
//! its own loopback (useless to a worker on another machine), and a host with
//! several networks (LAN, VPN, Docker bridges) is reached at a different address
//! from each. So, unless `--grpc-advertise` names one, each worker is told the
//! coordinator's local address on the route to that worker: what the kernel picks
//! as the source address for packets to it, which is the address the worker sees
//! the coordinator's calls come from and can therefore reach.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// The coordinator's gRPC address for weight pulls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightsSource {
    /// Workers must have the model file themselves.
    None,
    /// The same address for every worker (`--grpc-advertise`, or a specific bound
    /// address).
    Fixed(String),
    /// Bound to every address on this port: each worker is told the local address
    /// on the route to it.
    RouteTo { port: u16 },
}

impl WeightsSource {
    /// The source for a coordinator whose gRPC service is bound to `bound`, unless
    /// `advertise` names the address to give out.
    pub fn for_bound(bound: SocketAddr, advertise: Option<String>) -> Self {
        match advertise {
            Some(a) => Self::Fixed(a),
            None if bound.ip().is_unspecified() => Self::RouteTo { port: bound.port() },
            None => Self::Fixed(bound.to_string()),
        }
    }

    /// The address the worker at `worker` (`host:port`) should pull from; empty
    /// for [`WeightsSource::None`].
    pub async fn for_worker(&self, worker: &str) -> String {
        match self {
            Self::None => String::new(),
            Self::Fixed(a) => a.clone(),
            Self::RouteTo { port } => {
                let ip = match tokio::net::lookup_host(worker).await {
                    Ok(mut found) => found.next().map(|peer| local_ip_towards(peer.ip())),
                    Err(_) => None,
                };
                let ip = ip.unwrap_or_else(|| {
                    tracing::warn!(%worker, "no route to the worker found; telling it to pull from 127.0.0.1");
                    Ipv4Addr::LOCALHOST.into()
                });
                SocketAddr::new(ip, *port).to_string()
            }
        }
    }
}

/// The local address the kernel would send from to reach `peer`. Connecting a UDP
/// socket only looks the route up: no packet is sent.
fn local_ip_towards(peer: IpAddr) -> IpAddr {
    let (unspecified, loopback): (IpAddr, IpAddr) = match peer {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED.into(), Ipv4Addr::LOCALHOST.into()),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED.into(), Ipv6Addr::LOCALHOST.into()),
    };
    if peer.is_loopback() || peer.is_unspecified() {
        return loopback;
    }
    let routed = UdpSocket::bind(SocketAddr::new(unspecified, 0))
        .and_then(|s| s.connect(SocketAddr::new(peer, 9)).map(|()| s))
        .and_then(|s| s.local_addr());
    match routed {
        Ok(local) if !local.ip().is_unspecified() => local.ip(),
        _ => loopback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_advertised_or_specific_address_is_given_to_every_worker() {
        let any: SocketAddr = "0.0.0.0:7100".parse().unwrap();
        let specific: SocketAddr = "10.0.0.2:7100".parse().unwrap();
        assert_eq!(
            WeightsSource::for_bound(any, Some("coord.lan:7100".into())),
            WeightsSource::Fixed("coord.lan:7100".into())
        );
        assert_eq!(WeightsSource::for_bound(specific, None), WeightsSource::Fixed("10.0.0.2:7100".into()));
        assert_eq!(WeightsSource::for_bound(any, None), WeightsSource::RouteTo { port: 7100 });
    }

    #[tokio::test]
    async fn a_worker_on_loopback_pulls_from_loopback() {
        let source = WeightsSource::RouteTo { port: 7100 };
        assert_eq!(source.for_worker("127.0.0.1:7070").await, "127.0.0.1:7100");
        assert_eq!(source.for_worker("localhost:7070").await.rsplit_once(':').map(|(_, p)| p), Some("7100"));
        assert_eq!(source.for_worker("[::1]:7070").await, "[::1]:7100");
    }

    #[tokio::test]
    async fn an_unresolvable_worker_falls_back_to_loopback() {
        let source = WeightsSource::RouteTo { port: 7100 };
        assert_eq!(source.for_worker("no such host:7070").await, "127.0.0.1:7100");
    }

    #[tokio::test]
    async fn none_gives_nothing_to_pull_from() {
        assert_eq!(WeightsSource::None.for_worker("127.0.0.1:1").await, "");
    }
}
