//! A worker's side: one registered service instance, re-registered when what it
//! advertises changes, and unregistered (goodbye packets) on shutdown.

use std::net::IpAddr;

use mdns_sd::{IfKind, ServiceDaemon, ServiceInfo};

use crate::{answer, check_port, stop_daemon, Advertisement, Error, SERVICE_TYPE};

/// Where and as what a worker is advertised.
#[derive(Debug, Clone, Default)]
pub struct AdvertiserOptions {
    /// The instance name: the node's name.
    pub instance: String,
    /// Addresses to advertise. Empty: every address of the interfaces in use, kept
    /// up to date as they change (for a server listening on `0.0.0.0`). A given
    /// address is only announced on an interface whose subnet holds it.
    pub addresses: Vec<IpAddr>,
    /// Interfaces to run on, by name. Empty: all of them.
    pub interfaces: Vec<String>,
    /// Also run on IPv6. Off by default: browsers then see one IPv4 address per
    /// interface rather than a link-local IPv6 one first.
    pub ipv6: bool,
}

/// A registered worker. Call [`Advertiser::shutdown`] to say goodbye; dropping it
/// stops the daemon without waiting.
pub struct Advertiser {
    daemon: ServiceDaemon,
    options: AdvertiserOptions,
    /// The SRV target: a name of our own, never the machine's host name (which
    /// avahi-daemon owns when it runs; see the crate documentation).
    host_name: String,
    fullname: String,
    current: Advertisement,
    stopped: bool,
}

impl Advertiser {
    /// Starts an mDNS daemon and registers `advertisement` under `options.instance`.
    pub fn start(options: AdvertiserOptions, advertisement: Advertisement) -> Result<Self, Error> {
        if options.instance.is_empty() || options.instance.len() > 63 {
            return Err(Error::InstanceName(options.instance));
        }
        check_port(mdns_sd::MDNS_PORT)?;
        let daemon = ServiceDaemon::new()?;
        let mut advertiser = Self {
            host_name: host_name(&advertisement.node_id),
            fullname: String::new(),
            daemon,
            options,
            current: advertisement,
            stopped: false,
        };
        select_interfaces(&advertiser.daemon, &advertiser.options.interfaces, advertiser.options.ipv6)?;
        let info = advertiser.service_info(&advertiser.current)?;
        advertiser.fullname = info.get_fullname().to_string();
        advertiser.daemon.register(info)?;
        tracing::info!(
            instance = %advertiser.options.instance,
            host = %advertiser.host_name,
            port = advertiser.current.grpc_port,
            "advertising over mDNS"
        );
        Ok(advertiser)
    }

    /// What is advertised now.
    pub fn current(&self) -> &Advertisement {
        &self.current
    }

    /// Re-registers with `advertisement` if it differs from the current one (the
    /// new TXT record is announced at once); returns whether it did.
    pub fn update(&mut self, advertisement: Advertisement) -> Result<bool, Error> {
        if advertisement == self.current {
            return Ok(false);
        }
        self.daemon.register(self.service_info(&advertisement)?)?;
        tracing::debug!(instance = %self.options.instance, state = advertisement.state.as_str(), "mDNS advertisement updated");
        self.current = advertisement;
        Ok(true)
    }

    /// Unregisters the instance (goodbye packets, so browsers drop it within about a
    /// second) and waits for the daemon to stop.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        self.stopped = true;
        let unregistered = match self.daemon.unregister(&self.fullname) {
            Ok(rx) => answer(rx).await.map(|_| ()),
            Err(e) => Err(e.into()),
        };
        let stopped = stop_daemon(&self.daemon).await;
        tracing::info!(instance = %self.options.instance, "mDNS advertisement withdrawn");
        unregistered.and(stopped)
    }

    fn service_info(&self, advertisement: &Advertisement) -> Result<ServiceInfo, Error> {
        let txt = advertisement.to_txt();
        let properties: Vec<(&str, &str)> = txt.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.options.instance,
            &self.host_name,
            &self.options.addresses[..],
            advertisement.grpc_port,
            &properties[..],
        )?;
        let mut info = if self.options.addresses.is_empty() { info.enable_addr_auto() } else { info };
        // No probing. mdns-sd's probe takes our own announcements, looped back by
        // multicast, for another host's records whenever the TXT record changes
        // while a name is being probed on some interface, and renames the
        // instance: `w2 (2)`, `w2 (3)`, ... was seen within seconds of a worker
        // starting to load a shard. Names are the operator's to keep unique (the
        // default, the host name, is for one worker per machine); the browser
        // warns when two nodes advertise under one name.
        info.set_requires_probe(false);
        Ok(info)
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if !self.stopped {
            // The daemon unregisters what it holds as it exits; nobody waits for it.
            let _ = self.daemon.shutdown();
        }
    }
}

/// The SRV target of a node: `strata-NODEID.local.`.
fn host_name(node_id: &str) -> String {
    let label: String =
        node_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(40).collect::<String>().to_lowercase();
    format!("strata-{label}.local.")
}

/// Limits `daemon` to `interfaces` (all when empty) and to IPv4 unless `ipv6`.
pub(crate) fn select_interfaces(daemon: &ServiceDaemon, interfaces: &[String], ipv6: bool) -> Result<(), Error> {
    if !interfaces.is_empty() {
        daemon.disable_interface(IfKind::All)?;
        daemon.enable_interface(interfaces.iter().map(|name| IfKind::Name(name.clone())).collect::<Vec<_>>())?;
    }
    if !ipv6 {
        daemon.disable_interface(IfKind::IPv6)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_srv_target_is_a_name_of_our_own() {
        assert_eq!(host_name("0123ABCdef"), "strata-0123abcdef.local.");
        assert_eq!(host_name("a.b c/d"), "strata-abcd.local.");
    }
}
