//! `strata-worker`: parses the command line, binds the listener and runs the worker
//! until asked to stop (Ctrl-C, SIGTERM; on Windows also the console closing, log-off
//! and shutdown); `strata-worker devices` prints what it would offer;
//! `strata-worker drain` / `undrain` reach the worker running on this machine;
//! `strata-worker service ...` installs and runs it as a Windows service.

mod launch;
mod windows_service;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use strata_proto::v1::{self, worker_client::WorkerClient};
use strata_telemetry::TraceArgs;
use strata_trust::{Dial, NodeIdentity, Own, Transport};
use strata_worker::config::{ControlArgs, DevicesArgs, DEFAULT_PORT};
use strata_worker::profile::Profile;
use strata_worker::self_bench::BenchMode;
use strata_worker::{Cli, Command, WorkerArgs, WorkerConfig};
use windows_service::IdentityPlace;

fn main() -> ExitCode {
    strata_platform::memory::keep_freed_buffers();
    let cli = parse_args();
    let result = match cli.command {
        None => serve(cli.serve),
        Some(Command::Devices(args)) => devices(args),
        Some(Command::Drain(args)) => set_draining(args, true),
        Some(Command::Undrain(args)) => set_draining(args, false),
        Some(Command::Service(command)) => windows_service::run_command(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the causes joined by `: `, and no backtrace: the messages
            // name the problem (anyhow's `Debug`, what returning the error from
            // `main` prints, spreads the causes over lines).
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, or exit: a flag with a bad value (`--join http://box/v1`) on
/// one line, which already names the flag, the value and the problem, without
/// clap's "For more information, try '--help'" tip below it.
fn parse_args() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        if e.kind() == clap::error::ErrorKind::ValueValidation {
            let rendered = e.render().to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or_default());
            std::process::exit(e.exit_code());
        }
        e.exit()
    })
}

/// The worker `drain` / `undrain` reach: `--address`, else the installed service's
/// port, else the default one, on loopback.
fn control_address(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        let port = windows_service::installed_port().unwrap_or(DEFAULT_PORT);
        format!("127.0.0.1:{port}")
    })
}

