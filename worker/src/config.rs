//! The worker's command line and the validated configuration built from it.
//!
//! Everything is checked here, before a port is bound: a bad flag fails fast with a
//! message, and tests build a [`WorkerConfig`] directly without touching the process
//! environment.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// strata-worker: holds a layer range of a model and serves it over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "strata-worker", version, about)]
pub struct WorkerArgs {
    /// Address to serve gRPC on; port 0 picks a free one (printed at start).
    #[arg(long, default_value = "0.0.0.0:7070", env = "STRATA_WORKER_LISTEN")]
    pub listen: String,
    /// Address other nodes reach this worker at (default: the bound address, with
    /// 127.0.0.1 in place of an unspecified IP).
    #[arg(long, env = "STRATA_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// A local GGUF file; shards of a model with the same content hash load from it
    /// instead of being pulled from the coordinator. Repeatable.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<PathBuf>,
    /// Where pulled shards are cached (default: the user cache folder/strata/shards).
    #[arg(long, env = "STRATA_WORKER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The coordinator's gRPC address to announce this worker to (retried until it
    /// answers).
    #[arg(long, env = "STRATA_JOIN")]
    pub join: Option<String>,
    /// Compute threads (candle's pool). Workers sharing a machine should split its
    /// cores rather than each take all of them.
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--listen {0:?} is not an IP address and port")]
    Listen(String),
    #[error("--model {0}: no such file")]
    MissingModel(PathBuf),
    #[error("--threads must be at least 1")]
    Threads,
    #[error("--join {0:?} is not HOST:PORT")]
    Join(String),
    #[error("cannot determine a cache folder; pass --cache-dir")]
    NoCacheDir,
    #[error("--device {0:?} is not cpu or cuda:N")]
    Device(String),
}

/// A worker's validated settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub name: String,
    pub models: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub join: Option<String>,
    /// The compute pool size, for the description (main sets the pool itself).
    pub threads: usize,
    pub device: String,
    pub compute_lock: Option<PathBuf>,
}

impl WorkerConfig {
    /// Defaults for a worker on loopback that caches shards in `cache_dir`.
    pub fn local(cache_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            name: "worker".into(),
            models: Vec::new(),
            cache_dir,
            join: None,
            threads: 1,
            device: "cpu".into(),
            compute_lock: None,
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
        if let Some(join) = &args.join {
            if !looks_like_host_port(join) {
                return Err(ConfigError::Join(join.clone()));
            }
        }
        let device = args.device.trim().to_string();
        if !(device == "cpu"
            || device == "cuda"
            || device.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            return Err(ConfigError::Device(device));
        }
        let cache_dir = match args.cache_dir {
            Some(dir) => dir,
            None => default_cache_dir(env).ok_or(ConfigError::NoCacheDir)?,
        };
        let name = args.name.or_else(|| env("HOSTNAME")).or_else(host_name).unwrap_or_else(|| "worker".into());
        let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Ok(Self {
            listen,
            advertise: args.advertise,
            name,
            models: args.models,
            cache_dir,
            join: args.join,
            threads,
            device,
            compute_lock: args.compute_lock,
        })
    }
}

/// `$STRATA_CACHE_DIR/shards`, else the user cache folder's `strata/shards`.
pub fn default_cache_dir(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(dir) = env("STRATA_CACHE_DIR") {
        return Some(PathBuf::from(dir).join("shards"));
    }
    dirs::cache_dir().map(|d| d.join("strata").join("shards"))
}

fn looks_like_host_port(s: &str) -> bool {
    let s = s.strip_prefix("http://").unwrap_or(s);
    matches!(s.rsplit_once(':'), Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok())
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
            (vec!["--join", "coordinator"], "--join"),
            (vec!["--device", "tpu"], "--device"),
        ];
        for (flags, expected) in bad {
            let err = WorkerConfig::from_args(args(&flags), &no_env).unwrap_err().to_string();
            assert!(err.contains(expected), "{flags:?}: {err}");
        }
    }

    #[test]
    fn the_cache_folder_follows_the_environment() {
        let env = |k: &str| (k == "STRATA_CACHE_DIR").then(|| "/tmp/x".to_string());
        let config =
            WorkerConfig::from_args(args(&["--listen", "127.0.0.1:0", "--join", "127.0.0.1:9"]), &env).unwrap();
        assert_eq!(config.cache_dir, PathBuf::from("/tmp/x/shards"));
        assert_eq!(config.join.as_deref(), Some("127.0.0.1:9"));
    }
}
