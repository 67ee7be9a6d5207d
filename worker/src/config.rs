//! The worker's command line and the validated configuration built from it.
//!
//! Everything is checked here, before a port is bound: a bad flag fails fast with a
//! message, and tests build a [`WorkerConfig`] directly without touching the process
//! environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use strata_proto::address;
use strata_proto::units::{self, MemoryLimits};
use strata_trust::JoinToken;

use crate::self_bench::BenchMode;

/// strata-worker: holds a layer range of a model and serves it over gRPC.
///
/// With no subcommand it serves, taking the flags below.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "strata-worker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: WorkerArgs,
}

// Parsed once at start: the size of the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Print the devices found and what a worker started with the same flags would
    /// offer.
    Devices(DevicesArgs),
    /// Ask the worker running on this machine to leave the cluster: the coordinator
    /// moves its layers to the others and it frees its memory.
    Drain(ControlArgs),
    /// Bring the worker on this machine back into the cluster.
    Undrain(ControlArgs),
    /// Run the worker as a Windows service: installed once, started with Windows,
    /// out of the way of the person at the machine.
    #[command(subcommand)]
    Service(ServiceCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum ServiceCommand {
    /// Install (or update) the service, store the worker's flags for it, open its
    /// port in the firewall and start it with Windows. Run as administrator.
    Install(ServiceInstallArgs),
    /// Stop and remove the service and its firewall rule (logs and cache stay).
    Uninstall,
    /// Start the installed service.
    Start,
    /// Stop the installed service.
    Stop,
    /// What the service manager runs; not for people.
    #[command(hide = true)]
    Run,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceInstallArgs {
    /// The worker's flags, as `strata-worker --help` lists them (`--join ADDR`,
    /// `--yield-to-processes game.exe`, ...), checked now and stored for the service.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "WORKER FLAGS")]
    pub worker_flags: Vec<String>,
}

impl ServiceInstallArgs {
    /// The flags, parsed as a serving worker's.
    pub fn parse(&self) -> Result<WorkerArgs, clap::Error> {
        worker_args(&self.worker_flags)
    }
}

/// `flags` (no program name) parsed as a serving worker's.
pub fn worker_args(flags: &[String]) -> Result<WorkerArgs, clap::Error> {
    WorkerArgs::try_parse_from(std::iter::once("strata-worker").chain(flags.iter().map(String::as_str)))
}

/// The port a worker without `--listen` serves on, which `drain` / `undrain` reach.
pub const DEFAULT_PORT: u16 = 7070;

#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// The local worker's gRPC address (HOST:PORT or http://HOST:PORT; default: the
    /// installed service's port, else 127.0.0.1:7070).
    #[arg(long, env = "STRATA_WORKER_ADDRESS", value_name = "ADDRESS", value_parser = address::canonical)]
    pub address: Option<String>,
    /// The worker's cache folder, where it keeps its key and certificate (the
    /// worker takes this call from its own certificate or the coordinator's).
    #[arg(long, env = "STRATA_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DevicesArgs {
    /// Run the self-benchmark now (and cache its figure) and print it.
    #[arg(long)]
    pub bench: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The worker's flags (`--device`, `--max-memory`, `--reserve`, `--threads`, ...).
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// The flags of a serving worker.
#[derive(Debug, Clone, Parser)]
#[command(name = "strata-worker", version, about)]
pub struct WorkerArgs {
    /// Address to serve gRPC on; port 0 picks a free one (printed at start).
    #[arg(long, default_value = "0.0.0.0:7070", env = "STRATA_WORKER_LISTEN")]
    pub listen: String,
    /// Address other nodes reach this worker at, HOST:PORT (default: the bound
    /// address, with 127.0.0.1 in place of an unspecified IP). Over mDNS, a worker
    /// listening on 0.0.0.0 advertises every address of the host unless this is
    /// given.
    #[arg(long, env = "STRATA_WORKER_ADVERTISE", value_name = "ADDRESS", value_parser = address::canonical)]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub trace: strata_telemetry::TraceArgs,
    /// Do not advertise this worker over mDNS (coordinators then need --worker, or
    /// this worker --join).
    #[arg(long, env = "STRATA_NO_MDNS")]
    pub no_mdns: bool,
    /// Send frames to workers on this machine over gRPC only, not over a local
    /// Unix socket (to compare the two; Linux has the sockets, other systems not).
    #[arg(long, env = "STRATA_NO_LOCAL_LANES")]
    pub no_local_lanes: bool,
    /// The cluster to advertise in over mDNS: coordinators started with another
    /// name ignore this worker. Only a hash of it is sent.
    #[arg(long, env = "STRATA_CLUSTER", default_value = strata_discovery::DEFAULT_CLUSTER)]
    pub cluster: String,
    /// A local GGUF file; shards of a model with the same content hash load from it
    /// instead of being pulled from the coordinator. Repeatable.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    /// Where pulled shards are cached (default: the user cache folder/strata/shards).
    #[arg(long, env = "STRATA_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The coordinator's gRPC address to announce this worker to (retried until it
    /// answers): HOST:PORT or http://HOST:PORT, the port `strata serve` prints as
    /// `grpc=` (7100 unless --grpc-listen says otherwise; required, as the
    /// coordinator's HTTP port is another).
    #[arg(long, env = "STRATA_JOIN", value_name = "ADDRESS", value_parser = address::canonical)]
    pub join: Option<String>,
    /// The join token `strata serve` printed: the worker trusts only that
    /// coordinator and is enrolled by it (every connection is then mutual TLS).
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true, conflicts_with_all = ["token_file", "insecure"])]
    pub token: Option<String>,
    /// A file holding the join token (kept out of the process list).
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub token_file: Option<PathBuf>,
    /// Plain TCP, no token: anyone who can reach the port can load, read and steer
    /// this worker. For a quick trial on a network you trust; the coordinator must be
    /// started with --insecure too.
    #[arg(long, env = "STRATA_INSECURE")]
    pub insecure: bool,
    /// Where this worker keeps its key and certificate (default: the cache
    /// folder's identity/NODE-ID).
    #[arg(long, env = "STRATA_IDENTITY_DIR", value_name = "DIR")]
    pub identity_dir: Option<PathBuf>,
    /// Compute threads (the compute pool's and the stage's own). Workers sharing a
    /// machine should split its cores rather than each take all of them.
    #[arg(long, env = "STRATA_THREADS")]
    pub threads: Option<usize>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// A lock file shared by the workers on this machine: they then compute one at
    /// a time, each with all its threads, instead of all at once fighting over the
    /// same cores (what oversubscription costs is far more than what waiting does).
    /// Leave it out when a worker has its cores to itself.
    #[arg(long, env = "STRATA_COMPUTE_LOCK")]
    pub compute_lock: Option<PathBuf>,
    /// A name for people and logs (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// The most memory of the device to offer (`20GiB`, `512MiB`, `8GB`, bytes).
    #[arg(long, value_name = "SIZE", value_parser = size, env = "STRATA_MAX_MEMORY")]
    pub max_memory: Option<u64>,
    /// Memory of the device to leave alone (default: 1 GiB of a GPU that drives a
    /// display, 512 MiB of another; 10% of the RAM, 512 MiB to 4 GiB, on the CPU).
    #[arg(long, value_name = "SIZE", value_parser = size, env = "STRATA_RESERVE")]
    pub reserve: Option<u64>,
    /// Run the start-up self-benchmark even if its result is cached.
    #[arg(long, conflicts_with = "no_bench")]
    pub rebench: bool,
    /// Skip the start-up self-benchmark: the device's bandwidth is reported as
    /// unknown (0).
    #[arg(long, env = "STRATA_NO_BENCH")]
    pub no_bench: bool,
    /// Programs to give the machine to: while one of them runs, the worker drains
    /// itself (as `strata-worker drain`) and comes back once none has run for
    /// --yield-idle. Names as the process list shows them, in any case, `.exe`
    /// optional: `game.exe,steam.exe`.
    #[arg(long, value_name = "NAMES", value_delimiter = ',', env = "STRATA_YIELD_TO_PROCESSES")]
    pub yield_to_processes: Vec<String>,
    /// Also yield while another process keeps the GPU busy (NVIDIA, through NVML):
    /// the worker's GPU, or any GPU for a CPU worker. Without NVML it warns and does
    /// nothing.
    #[arg(long, env = "STRATA_YIELD_TO_GPU_USERS")]
    pub yield_to_gpu_users: bool,
    /// Also yield while a full-screen program has the foreground, as most games do
    /// (Windows; a worker running as a service sees no desktop, so there it warns
    /// and does nothing: use the two flags above).
    #[arg(long, env = "STRATA_YIELD_TO_FULLSCREEN")]
    pub yield_to_fullscreen: bool,
    /// How long nothing yielded to must have run before the worker comes back (`60s`,
    /// `5m`).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration, env = "STRATA_YIELD_IDLE")]
    pub yield_idle: Duration,
    /// How often to look for what the worker yields to (`1s`, `250ms`): sooner
    /// notices a game faster, for a process list read each time.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = poll_interval, env = "STRATA_YIELD_POLL")]
    pub yield_poll: Duration,
}

