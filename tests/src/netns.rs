//! Hosts on one machine, made of network namespaces (see `notes/networks.md`): a hub
//! namespace holds the bridge `br0`; host N is the namespace `ID-hN`, whose `eth0`
//! (10.77.0.N/24) is a veth into the bridge. Everything is created inside
//! namespaces named after this process (so parallel runs never meet) and nothing
//! appears in the machine's own namespace. Dropping [`Hosts`] kills every process
//! left in its namespaces and deletes them, on every exit path.
//!
//! mDNS tests run only here: mdns-sd joins multicast groups on every interface it
//! finds, which must never happen in the machine's own namespace. So do the tests
//! of a worker cut off from the network ([`Hosts::set_link`]), and those of links of a
//! given speed ([`Hosts::limit_rate`]).

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use strata_coordinator::cli::children::{LocalTrust, Process};
use strata_trust::Transport;

/// The log level of the children a netns test starts: `STRATA_LOG`, else `warn`.
pub fn log_level() -> String {
    std::env::var("STRATA_LOG").unwrap_or_else(|_| "warn".into())
}

/// Why network namespaces cannot be made here, if they cannot.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    match Command::new("ip").args(["netns", "list"]).stdout(Stdio::null()).stderr(Stdio::null()).status() {
        Ok(s) if s.success() => None,
        _ => Some("needs root for network namespaces, and `ip netns` does not work here".into()),
    }
}

/// Frames recorded on a bridge port ([`Hosts::capture`]).
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<Vec<u8>>>>,
}

impl Capture {
    /// Stops recording; every byte of every frame seen, headers included.
    pub fn finish(mut self) -> anyhow::Result<Vec<u8>> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().context("already finished")?;
        thread.join().map_err(|_| anyhow::anyhow!("the capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A raw packet socket on interface `name`, every protocol, reads timing out
/// every 100 ms (so a stop is seen).
fn packet_socket(name: &std::ffi::CStr) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket calls on a descriptor owned from here on.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as i32) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("an AF_PACKET socket (needs root)");
    }
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {name:?}");
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = libc::AF_PACKET as u16;
    address.sll_protocol = all;
    address.sll_ifindex = index as i32;
    let size = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    if unsafe { libc::bind(fd, (&address as *const libc::sockaddr_ll).cast(), size) } != 0 {
        return Err(std::io::Error::last_os_error()).context("binding the packet socket");
    }
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
    let buffer: libc::c_int = 32 << 20;
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&buffer as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(socket)
}

/// Network namespaces acting as hosts on one Ethernet segment.
pub struct Hosts {
    id: String,
    count: usize,
    /// The `TMPDIR` of every process spawned in the hosts (a coordinator cuts its
    /// shard files there): removed with the hosts, so a process killed at the end
    /// leaves nothing behind.
    tmp: tempfile::TempDir,
    /// The CA of the cluster the hosts form: workers started here hold its token,
    /// a coordinator gets [`Hosts::trust_args`].
    trust: LocalTrust,
    /// The coordinator's rights in that cluster, for the tests' own calls.
    transport: Transport,
}

impl Hosts {
    /// `count` hosts for the test `test`, or `None` after printing a visible
    /// `SKIPPED` line when this machine cannot make them.
    pub fn for_test(test: &str, count: usize) -> anyhow::Result<Option<Self>> {
        if let Some(reason) = unavailable() {
            eprintln!("SKIPPED: {test}: {reason}");
            return Ok(None);
        }
        Self::create(count).map(Some)
    }

    /// Creates the hub and `count` hosts, each with `lo` and `eth0` up.
    pub fn create(count: usize) -> anyhow::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let id = format!("st{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        // From here on, whatever was made is removed when `hosts` drops.
        let trust = LocalTrust::new()?;
        let transport = trust.coordinator_transport()?;
        let hosts = Self {
            id,
            count,
            tmp: tempfile::tempdir().context("a temporary folder for the hosts")?,
            trust,
            transport,
        };
        let hub = hosts.hub();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for host in 1..=count {
            let ns = hosts.namespace(host);
            let port = format!("p{host}");
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", hosts.address(host)), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(hosts)
    }

    fn hub(&self) -> String {
        format!("{}-hub", self.id)
    }

    /// The namespace of host `host` (1-based).
    pub fn namespace(&self, host: usize) -> String {
        format!("{}-h{host}", self.id)
    }

    /// The address of host `host` on the segment.
    pub fn address(&self, host: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, 0, host as u8)
    }

