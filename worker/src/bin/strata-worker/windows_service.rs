//! `strata-worker service install|uninstall|start|stop`: the worker as a Windows
//! service, started with Windows under the service manager, its flags stored in
//! `%ProgramData%\strata\worker-service.json`, its log in
//! `%ProgramData%\strata\logs\worker.log`, its cache in `%ProgramData%\strata`, and
//! its port opened in the firewall.
//!
//! What is not Windows-specific (the stored flags, where files go, the ports to
//! open) is here and tested everywhere; the service manager's calls are in
//! [`manager`], built on Windows only.

// Only the Windows manager uses these; the tests below run them everywhere.
#![cfg_attr(not(windows), allow(dead_code))]

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use strata_platform::firewall::Protocol;
use strata_worker::config::{worker_args, ServiceCommand, ServiceInstallArgs};
use strata_worker::{WorkerArgs, WorkerConfig};

/// The service's name for the service manager (`sc query strata-worker`).
pub const SERVICE_NAME: &str = "strata-worker";
/// The name of its firewall rules.
pub const FIREWALL_RULE: &str = "strata-worker";

/// The flags the service runs the worker with, as `service install` stored them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFlags {
    pub flags: Vec<String>,
}

/// `%ProgramData%\strata` (`/var/lib/strata` elsewhere).
fn home() -> PathBuf {
    strata_platform::paths::machine_data()
}

pub fn flags_path() -> PathBuf {
    home().join("worker-service.json")
}

pub fn log_path() -> PathBuf {
    home().join("logs").join("worker.log")
}

/// The environment the service's worker sees: the process's, with the cache in
/// the machine-wide folder unless `STRATA_CACHE_DIR` says otherwise (a service runs
/// as no user, so it has no user cache folder worth the name).
pub fn service_env(key: &str) -> Option<String> {
    std::env::var(key).ok().or_else(|| (key == "STRATA_CACHE_DIR").then(|| home().display().to_string()))
}

impl StoredFlags {
    pub fn load() -> anyhow::Result<Self> {
        let path = flags_path();
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (is the service installed?)", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not what `service install` writes", path.display()))
    }

    fn save(&self) -> anyhow::Result<()> {
        let path = flags_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(self)?).with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn args(&self) -> anyhow::Result<WorkerArgs> {
        worker_args(&self.flags).map_err(|e| anyhow::anyhow!("the stored flags {:?}: {}", self.flags, first_line(&e)))
    }
}

fn first_line(e: &clap::Error) -> String {
    e.render().to_string().lines().next().unwrap_or_default().to_string()
}

/// The port of the installed service's worker, for `drain` / `undrain`.
pub fn installed_port() -> Option<u16> {
    let args = StoredFlags::load().ok()?.args().ok()?;
    args.listen.parse::<SocketAddr>().ok().map(|a| a.port())
}

/// Where the installed service's worker keeps its identity: its `--identity-dir`,
/// or the per-node folders below its cache (`%ProgramData%\strata\shards\identity`
/// by default), for `drain` / `undrain` typed at the machine.
pub fn installed_identity() -> Option<IdentityPlace> {
    let config = WorkerConfig::from_args(StoredFlags::load().ok()?.args().ok()?, &service_env).ok()?;
    Some(match config.identity_dir {
        Some(dir) => IdentityPlace::Folder(dir),
        None => IdentityPlace::PerNode(strata_worker::identities_dir(&config.cache_dir)),
    })
}

/// Where a worker's identity is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityPlace {
    /// One identity (`--identity-dir`).
    Folder(PathBuf),
    /// One folder a node id below this one (`<cache>/identity`).
    PerNode(PathBuf),
}

/// The inbound ports a worker with `config` needs open: its gRPC port, and mDNS
/// unless it is off.
pub fn firewall_ports(config: &WorkerConfig) -> Vec<(Protocol, u16)> {
    let mut ports = vec![(Protocol::Tcp, config.listen.port())];
    if config.mdns {
        ports.push((Protocol::Udp, strata_discovery::MDNS_PORT));
    }
    ports
}

/// Checks the flags as the service will see them and stores them.
fn store(install: &ServiceInstallArgs) -> anyhow::Result<WorkerConfig> {
    let args = install.parse().map_err(|e| anyhow::anyhow!("{}", first_line(&e)))?;
    let config = WorkerConfig::from_args(args, &service_env)?;
    if config.listen.port() == 0 {
        anyhow::bail!("a service needs a fixed port: --listen HOST:PORT with a port other than 0");
    }
    StoredFlags { flags: install.worker_flags.clone() }.save()?;
    Ok(config)
}

pub fn run_command(command: ServiceCommand) -> anyhow::Result<()> {
    manager::run_command(command)
}

#[cfg(windows)]
#[path = "windows_service/manager.rs"]
mod manager;

#[cfg(not(windows))]
mod manager {
    use strata_worker::config::ServiceCommand;

    pub fn run_command(_command: ServiceCommand) -> anyhow::Result<()> {
        anyhow::bail!(
            "`strata-worker service` installs a Windows service; on Linux run the worker under \
             systemd instead (deploy/strata-worker.service)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_needs_its_port_and_mdns_open() {
        let flags = |f: &[&str]| ServiceInstallArgs { worker_flags: f.iter().map(|s| s.to_string()).collect() };
        let args = flags(&["--listen", "0.0.0.0:7171", "--cache-dir", "/tmp/x"]).parse().unwrap();
        let config = WorkerConfig::from_args(args, &service_env).unwrap();
        assert_eq!(firewall_ports(&config), [(Protocol::Tcp, 7171), (Protocol::Udp, 5353)]);
        let args = flags(&["--no-mdns", "--cache-dir", "/tmp/x"]).parse().unwrap();
        let config = WorkerConfig::from_args(args, &service_env).unwrap();
        assert_eq!(firewall_ports(&config), [(Protocol::Tcp, 7070)]);
    }

    #[test]
    fn stored_flags_round_trip_and_name_their_problem() {
        let stored = StoredFlags { flags: vec!["--listen".into(), "0.0.0.0:7171".into()] };
        let text = serde_json::to_string(&stored).unwrap();
        assert_eq!(serde_json::from_str::<StoredFlags>(&text).unwrap(), stored);
        assert_eq!(stored.args().unwrap().listen, "0.0.0.0:7171");
        let bad = StoredFlags { flags: vec!["--threads".into(), "many".into()] };
        let err = bad.args().unwrap_err().to_string();
        assert!(err.contains("--threads") && err.contains("stored flags"), "{err}");
    }

    #[test]
    fn the_service_s_cache_is_machine_wide() {
        let cache = service_env("STRATA_CACHE_DIR").unwrap();
        if std::env::var_os("STRATA_CACHE_DIR").is_none() {
            assert_eq!(PathBuf::from(cache), home());
        }
        assert!(log_path().ends_with("logs/worker.log") || log_path().ends_with(r"logs\worker.log"));
    }

    #[cfg(not(windows))]
    #[test]
    fn elsewhere_the_service_commands_point_to_systemd() {
        let err = run_command(ServiceCommand::Start).unwrap_err().to_string();
        assert!(err.contains("Windows service") && err.contains("systemd"), "{err}");
    }
}