/// A `--max-memory` / `--reserve` size, for clap.
fn size(text: &str) -> Result<u64, String> {
    units::parse_bytes(text).map_err(|e| e.to_string())
}

/// A `--yield-idle` duration, for clap.
fn duration(text: &str) -> Result<Duration, String> {
    units::parse_duration(text).map_err(|e| e.to_string())
}

/// A `--yield-poll` interval, for clap: a duration of at least a millisecond.
fn poll_interval(text: &str) -> Result<Duration, String> {
    let interval = duration(text)?;
    if interval < Duration::from_millis(1) {
        return Err(format!("{text:?} is too short: poll at most every millisecond"));
    }
    Ok(interval)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?} is not an IP address and port")]
    Listen(String),
    #[error("--model {0}: no such file")]
    MissingModel(PathBuf),
    #[error("--threads must be at least 1")]
    Threads,
    #[error("cannot determine a cache folder; pass --cache-dir")]
    NoCacheDir,
    #[error("--device {0:?} is not cpu or cuda:N")]
    Device(String),
    #[error("--max-memory must be above zero")]
    ZeroMaxMemory,
    #[error("--token: {0}")]
    Token(String),
    #[error("--token-file {0}: {1}")]
    TokenFile(PathBuf, String),
}

/// How a worker's connections are secured.
#[derive(Debug, Clone)]
pub enum WorkerTrust {
    /// Mutual TLS with the cluster of this token.
    Token(JoinToken),
    /// `--insecure`: plain TCP.
    Insecure,
    /// Neither was given: serving refuses to start (`devices` needs neither).
    Missing,
}

