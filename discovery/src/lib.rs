//! mDNS discovery of strata workers (service type [`SERVICE_TYPE`]).
//!
//! A worker runs an [`Advertiser`]: one service instance named after the node, whose
//! SRV record points at its gRPC port and whose TXT record is an [`Advertisement`]
//! (protocol version, node id, devices, memory, speed, state and the [`ClusterTag`]).
//! A coordinator runs a [`Browser`], which turns mdns-sd's events into typed
//! [`Event`]s and drops advertisements of other clusters or protocol versions.
//!
//! mDNS only finds workers. Whether a found worker is alive is the coordinator's
//! business over gRPC (heartbeats): a worker that is killed or unplugged sends no
//! goodbye, and its records linger for their 120 s lifetime.
//!
//! # Sharing the host with avahi-daemon
//!
//! Most Linux machines in a home lab run avahi-daemon, which owns the mDNS port
//! 5353 as well; mdns-sd runs a second mDNS stack beside it. What was measured
//! (avahi 0.8, Linux 6.x, mdns-sd 0.21.7, hosts in network namespaces on a bridge):
//!
//! * Sockets. mdns-sd binds one IPv4 socket to `0.0.0.0:5353` (and one dual-stack
//!   IPv6 socket to `[::]:5353`) with `SO_REUSEADDR` and `SO_REUSEPORT` set before
//!   `bind`, joins 224.0.0.251 on every selected interface and leaves multicast loop
//!   on. avahi binds `0.0.0.0:5353` first without either option and sets both right
//!   after; when the bind fails because mdns-sd was first, it logs "Detected another
//!   IPv4 mDNS stack running on this host", sets them and binds again. Either way
//!   both sockets hold the port (avahi runs as user `avahi`, so they never form one
//!   `SO_REUSEPORT` group), and the kernel hands every *multicast* datagram to
//!   every socket bound to the port: both stacks hear every query and answer. Only
//!   a unicast datagram to port 5353 goes to one socket alone, and neither mdns-sd
//!   nor our use of it asks for unicast answers (no QU questions; queries leave
//!   from port 5353). With avahi's default configuration a worker beside avahi is
//!   found from another host, and a coordinator beside avahi finds workers, in
//!   either start order; `avahi-browse` sees our advertisements too.
//! * `disallow-other-stacks=yes` in `avahi-daemon.conf` (not Debian's default, but
//!   some distributions ship it) makes avahi bind without `SO_REUSEADDR`. mdns-sd's
//!   bind then fails with `EADDRINUSE`, which it only logs at debug level: the
//!   daemon runs without a socket, registering and browsing return `Ok`, and
//!   nothing is ever sent or heard. [`Advertiser::start`] and [`Browser::start`]
//!   bind a socket the way mdns-sd does first, and fail with [`Error::PortTaken`]
//!   naming the cause instead.
//! * Host names. avahi owns the machine's host name (`HOST.local.`). An SRV target
//!   of that same name (what the Rust project cake did) makes two stacks answer
//!   for one name with address records that need not agree. Measured with a
//!   worker advertising 10.77.0.102 under avahi's name on a host whose avahi
//!   publishes 10.77.0.2 and 10.77.0.102: when avahi ran first, mdns-sd's probe
//!   met avahi's answer and it renamed its record to `HOST-2.local.`; when mdns-sd
//!   ran first, browsers on other hosts merged both stacks' records and resolved
//!   the worker to 10.77.0.2 *and* 10.77.0.102, one of which it does not serve
//!   on. Our SRV target is a name of our own, `strata-NODEID.local.`, that nobody
//!   else answers for.
//! * Probing (not about avahi, but found on the way). mdns-sd probes a new name
//!   on each interface for most of a second. A changed TXT record registered in
//!   that window comes back through multicast loop, and the probe takes our own
//!   record for another host's: the instance was renamed `w2 (2)`, `w2 (3)`, ...
//!   `w2 (11)` within seconds of a worker starting to load a shard. We register
//!   without probing; two workers under one name are the operator's to avoid, and
//!   the [`Browser`] warns when it sees them.
//! * Addresses. A resolution's address set may hold an IPv6 link-local address
//!   first, and only that (the IPv4 one follows a few milliseconds later); taking
//!   "the first address" of it can give an address no gRPC client can use. We run
//!   IPv4 only by default, order addresses IPv4 first, and skip link-local IPv6.
//!
//! # Sharing a Windows machine with its own mDNS responder
//!
//! Since Windows 10 the DNS Client service (`dnscache`) answers and asks mDNS on
//! UDP 5353 itself, and Bonjour or a browser may hold the port too. On Windows
//! `SO_REUSEADDR` alone lets sockets share a port (there is no `SO_REUSEPORT`), and
//! a multicast datagram reaches every socket that shares it, so strata binds with
//! `SO_REUSEADDR` and runs beside them as beside avahi. Only a program that took the
//! port with `SO_EXCLUSIVEADDRUSE` keeps everyone else out: the bind check then fails
//! with [`Error::PortTaken`], the worker says so and serves without mDNS, and the
//! way in is `strata-worker --join COORDINATOR` (or `strata serve --worker ADDR`),
//! which needs no multicast at all. The Windows firewall must let UDP 5353 in for
//! the worker to be found; `strata-worker service install` adds that rule. (Not
//! measured on Windows here: Wine is no Windows network stack.)