/// `strata-worker drain` / `undrain`: tells the local worker; the coordinator sees
/// it in the next heartbeat and moves the layers.
fn set_draining(args: ControlArgs, draining: bool) -> anyhow::Result<()> {
    let service = args.address.is_none().then(windows_service::installed_identity).flatten();
    let address = &control_address(args.address);
    // The worker's own certificate, where it has one: it takes this call from
    // itself (or the coordinator) only.
    let user_cache = || strata_worker::config::default_cache_dir(&|k| std::env::var(k).ok());
    let places = identity_places(args.cache_dir, service, user_cache);
    for place in &places {
        if let Some(identity) = enrolled_identity(place)? {
            let ca = identity.ca_sha256();
            strata_trust::install(Transport::tls(ca, Own::Node(std::sync::Arc::new(identity))))?;
            break;
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let response = runtime.block_on(request_drain_state(address, draining))?;
    let what = if draining { "draining" } else { "back in service" };
    if response.changed {
        println!("the worker at {address} is {what}; the coordinator moves its layers within a second");
    } else {
        println!("the worker at {address} already was {what}");
    }
    Ok(())
}

/// Where to look for the local worker's identity, first to last: below `--cache-dir`
/// when given; else the installed service's (when the address is the service's),
/// then below the user's cache.
fn identity_places(
    cache_dir: Option<PathBuf>,
    service: Option<IdentityPlace>,
    user_cache: impl FnOnce() -> Option<PathBuf>,
) -> Vec<IdentityPlace> {
    let per_node = |cache: PathBuf| IdentityPlace::PerNode(strata_worker::identities_dir(&cache));
    match cache_dir {
        Some(dir) => vec![per_node(dir)],
        None => service.into_iter().chain(user_cache().map(per_node)).collect(),
    }
}

/// An enrolled identity at `place`: the folder itself, or among its per-node
/// folders the newest (workers sharing a cache folder have one each; one worker a
/// machine is the rule).
fn enrolled_identity(place: &IdentityPlace) -> anyhow::Result<Option<NodeIdentity>> {
    let open =
        |folder: &std::path::Path| NodeIdentity::open_enrolled(folder).with_context(|| format!("{}", folder.display()));
    let dir = match place {
        IdentityPlace::Folder(folder) => return open(folder),
        IdentityPlace::PerNode(dir) => dir,
    };
    let Ok(entries) = std::fs::read_dir(dir) else { return Ok(None) };
    let mut folders: Vec<(std::time::SystemTime, std::path::PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.path().join("cert.pem").metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    folders.sort_by(|a, b| b.0.cmp(&a.0));
    for (_, folder) in folders {
        if let Some(identity) = open(&folder)? {
            return Ok(Some(identity));
        }
    }
    Ok(None)
}

fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let telemetry = launch::prepare(&args, launch::LogTo::Stderr, &args.trace)?;
    let served = launch::serve(args, &|k| std::env::var(k).ok(), strata_platform::stop::requested());
    telemetry.shutdown();
    served
}

async fn request_drain_state(address: &str, draining: bool) -> anyhow::Result<v1::SetDrainingResponse> {
    let channel = strata_trust::transport().connect(address, Dial::Worker).await.map_err(|e| {
        let reason = e.transport().map_or_else(|| e.to_string(), |t| strata_proto::address::unreachable_reason(t));
        anyhow::anyhow!(
            "cannot reach the worker at {address}: {reason} (is strata-worker running? --address / STRATA_WORKER_ADDRESS)"
        )
    })?;
    let response = WorkerClient::new(channel)
        .set_draining(v1::SetDrainingRequest { draining })
        .await
        .map_err(|s| {
            // Plain TCP to a worker that speaks TLS fails below HTTP/2: say why.
            let hint = if strata_trust::transport().secure() {
                ""
            } else {
                " (no certificate of the worker was found: a worker joined with a token takes this only from \
                 itself; give its --cache-dir)"
            };
            anyhow::anyhow!("the worker refused: {}{hint}", s.message())
        })?;
    Ok(response.into_inner())
}

fn devices(args: DevicesArgs) -> anyhow::Result<()> {
    // Nothing to trace: the devices are listed and the process ends.
    let _telemetry = launch::prepare(&args.worker, launch::LogTo::Stderr, &TraceArgs::default())?;
    let config = WorkerConfig::from_args(args.worker, &|k| std::env::var(k).ok())?;
    let mut profile = Profile::detect(&config, true)?;
    if args.bench {
        profile.bench(&config, BenchMode::Rerun)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&profile)?);
    } else {
        print!("{}", profile.report(args.bench));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_s_identity_is_looked_for_before_the_user_s_and_a_given_cache_alone() {
        let service = Some(IdentityPlace::PerNode(PathBuf::from("/var/lib/strata/shards/identity")));
        let user = || Some(PathBuf::from("/home/u/.cache/strata/shards"));
        assert_eq!(
            identity_places(None, service.clone(), user),
            [
                IdentityPlace::PerNode(PathBuf::from("/var/lib/strata/shards/identity")),
                IdentityPlace::PerNode(PathBuf::from("/home/u/.cache/strata/shards/identity")),
            ]
        );
        assert_eq!(
            identity_places(Some(PathBuf::from("/x")), service, user),
            [IdentityPlace::PerNode(PathBuf::from("/x/identity"))]
        );
        assert_eq!(identity_places(None, None, || None), []);
    }

    #[test]
    fn an_identity_folder_is_opened_as_it_is_and_a_missing_place_holds_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(enrolled_identity(&IdentityPlace::PerNode(dir.path().join("missing"))).unwrap().is_none());
        assert!(enrolled_identity(&IdentityPlace::Folder(dir.path().to_path_buf())).unwrap().is_none());
    }
}