/// How long nothing yielded to must have run before a yield ends, unless
/// `--yield-idle`.
pub const DEFAULT_YIELD_IDLE: Duration = Duration::from_secs(60);

/// How often the process list, the GPU and the foreground window are looked at. A
/// refresh of the process list reads one small /proc file per process: a
/// millisecond or two a second.
pub const YIELD_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// What to yield to, as the command line gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YieldConfig {
    /// Program names, compared without case and without `.exe`.
    pub processes: Vec<String>,
    /// Yield while another process keeps the GPU busy.
    pub gpu_users: bool,
    /// Yield while a full-screen program has the foreground.
    pub fullscreen: bool,
    /// How long nothing watched must be seen before a yield ends.
    pub idle: Duration,
    /// How often the sources are polled.
    pub poll: Duration,
}

impl Default for YieldConfig {
    fn default() -> Self {
        Self {
            processes: Vec::new(),
            gpu_users: false,
            fullscreen: false,
            idle: DEFAULT_YIELD_IDLE,
            poll: YIELD_POLL_INTERVAL,
        }
    }
}

impl YieldConfig {
    /// Whether there is anything to watch.
    pub fn is_on(&self) -> bool {
        !self.processes.is_empty() || self.gpu_users || self.fullscreen
    }
}

/// A worker's validated settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    /// Advertise over mDNS once serving.
    pub mdns: bool,
    /// Frames to and from workers on this machine go over Unix sockets
    /// ([`crate::local_lane`]).
    pub local_lanes: bool,
    pub cluster: String,
    pub name: String,
    pub models: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub join: Option<String>,
    /// How this worker's connections are secured.
    pub trust: WorkerTrust,
    /// `--identity-dir`.
    pub identity_dir: Option<PathBuf>,
    /// The compute pool size, for the description (main sets the pool itself).
    pub threads: usize,
    pub device: String,
    pub compute_lock: Option<PathBuf>,
    /// `--max-memory` and `--reserve`.
    pub memory: MemoryLimits,
    pub bench: BenchMode,
    /// `--yield-to-processes`, `--yield-to-gpu-users`, `--yield-to-fullscreen`,
    /// `--yield-idle`.
    pub yielding: YieldConfig,
}