mod advertisement;
mod advertiser;
mod browser;

use std::time::Duration;

pub use advertisement::{Advertisement, ClusterTag, DeviceSummary, NodeState, TxtError, MAX_VALUE_BYTES};
pub use advertiser::{Advertiser, AdvertiserOptions};
pub use browser::{Browser, BrowserOptions, Event};

/// The DNS-SD service type of strata workers.
pub const SERVICE_TYPE: &str = "_strata._tcp.local.";

/// The mDNS port (UDP), which a firewall must let in for workers to be found.
pub const MDNS_PORT: u16 = mdns_sd::MDNS_PORT;

/// The cluster name used when none is given (`--cluster`).
pub const DEFAULT_CLUSTER: &str = "strata";

/// How long we wait for the mDNS daemon to answer a command.
const DAEMON_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
    #[error("the mDNS daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the mDNS daemon has stopped")]
    Stopped,
    #[error("{0:?} cannot be an mDNS instance name")]
    InstanceName(String),
    #[error(
        "cannot share the mDNS port {port}: {io}. Another mDNS stack holds it alone (avahi-daemon does with \
         `disallow-other-stacks=yes`; `ss -ulpn 'sport = :{port}'` shows who); set it to `no`, or turn mDNS off \
         and name the coordinator or the workers instead"
    )]
    PortTaken { port: u16, io: std::io::Error },
}

/// Checks that the mDNS port can be shared the way mdns-sd shares it
/// (`SO_REUSEADDR`, and `SO_REUSEPORT` on Unix, bound to the unspecified address).
///
/// mdns-sd only logs a failed bind (at debug level) and then runs without a
/// socket: registering and browsing "succeed" and nothing is ever sent or heard.
/// Binding a socket of our own first turns that into an error.
fn check_port(port: u16) -> Result<(), Error> {
    use socket2::{Domain, Protocol, Socket, Type};
    let bind = || -> std::io::Result<()> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_address(true)?;
        // mdns-sd sets SO_REUSEPORT where there is one (Unix); on Windows,
        // SO_REUSEADDR alone lets sockets share a port, so it is all mdns-sd sets.
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.bind(&std::net::SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)).into())
    };
    bind().map_err(|io| Error::PortTaken { port, io })
}

/// Waits for one answer of the daemon on `rx`, for at most [`DAEMON_ANSWER_TIMEOUT`].
async fn answer<T>(rx: mdns_sd::Receiver<T>) -> Result<T, Error> {
    match tokio::time::timeout(DAEMON_ANSWER_TIMEOUT, rx.recv_async()).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(_)) => Err(Error::Stopped),
        Err(_) => Err(Error::Timeout(DAEMON_ANSWER_TIMEOUT)),
    }
}

/// Shuts `daemon` down and waits until its thread has stopped.
async fn stop_daemon(daemon: &mdns_sd::ServiceDaemon) -> Result<(), Error> {
    match daemon.shutdown() {
        Ok(rx) => answer(rx).await.map(|_| ()),
        // Already gone: nothing left to stop.
        Err(mdns_sd::Error::DaemonShutdown) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_held_alone_by_someone_else_is_reported() {
        // Ephemeral ports on the unspecified address; nothing joins a multicast group.
        let alone = std::net::UdpSocket::bind(("0.0.0.0", 0)).unwrap();
        let port = alone.local_addr().unwrap().port();
        let err = check_port(port).unwrap_err();
        assert!(matches!(err, Error::PortTaken { .. }), "{err}");
        assert!(err.to_string().contains("disallow-other-stacks"), "{err}");
        drop(alone);
        assert!(check_port(port).is_ok());
    }
}