    /// `program args` run in host `host` (`ip netns exec` execs it, so the child's
    /// pid is the program's own and signals reach it).
    pub fn command(&self, host: usize, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace(host)]).arg(program).args(args);
        command
    }

    /// Starts a child in host `host`, read by its stdout lines like any other.
    pub fn spawn(
        &self,
        host: usize,
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        let mut all = vec!["netns".to_string(), "exec".into(), self.namespace(host), program.display().to_string()];
        all.extend(args.iter().cloned());
        let mut envs = envs.to_vec();
        if !envs.iter().any(|(k, _)| *k == "TMPDIR") {
            envs.push(("TMPDIR", self.tmp.path().display().to_string()));
        }
        Process::spawn(name, Path::new("ip"), &all, &envs)
    }

    /// `--state-dir` for a `strata serve` run in the hosts: the cluster's CA, whose
    /// token the workers started here hold.
    pub fn trust_args(&self) -> Vec<String> {
        vec!["--state-dir".into(), self.trust.state_dir().display().to_string()]
    }

    /// A transport with the coordinator's rights in the hosts' cluster.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The CA of the hosts' cluster.
    pub fn trust(&self) -> &LocalTrust {
        &self.trust
    }

    /// The join token of the hosts' cluster.
    pub fn token(&self) -> String {
        self.trust.token()
    }

    /// `strata-worker` in host `host`, named `name`, with one compute thread, a
    /// cache folder of its own below `cache`, no start-up benchmark (most tests need
    /// no figure) and `args`; returned once it listens, its output drained. Its
    /// log level is `STRATA_LOG`'s, `warn` by default.
    pub async fn start_worker(&self, host: usize, name: &str, cache: &Path, args: &[String]) -> anyhow::Result<Process> {
        self.start_worker_with(host, name, cache, &[&["--no-bench".to_string()], args].concat()).await
    }

    /// [`Hosts::start_worker`] with its start-up benchmark: its bandwidth is
    /// measured (half a second or so), so the planner's prediction means something.
    pub async fn start_measured_worker(
        &self,
        host: usize,
        name: &str,
        cache: &Path,
        args: &[String],
    ) -> anyhow::Result<Process> {
        self.start_worker_with(host, name, cache, args).await
    }

    async fn start_worker_with(
        &self,
        host: usize,
        name: &str,
        cache: &Path,
        args: &[String],
    ) -> anyhow::Result<Process> {
        let mut all: Vec<String> = vec![
            "--name".into(),
            name.into(),
            "--threads".into(),
            "1".into(),
            "--cache-dir".into(),
            cache.join(name).display().to_string(),
        ];
        all.extend(args.iter().cloned());
        let mut env = vec![("STRATA_LOG", log_level())];
        if !args.iter().any(|a| a == "--insecure") {
            env.push(("STRATA_TOKEN", self.trust.token()));
        }
        let mut p = self.spawn(host, name, &crate::binary("strata-worker")?, &all, &env)?;
        p.wait_for_line("worker listening", crate::READY_TIMEOUT, |_| {}).await?;
        p.drain_output();
        Ok(p)
    }

    /// Starts recording every frame that crosses the bridge port of host `host` (an
    /// AF_PACKET socket on `p<host>` in the hub's namespace, as `tcpdump -i p<host>`
    /// would): all its host sends and receives.
    pub fn capture(&self, host: usize) -> anyhow::Result<Capture> {
        let path = format!("/run/netns/{}", self.hub());
        let port = std::ffi::CString::new(format!("p{host}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
            let opened = (|| -> anyhow::Result<std::os::fd::OwnedFd> {
                let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a descriptor we own; it moves only this thread.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                packet_socket(&port)
            })();
            let socket = match opened {
                Ok(socket) => {
                    let _ = ready_tx.send(Ok(()));
                    socket
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
            };
            let mut captured = Vec::new();
            let mut frame = vec![0u8; 65536];
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: a read into a buffer we own, of at most its length.
                let n = unsafe { libc::recv(socket.as_raw_fd(), frame.as_mut_ptr().cast(), frame.len(), 0) };
                if n > 0 {
                    captured.extend_from_slice(&frame[..n as usize]);
                }
            }
            Ok(captured)
        });
        ready_rx.recv().context("the capture thread ended")?.map_err(|e| anyhow::anyhow!(e))?;
        Ok(Capture { stop, thread: Some(thread) })
    }

    /// Runs `future` to completion on a thread of its own inside host `host`, on a
    /// runtime made there: every socket it opens (mDNS daemons included, as they
    /// start their threads from it) belongs to that host.
    pub fn block_on<T: Send>(&self, host: usize, future: impl Future<Output = T> + Send) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.namespace(host));
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
                    // SAFETY: setns on a descriptor we own; it moves only this thread.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(std::io::Error::last_os_error()).context("setns");
                    }
                    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    Ok(runtime.block_on(future))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the thread in {} panicked", self.namespace(host)))?
        })
    }

    /// Sets host `host`'s link down or up at the switch: its port `pN` on the hub's
    /// bridge, as a pulled cable would. The host's own `eth0` keeps its address and
    /// routes (it only loses carrier), so what it sends is dropped silently and
    /// its connections neither fail nor close: TCP just retransmits, as on a real
    /// network.
    pub fn set_link(&self, host: usize, up: bool) -> anyhow::Result<()> {
        anyhow::ensure!((1..=self.count).contains(&host), "no host {host}");
        ip(&["-n", &self.hub(), "link", "set", &format!("p{host}"), if up { "up" } else { "down" }])
    }

    /// Limits host `host`'s link to `rate` (as `tc` writes it: `1gbit`, `100mbit`)
    /// each way, as a switch port of that speed would: a token bucket on the
    /// host's `eth0` (what it sends) and on its port `pN` at the hub (what it
    /// receives). Hosts that share a sender share its rate, as on a real LAN.
    pub fn limit_rate(&self, host: usize, rate: &str) -> anyhow::Result<()> {
        anyhow::ensure!((1..=self.count).contains(&host), "no host {host}");
        // A burst of a few 64 kB segments (the veths pass GSO packets that large)
        // and at most 20 ms of queue.
        let tbf = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "20ms"];
        tc(&self.namespace(host), "eth0", &tbf)?;
        tc(&self.hub(), &format!("p{host}"), &tbf)
    }

    /// Starts dbus-daemon and avahi-daemon in host `host` (see [`Avahi`]).
    pub fn start_avahi(&self, host: usize, options: AvahiOptions) -> anyhow::Result<Avahi> {
        Avahi::start(self, host, options)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in 1..=self.count {
            let ns = self.namespace(host);
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()) {
                    strata_platform::process::kill(pid);
                }
            }
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `tc qdisc add dev DEVICE QDISC...` in the namespace `ns`.
fn tc(ns: &str, device: &str, qdisc: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "tc", "qdisc", "add", "dev", device])
        .args(qdisc)
        .output()
        .context("running tc (iproute2)")?;
    if !out.status.success() {
        bail!("tc qdisc add dev {device} {} in {ns}: {}", qdisc.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The programs an avahi test needs that are not installed, if any.
pub fn avahi_missing() -> Option<String> {
    let missing: Vec<&str> =
        ["avahi-daemon", "avahi-browse", "dbus-daemon"].into_iter().filter(|p| !on_path(p)).collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn on_path(program: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs).chain(["/usr/sbin".into(), "/sbin".into()]).any(|d| d.join(program).is_file())
}

/// How an avahi-daemon is configured.
#[derive(Debug, Clone, Default)]
pub struct AvahiOptions {
    /// `disallow-other-stacks=yes`: avahi then holds port 5353 alone.
    pub exclusive: bool,
}

/// avahi-daemon in a host, with a private D-Bus system bus (avahi registers on
/// it, and `avahi-browse` talks to avahi over it) and a private `/run` (for its
/// pid file). Configured like Debian's default but on `eth0`, IPv4 only. It drops
/// root to the `avahi` user when there is one, as on a real machine. Stopped when
/// dropped.
pub struct Avahi {
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Avahi {
    fn start(hosts: &Hosts, host: usize, options: AvahiOptions) -> anyhow::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        // avahi reaches the bus socket after dropping root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let mut avahi = Self { dir, children: Vec::new() };
        let bus = avahi.dir.path().join("bus");
        let dbus_conf = avahi.dir.path().join("dbus.conf");
        std::fs::write(
            &dbus_conf,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                bus.display()
            ),
        )?;
        let avahi_conf = avahi.dir.path().join("avahi-daemon.conf");
        std::fs::write(
            &avahi_conf,
            format!(
                "[server]\nhost-name=h{host}\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=eth0\n\
                 disallow-other-stacks={}\nratelimit-interval-usec=1000000\nratelimit-burst=1000\n\
                 [wide-area]\nenable-wide-area=no\n[publish]\npublish-hinfo=no\npublish-workstation=no\n",
                if options.exclusive { "yes" } else { "no" }
            ),
        )?;

        let dbus = hosts
            .command(
                host,
                Path::new("dbus-daemon"),
                &["--nofork", "--nopidfile", &format!("--config-file={}", dbus_conf.display())],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dbus-daemon")?;
        avahi.children.push(dbus);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !bus.exists() {
            anyhow::ensure!(Instant::now() < deadline, "dbus-daemon made no socket at {}", bus.display());
            std::thread::sleep(Duration::from_millis(20));
        }

        // A tmpfs on /run inside the mount namespace `ip netns exec` makes: the pid
        // file of this avahi meets no other's.
        let drop_root = if has_user("avahi") { "" } else { " --no-drop-root" };
        let script = format!(
            "mount -t tmpfs tmpfs /run && exec avahi-daemon -f {} --no-chroot --no-rlimits{drop_root}",
            avahi_conf.display()
        );
        let mut daemon = hosts
            .command(host, Path::new("sh"), &["-c", &script])
            .env("DBUS_SYSTEM_BUS_ADDRESS", avahi.bus_address())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting avahi-daemon")?;
        let stderr = daemon.stderr.take().context("no stderr")?;
        avahi.children.push(daemon);
        // avahi logs to stderr; read it to the end so it never blocks.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut log = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.starts_with("Server startup complete") => break,
                Ok(line) => log.push(line),
                Err(_) => bail!("avahi-daemon in host {host} did not start:\n{}", log.join("\n")),
            }
        }
        Ok(avahi)
    }

    /// `DBUS_SYSTEM_BUS_ADDRESS` for avahi's clients (`avahi-browse`).
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.path().join("bus").display())
    }
}

impl Drop for Avahi {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn has_user(name: &str) -> bool {
    std::fs::read_to_string("/etc/passwd").is_ok_and(|p| p.lines().any(|l| l.split(':').next() == Some(name)))
}