impl WorkerConfig {
    /// Defaults for a worker on loopback that caches shards in `cache_dir` (mDNS off).
    pub fn local(cache_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            mdns: false,
            local_lanes: true,
            cluster: strata_discovery::DEFAULT_CLUSTER.into(),
            name: "worker".into(),
            models: Vec::new(),
            cache_dir,
            join: None,
            // In-process test workers: one process holds one identity.
            trust: WorkerTrust::Insecure,
            identity_dir: None,
            threads: 1,
            device: "cpu".into(),
            compute_lock: None,
            memory: MemoryLimits::default(),
            // Tests start many workers; none of them needs the figure.
            bench: BenchMode::Skip,
            yielding: YieldConfig::default(),
        }
    }

    /// Validates `args`; `env` is the process environment (a map in tests).
    pub fn from_args(args: WorkerArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let listen: SocketAddr = args.listen.parse().map_err(|_| ConfigError::Listen(args.listen.clone()))?;
        if let Some(missing) = args.models.iter().find(|p| !p.is_file()) {
            return Err(ConfigError::MissingModel(missing.clone()));
        }
        if args.threads == Some(0) {
            return Err(ConfigError::Threads);
        }
        let device = args.device.trim().to_string();
        if !(device == "cpu"
            || device == "cuda"
            || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(ConfigError::Device(device));
        }
        if args.max_memory == Some(0) {
            return Err(ConfigError::ZeroMaxMemory);
        }
        let bench = if args.no_bench {
            BenchMode::Skip
        } else if args.rebench {
            BenchMode::Rerun
        } else {
            BenchMode::Cached
        };
        let cache_dir = match args.cache_dir {
            Some(dir) => dir,
            None => default_cache_dir(env).ok_or(ConfigError::NoCacheDir)?,
        };
        // HOSTNAME where a shell sets it, COMPUTERNAME on Windows.
        let name = args
            .name
            .or_else(|| env("HOSTNAME"))
            .or_else(|| env("COMPUTERNAME"))
            .or_else(host_name)
            .unwrap_or_else(|| "worker".into());
        let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let token = match (&args.token, &args.token_file) {
            (Some(text), _) => Some(text.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file).map_err(|e| ConfigError::TokenFile(file.clone(), e.to_string()))?,
            ),
            (None, None) => None,
        };
        let trust = match token {
            Some(text) => WorkerTrust::Token(JoinToken::parse(&text).map_err(|e| ConfigError::Token(e.to_string()))?),
            None if args.insecure => WorkerTrust::Insecure,
            None => WorkerTrust::Missing,
        };
        Ok(Self {
            listen,
            advertise: args.advertise,
            mdns: !args.no_mdns,
            local_lanes: !args.no_local_lanes,
            cluster: args.cluster,
            name,
            models: args.models,
            cache_dir,
            join: args.join,
            trust,
            identity_dir: args.identity_dir,
            threads,
            device,
            compute_lock: args.compute_lock,
            memory: MemoryLimits {
                max_memory: args.max_memory,
                reserve: args.reserve,
            },
            bench,
            yielding: YieldConfig {
                processes: args
                    .yield_to_processes
                    .iter()
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect(),
                gpu_users: args.yield_to_gpu_users,
                fullscreen: args.yield_to_fullscreen,
                idle: args.yield_idle,
                poll: args.yield_poll,
            },
        })
    }
}

