//! A coordinator's side: browses [`SERVICE_TYPE`] and yields typed [`Event`]s for
//! the advertisements of its own cluster and protocol version.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use mdns_sd::{ServiceDaemon, ServiceEvent};
use strata_proto::PROTOCOL_VERSION;

use crate::advertiser::select_interfaces;
use crate::{check_port, stop_daemon, Advertisement, ClusterTag, Error, TxtError, SERVICE_TYPE};

/// What a [`Browser`] looks for and where.
#[derive(Debug, Clone)]
pub struct BrowserOptions {
    /// Advertisements of other clusters are ignored.
    pub cluster: ClusterTag,
    /// Interfaces to browse on, by name. Empty: all of them.
    pub interfaces: Vec<String>,
    /// Also browse on IPv6.
    pub ipv6: bool,
}

/// A change in the workers of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An instance was found, or what it advertises changed. The same instance may
    /// be resolved many times: each is an update of the one before.
    Resolved {
        instance: String,
        /// Best first: IPv4 before IPv6, loopback last. IPv6 link-local addresses
        /// are left out (they need a scope that gRPC addresses do not carry).
        addresses: Vec<IpAddr>,
        port: u16,
        advertisement: Advertisement,
    },
    /// An instance said goodbye, or its records expired.
    Removed { instance: String },
}

impl Event {
    pub fn instance(&self) -> &str {
        match self {
            Self::Resolved { instance, .. } | Self::Removed { instance } => instance,
        }
    }

    /// Where to reach a resolved instance's gRPC server: its best address.
    pub fn grpc_address(&self) -> Option<SocketAddr> {
        match self {
            Self::Resolved { addresses, port, .. } => addresses.first().map(|ip| SocketAddr::new(*ip, *port)),
            Self::Removed { .. } => None,
        }
    }
}

/// Browses for workers until shut down.
pub struct Browser {
    daemon: ServiceDaemon,
    events: mdns_sd::Receiver<ServiceEvent>,
    filter: Filter,
    stopped: bool,
}

impl Browser {
    pub fn start(options: BrowserOptions) -> Result<Self, Error> {
        check_port(mdns_sd::MDNS_PORT)?;
        let daemon = ServiceDaemon::new()?;
        select_interfaces(&daemon, &options.interfaces, options.ipv6)?;
        let events = daemon.browse(SERVICE_TYPE)?;
        tracing::info!(cluster = %options.cluster, "browsing for workers over mDNS");
        Ok(Self { daemon, events, filter: Filter::new(options.cluster), stopped: false })
    }

    /// The next event; `None` once the daemon has stopped.
    ///
    /// Cancel-safe: no event is lost if the future is dropped before it completes.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            let event = self.events.recv_async().await.ok()?;
            if let Some(event) = self.handle(event) {
                return Some(event);
            }
        }
    }

    /// Stops browsing and waits for the daemon to stop.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stopped = true;
        // Stopping the daemon also ends the browse; no need to wait for it apart.
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        stop_daemon(&self.daemon).await
    }

    fn handle(&mut self, event: ServiceEvent) -> Option<Event> {
        match event {
            ServiceEvent::ServiceResolved(service) => {
                let addresses = service.get_addresses().iter().map(|a| a.to_ip_addr());
                let txt = service.get_properties();
                let advertisement = Advertisement::from_txt(|k| txt.get_property_val_str(k));
                self.filter.resolved(service.get_fullname(), addresses, service.get_port(), advertisement)
            }
            ServiceEvent::ServiceRemoved(_, fullname) => self.filter.removed(&fullname),
            _ => None,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.daemon.shutdown();
        }
    }
}

/// The state of a browse: which instances were reported, and as what.
struct Filter {
    cluster: ClusterTag,
    reported: HashMap<String, Event>,
}

impl Filter {
    fn new(cluster: ClusterTag) -> Self {
        Self { cluster, reported: HashMap::new() }
    }

    /// A resolution from mdns-sd: an event when it is ours and new or changed.
    fn resolved(
        &mut self,
        fullname: &str,
        addresses: impl Iterator<Item = IpAddr>,
        port: u16,
        advertisement: Result<Advertisement, TxtError>,
    ) -> Option<Event> {
        let instance = instance_name(fullname);
        let rejected = |reason: String| {
            tracing::debug!(%instance, "ignoring an mDNS advertisement {reason}");
        };
        let advertisement = match advertisement {
            Ok(ad) if ad.cluster == self.cluster && ad.protocol_version == PROTOCOL_VERSION => ad,
            Ok(ad) if ad.cluster != self.cluster => {
                rejected(format!("of another cluster ({})", ad.cluster));
                // One we reported that now advertises something else is gone as far
                // as this cluster is concerned.
                return self.removed(fullname);
            }
            Ok(ad) => {
                rejected(format!("that speaks protocol {}, we {PROTOCOL_VERSION}", ad.protocol_version));
                return self.removed(fullname);
            }
            Err(e) => {
                rejected(format!("that is not strata's: {e}"));
                return self.removed(fullname);
            }
        };
        let addresses = usable(addresses);
        if addresses.is_empty() {
            // Only an IPv6 link-local address so far; the others usually follow
            // within milliseconds.
            tracing::debug!(%instance, "resolved without a usable address yet");
            return None;
        }
        if let Some(Event::Resolved { advertisement: before, .. }) = self.reported.get(fullname) {
            if before.node_id != advertisement.node_id {
                tracing::warn!(
                    %instance,
                    nodes = %format!("{} and {}", before.node_id, advertisement.node_id),
                    "two workers advertise under one name; give them distinct --name"
                );
            }
        }
        let event = Event::Resolved { instance, addresses, port, advertisement };
        if self.reported.get(fullname) == Some(&event) {
            return None;
        }
        self.reported.insert(fullname.to_string(), event.clone());
        Some(event)
    }