/// `$STRATA_CACHE_DIR/shards`, else the user cache folder's `strata/shards`
/// (`%LOCALAPPDATA%\strata\shards` on Windows).
pub fn default_cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(dir) = env("STRATA_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("shards"));
    }
    strata_platform::paths::user_cache().map(|d| d.join("shards"))
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> WorkerArgs {
        WorkerArgs::parse_from(std::iter::once("strata-worker").chain(extra.iter().copied()))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn bad_flags_fail_before_anything_starts() {
        let bad = [
            (vec!["--listen", "nowhere"], "--listen"),
            (vec!["--model", "/definitely/not/here.gguf"], "no such file"),
            (vec!["--threads", "0"], "--threads"),
            (vec!["--device", "tpu"], "--device"),
            (vec!["--max-memory", "0"], "--max-memory must be above zero"),
        ];
        for (flags, expected) in bad {
            let err = WorkerConfig::from_args(args(&flags), &no_env).unwrap_err().to_string();
            assert!(err.contains(expected), "{flags:?}: {err}");
        }
    }

    /// Every flag naming a peer takes host:port or an http:// URL, hands on
    /// host:port, and refuses anything else naming the flag.
    #[test]
    fn address_flags_take_host_port_or_a_url() {
        let config = WorkerConfig::from_args(
            args(&["--cache-dir", "/tmp/x", "--join", "http://127.0.0.1:7100/", "--advertise", "[::1]:7070"]),
            &no_env,
        )
        .unwrap();
        assert_eq!((config.join.as_deref(), config.advertise.as_deref()), (Some("127.0.0.1:7100"), Some("[::1]:7070")));
        let bad = [
            (vec!["--join", "coordinator"], "invalid value 'coordinator' for '--join <ADDRESS>'", "has no port"),
            (vec!["--join", "http://box:7100/v1"], "for '--join <ADDRESS>'", "has a path /v1"),
            (vec!["--join", "https://box:7100"], "for '--join <ADDRESS>'", "https is not supported yet"),
            (vec!["--advertise", "box1"], "for '--advertise <ADDRESS>'", "has no port"),
            (vec!["--advertise", "box:99999"], "for '--advertise <ADDRESS>'", "the port `99999`"),
        ];
        for (flags, flag, problem) in bad {
            let err = WorkerArgs::try_parse_from(std::iter::once("strata-worker").chain(flags.iter().copied()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(flag) && err.contains(problem), "{flags:?}: {err}");
        }
        let Some(Command::Drain(control)) =
            Cli::parse_from(["strata-worker", "drain", "--address", "http://localhost:7071"]).command
        else {
            panic!("not the drain subcommand")
        };
        assert_eq!(control.address.as_deref(), Some("localhost:7071"));
        let err = Cli::try_parse_from(["strata-worker", "undrain", "--address", "localhost"]).unwrap_err().to_string();
        assert!(err.contains("for '--address <ADDRESS>'") && err.contains("has no port"), "{err}");
    }

    #[test]
    fn sizes_and_bench_flags() {
        let config = WorkerConfig::from_args(
            args(&["--max-memory", "20GiB", "--reserve", "512MiB"]),
            &no_env,
        )
        .unwrap();
        assert_eq!(
            config.memory,
            MemoryLimits {
                max_memory: Some(20 << 30),
                reserve: Some(512 << 20)
            }
        );
        assert_eq!(config.bench, BenchMode::Cached);
        let config =
            WorkerConfig::from_args(args(&["--max-memory", "8GB", "--rebench"]), &no_env).unwrap();
        assert_eq!(
            (config.memory.max_memory, config.bench),
            (Some(8_000_000_000), BenchMode::Rerun)
        );
        let config =
            WorkerConfig::from_args(args(&["--reserve", "1048576", "--no-bench"]), &no_env)
                .unwrap();
        assert_eq!(
            (config.memory.reserve, config.bench),
            (Some(1 << 20), BenchMode::Skip)
        );
        let err = WorkerArgs::try_parse_from(["strata-worker", "--max-memory", "20QB"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid value '20QB' for '--max-memory <SIZE>'")
                && err.contains("unknown unit"),
            "{err}"
        );
        let err = WorkerArgs::try_parse_from(["strata-worker", "--reserve", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`lots`: not a number followed by a unit"),
            "{err}"
        );
        assert!(WorkerArgs::try_parse_from(["strata-worker", "--rebench", "--no-bench"]).is_err());
    }

    #[test]
    fn no_subcommand_serves_and_devices_takes_the_worker_flags() {
        let cli = Cli::parse_from(["strata-worker", "--threads", "2", "--max-memory", "1GiB"]);
        assert!(cli.command.is_none());
        assert_eq!(
            (cli.serve.threads, cli.serve.max_memory),
            (Some(2), Some(1 << 30))
        );
        let cli = Cli::parse_from([
            "strata-worker",
            "devices",
            "--json",
            "--device",
            "cuda:1",
            "--reserve",
            "2GiB",
        ]);
        let Some(Command::Devices(d)) = cli.command else {
            panic!("not the devices subcommand")
        };
        assert!(d.json && !d.bench);
        assert_eq!(
            (d.worker.device.as_str(), d.worker.reserve),
            ("cuda:1", Some(2 << 30))
        );
    }

    #[test]
    fn the_cache_folder_follows_the_environment() {
        let env = |k: &str| (k == "STRATA_CACHE_DIR").then(|| "/tmp/x".to_string());
        let config =
            WorkerConfig::from_args(args(&["--listen", "127.0.0.1:0", "--join", "127.0.0.1:9"]), &env).unwrap();
        assert_eq!(config.cache_dir, PathBuf::from("/tmp/x/shards"));
        assert_eq!(config.join.as_deref(), Some("127.0.0.1:9"));
    }

    #[test]
    fn yield_flags() {
        let off = WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x"]), &no_env).unwrap();
        assert!(!off.yielding.is_on());
        assert_eq!(off.yielding.idle, Duration::from_secs(60));
        let on = WorkerConfig::from_args(
            args(&["--cache-dir", "/tmp/x", "--yield-to-processes", "game.exe, steam.exe,", "--yield-idle", "5m"]),
            &no_env,
        )
        .unwrap();
        assert_eq!(on.yielding.processes, ["game.exe", "steam.exe"]);
        assert_eq!((on.yielding.gpu_users, on.yielding.idle), (false, Duration::from_secs(300)));
        let gpu = WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x", "--yield-to-gpu-users"]), &no_env).unwrap();
        assert!(gpu.yielding.is_on() && gpu.yielding.gpu_users);
        let screen = WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x", "--yield-to-fullscreen"]), &no_env).unwrap();
        assert!(screen.yielding.is_on() && screen.yielding.fullscreen && !screen.yielding.gpu_users);
        let poll = WorkerArgs::try_parse_from(["strata-worker", "--yield-poll", "250ms"]).unwrap();
        assert_eq!(poll.yield_poll, Duration::from_millis(250));
        let default = WorkerArgs::try_parse_from(["strata-worker"]).unwrap();
        assert_eq!(default.yield_poll, YIELD_POLL_INTERVAL);
        let err = WorkerArgs::try_parse_from(["strata-worker", "--yield-poll", "0s"]).unwrap_err().to_string();
        assert!(err.contains("too short"), "{err}");
        let err = WorkerArgs::try_parse_from(["strata-worker", "--yield-idle", "soon"]).unwrap_err().to_string();
        assert!(err.contains("not a duration such as 60s"), "{err}");
    }

    #[test]
    fn service_install_takes_the_worker_s_flags_verbatim() {
        let cli = Cli::parse_from(["strata-worker", "service", "install", "--join", "box:7100", "--yield-to-fullscreen"]);
        let Some(Command::Service(ServiceCommand::Install(install))) = cli.command else {
            panic!("not service install")
        };
        assert_eq!(install.worker_flags, ["--join", "box:7100", "--yield-to-fullscreen"]);
        let args = install.parse().unwrap();
        assert_eq!((args.join.as_deref(), args.yield_to_fullscreen), (Some("box:7100"), true));
        let bad = ServiceInstallArgs { worker_flags: vec!["--threads".into(), "lots".into()] };
        assert!(bad.parse().unwrap_err().to_string().contains("--threads"));
        for command in ["uninstall", "start", "stop", "run"] {
            assert!(Cli::try_parse_from(["strata-worker", "service", command]).is_ok(), "{command}");
        }
    }

    #[test]
    fn mdns_is_on_by_default_and_can_be_turned_off() {
        let on = WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x"]), &no_env).unwrap();
        assert!(on.mdns);
        assert_eq!(on.cluster, "strata");
        let off =
            WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x", "--no-mdns", "--cluster", "lab"]), &no_env).unwrap();
        assert!(!off.mdns);
        assert_eq!(off.cluster, "lab");
        assert!(!WorkerConfig::local(PathBuf::from("/tmp/x")).mdns, "in-process test workers stay off mDNS");
        let no_lanes = WorkerConfig::from_args(args(&["--cache-dir", "/tmp/x", "--no-local-lanes"]), &no_env).unwrap();
        assert!(on.local_lanes && !no_lanes.local_lanes);
    }
}