    fn removed(&mut self, fullname: &str) -> Option<Event> {
        self.reported.remove(fullname).map(|_| Event::Removed { instance: instance_name(fullname) })
    }
}

/// Addresses a gRPC client can use, best first: IPv4, then IPv6, loopback last;
/// IPv6 link-local ones are dropped.
fn usable(addresses: impl Iterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut usable: Vec<IpAddr> = addresses
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_unspecified(),
            IpAddr::V6(v6) => !v6.is_unspecified() && !v6.is_unicast_link_local(),
        })
        .collect();
    usable.sort_by_key(|ip| (ip.is_loopback(), ip.is_ipv6(), *ip));
    usable.dedup();
    usable
}

/// The instance part of `NAME._strata._tcp.local.`, with DNS escapes undone.
fn instance_name(fullname: &str) -> String {
    let escaped = fullname
        .len()
        .checked_sub(SERVICE_TYPE.len() + 1)
        .filter(|&end| fullname.is_char_boundary(end) && fullname[end + 1..].eq_ignore_ascii_case(SERVICE_TYPE))
        .map_or(fullname, |end| &fullname[..end]);
    let mut out = String::with_capacity(escaped.len());
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::advertisement::{DeviceSummary, NodeState};

    fn ad(cluster: &str) -> Advertisement {
        Advertisement {
            protocol_version: PROTOCOL_VERSION,
            node_id: "n1".into(),
            grpc_port: 7070,
            devices: DeviceSummary::default(),
            memory_offered_bytes: 1,
            speed: 0,
            state: NodeState::Idle,
            cluster: ClusterTag::of(cluster),
        }
    }

    const FULLNAME: &str = "w1._strata._tcp.local.";
    const LINK_LOCAL: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 1, 2, 3, 4));
    const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));

    #[test]
    fn addresses_are_ordered_best_first() {
        let global6: IpAddr = "2001:db8::1".parse().unwrap();
        let all = [IpAddr::V4(Ipv4Addr::LOCALHOST), global6, LINK_LOCAL, V4, V4, IpAddr::V6(Ipv6Addr::LOCALHOST)];
        assert_eq!(
            usable(all.into_iter()),
            vec![V4, global6, IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        );
    }

    #[test]
    fn a_first_resolution_with_only_a_link_local_address_waits_for_the_next() {
        let mut filter = Filter::new(ClusterTag::of("c"));
        assert_eq!(filter.resolved(FULLNAME, [LINK_LOCAL].into_iter(), 7070, Ok(ad("c"))), None);
        let event = filter.resolved(FULLNAME, [LINK_LOCAL, V4].into_iter(), 7070, Ok(ad("c"))).unwrap();
        assert_eq!(event.grpc_address(), Some(SocketAddr::new(V4, 7070)));
        assert_eq!(event.instance(), "w1");
    }

    #[test]
    fn repeated_resolutions_are_updates_and_duplicates_are_dropped() {
        let mut filter = Filter::new(ClusterTag::of("c"));
        assert!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(ad("c"))).is_some());
        assert_eq!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(ad("c"))), None);
        let draining = Advertisement { state: NodeState::Draining, ..ad("c") };
        let Some(Event::Resolved { advertisement, .. }) =
            filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(draining))
        else {
            panic!("a changed state is an update");
        };
        assert_eq!(advertisement.state, NodeState::Draining);
        assert_eq!(filter.removed(FULLNAME), Some(Event::Removed { instance: "w1".into() }));
        assert_eq!(filter.removed(FULLNAME), None, "reported once");
    }

    #[test]
    fn other_clusters_protocols_and_strangers_are_filtered_out() {
        let mut filter = Filter::new(ClusterTag::of("c"));
        assert_eq!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(ad("other"))), None);
        let old = Advertisement { protocol_version: PROTOCOL_VERSION + 1, ..ad("c") };
        assert_eq!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(old)), None);
        assert_eq!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Err(TxtError::Missing("v"))), None);
        assert_eq!(filter.removed(FULLNAME), None, "never reported, so never removed");
        // One of ours that moves to another cluster is gone for us.
        assert!(filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(ad("c"))).is_some());
        assert_eq!(
            filter.resolved(FULLNAME, [V4].into_iter(), 7070, Ok(ad("other"))),
            Some(Event::Removed { instance: "w1".into() })
        );
    }

    #[test]
    fn instance_names_are_unescaped() {
        assert_eq!(instance_name("w1._strata._tcp.local."), "w1");
        assert_eq!(instance_name("rack\\.2\\\\a._strata._tcp.local."), "rack.2\\a");
        assert_eq!(instance_name("W1._STRATA._tcp.local."), "W1");
        assert_eq!(instance_name("odd"), "odd");
    }
}
