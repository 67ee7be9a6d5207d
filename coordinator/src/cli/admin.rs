//! `strata status`, `strata drain NODE` and `strata undrain NODE`: the operator's
//! side of the coordinator's admin endpoints.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::json;

use strata_proto::address::{self, Address, AddressError};

use super::http::{self, HttpError, Reply};
use crate::cluster::report::PullReport;
use crate::cluster::{ClusterStatus, DrainReport};
use crate::planner::format_bytes;

/// Where the coordinator's HTTP API is.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorArg {
    /// The coordinator's HTTP address, as `strata serve --http-listen`: HOST:PORT,
    /// [IPv6]:PORT or http://HOST:PORT; without a port, 8000 (`--http-listen`'s).
    #[arg(
        long,
        env = "STRATA_COORDINATOR",
        default_value = "127.0.0.1:8000",
        value_name = "ADDRESS",
        value_parser = coordinator_address
    )]
    pub coordinator: String,
    /// The coordinator's admin key (`strata serve --admin-key`), where it has one.
    #[arg(long, env = "STRATA_ADMIN_KEY", hide_env_values = true, value_name = "KEY")]
    pub admin_key: Option<String>,
}

/// The port `strata serve --http-listen` listens on by default.
const DEFAULT_HTTP_PORT: u16 = 8000;

/// A `--coordinator` address as `host:port`. Unlike a gRPC address (`--join`,
/// `--worker`) the port may be left out: the HTTP API has one port, and a wrong
/// guess fails at once with "connection refused", not with a confusing reply from
/// another service.
pub(super) fn coordinator_address(text: &str) -> Result<String, AddressError> {
    Address::parse_with_default_port(text, Some(DEFAULT_HTTP_PORT)).map(|a| a.to_string())
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DrainArgs {
    /// The worker: its name, address or node id.
    pub node: String,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// Return when the worker's memory is free, with what the drain did.
    #[arg(long)]
    pub wait: bool,
    /// Drain even when what is left cannot hold the model: new requests then wait
    /// until capacity returns.
    #[arg(long)]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct UndrainArgs {
    /// The worker: its name, address or node id.
    pub node: String,
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
}

#[derive(Debug, clap::Subcommand)]
pub enum NodeCommand {
    /// Revoke a worker's certificate for good: every node refuses it from its next
    /// call, the coordinator never enrols it again, and its layers move to the others.
    Revoke(UndrainArgs),
}

pub fn node(command: NodeCommand) -> anyhow::Result<()> {
    let NodeCommand::Revoke(args) = command;
    post_node_command(&args.coordinator, "/admin/revoke", &args.node, Duration::from_secs(60))
}

/// POSTs `{"node": node}` to the admin route `path` and prints the reply's message.
fn post_node_command(to: &CoordinatorArg, path: &str, node: &str, wait: Duration) -> anyhow::Result<()> {
    let body = json!({ "node": node });
    let value = runtime()?.block_on(call(&to.coordinator, to.admin_key.as_deref(), "POST", path, Some(body), wait))?;
    println!("{}", value["message"].as_str().unwrap_or_default());
    Ok(())
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// The reply's body when it is a success, else the API's error message (`no worker
/// is named ...`), else one line on what answered: a server that is not a strata
/// coordinator (another service on that port, a proxy).
fn checked(coordinator: &str, path: &str, reply: Reply) -> anyhow::Result<serde_json::Value> {
    let body = reply.json().ok();
    if let Some(message) = body.as_ref().and_then(|b| b["error"]["message"].as_str()) {
        if reply.status == 401 {
            let flag = if path.starts_with("/admin") {
                "--admin-key / STRATA_ADMIN_KEY"
            } else {
                "--api-key / STRATA_API_KEY"
            };
            anyhow::bail!("{message} ({flag})")
        }
        anyhow::bail!("{message}")
    }
    match body {
        Some(body) if reply.status == 200 => Ok(body),
        _ => {
            let first_line = reply.body.lines().next().unwrap_or_default();
            let shown: String = first_line.chars().take(80).collect();
            let answer = if shown.is_empty() { String::new() } else { format!(": {shown}") };
            anyhow::bail!(
                "the server at {coordinator} is not a strata coordinator: {path} answered HTTP {}{answer} (--coordinator / STRATA_COORDINATOR)",
                reply.status
            )
        }
    }
}

/// One call to the coordinator's API, with `key` as the bearer when given.
pub(crate) async fn call(
    coordinator: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    wait: Duration,
) -> anyhow::Result<serde_json::Value> {
    let request = http::request_with_key(coordinator, method, path, body.as_ref(), key);
    let reply = tokio::time::timeout(wait, request)
        .await
        .with_context(|| format!("the coordinator at {coordinator} did not answer within {wait:?}"))?;
    match reply {
        Ok(reply) => checked(coordinator, path, reply),
        // One line that says where, why, and which flag to fix: the commonest
        // mistake is a coordinator that is not running or a wrong address.
        Err(HttpError::Connect(_, e)) => anyhow::bail!(
            "cannot reach the coordinator at {coordinator}: {} (is `strata serve` running? --coordinator / STRATA_COORDINATOR)",
            address::unreachable_reason(&e)
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!("talking to the coordinator at {coordinator}"))),
    }
}

/// The running cluster's status.
pub fn fetch_status(coordinator: &CoordinatorArg) -> anyhow::Result<ClusterStatus> {
    let value = runtime()?.block_on(call(
        &coordinator.coordinator,
        coordinator.admin_key.as_deref(),
        "GET",
        "/admin/status",
        None,
        Duration::from_secs(10),
    ))?;
    serde_json::from_value(value).context("the coordinator's status is malformed")
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let value = runtime()?.block_on(call(
        &args.coordinator.coordinator,
        args.coordinator.admin_key.as_deref(),
        "GET",
        "/admin/status",
        None,
        Duration::from_secs(10),
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let status: ClusterStatus = serde_json::from_value(value).context("the coordinator's status is malformed")?;
    print!("{}", format_status(&status));
    Ok(())
}

/// `strata status` as a table.
pub fn format_status(s: &ClusterStatus) -> String {
    let mut out = format!("model {} ({} layers)", s.model, s.layers);
    match s.pipeline_id {
        Some(_) => out.push_str(&format!(
            ", {} request(s) in flight, {:.1} tokens/s measured",
            s.in_flight, s.measured_tokens_per_second
        )),
        None => out.push_str(", no pipeline"),
    }
    if let Some(p) = s.predicted_tokens_per_second {
        out.push_str(&format!(", {p:.1} tokens/s predicted for one stream"));
    }
    if s.prefix_positions > 0 {
        out.push_str(&format!(", {} prompt positions copied from shared starts", s.prefix_positions));
    }
    out.push('\n');
    if s.transport == "insecure" {
        out.push_str(
            "INSECURE: plain TCP between the nodes (--insecure): anyone on the network can join, read prompts and \
             steer workers\n",
        );
    }
    for r in &s.refused {
        out.push_str(&format!("refused {} ({:.0}s ago): {}\n", r.address, r.seconds_ago, r.reason));
    }
    if let Some(reason) = &s.waiting_reason {
        out.push_str(&format!("{} request(s) wait for capacity: {reason}\n", s.waiting));
    }
    if let Some(reason) = &s.admission.reason {
        let longest = s.admission.queue.first().map_or(0.0, |q| q.waited_seconds);
        out.push_str(&format!(
            "{} request(s) queued for admission: {reason} (the first has waited {longest:.0}s)\n",
            s.admission.queue.len()
        ));
    }
    let header = [
        "NAME",
        "ADDRESS",
        "STATE",
        "LAYERS",
        "DEVICES",
        "OFFERED",
        "USED",
        "SPEED",
        "SEQS",
        "TOK/S",
        "STEP (PREDICTED)",
    ];
    let mut rows = vec![header.iter().map(|h| h.to_string()).collect::<Vec<_>>()];
    for n in &s.nodes {
        rows.push(vec![
            n.name.clone(),
            n.address.clone(),
            {
                let state = match &n.reason {
                    Some(r) => format!("{} ({r})", n.state),
                    None => n.state.clone(),
                };
                match format_pulls(&n.pulls) {
                    Some(pulling) => format!("{state}, {pulling}"),
                    None => state,
                }
            },
            n.layers.map_or("-".into(), |[a, b]| format!("{a}..{b}")),
            n.devices.join(", "),
            format_bytes(n.memory_offered_bytes),
            format_bytes(n.memory_used_bytes),
            if n.bandwidth_bytes_per_second > 0.0 {
                format!("{:.1} GB/s", n.bandwidth_bytes_per_second / 1e9)
            } else {
                "-".into()
            },
            n.sequences.to_string(),
            format!("{:.0}", n.measured_tokens_per_second),
            format_step(n.measured_step_ms, n.predicted_step_ms),
        ]);
    }
    let widths: Vec<usize> =
        (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    for n in &s.nodes {
        for l in &n.links {
            let rtt = l.rtt_ms.map_or("round trip not measured yet".into(), |ms| format!("{ms:.2} ms round trip"));
            let lane = if l.local_lane { ", over a local lane" } else { "" };
            out.push_str(&format!("link {} -> {}: {rtt}, {} sent{lane}\n", n.name, l.to, format_bytes(l.bytes_sent)));
        }
        if n.events_local_lane {
            out.push_str(&format!("events {} -> coordinator: over a local lane\n", n.name));
        }
    }
    out
}

/// What a node is pulling, all its shards together: `pulling 1.2 GiB of 9.8 GiB
/// (12%, 110 MB/s)`; `None` when it pulls nothing.
pub fn format_pulls(pulls: &[PullReport]) -> Option<String> {
    if pulls.is_empty() {
        return None;
    }
    let done: u64 = pulls.iter().map(|p| p.bytes_done).sum();
    let total: u64 = pulls.iter().map(|p| p.bytes_total).sum();
    let rate: f64 = pulls.iter().map(|p| p.bytes_per_second).sum();
    // Floored, so 100% means done.
    let percent = (done as u128 * 100).checked_div(total as u128).unwrap_or(0);
    // A decimal for a slow link (Wi-Fi), where whole MB/s would say 0.
    let precision = if rate < 10e6 { 1 } else { 0 };
    Some(format!(
        "pulling {} of {} ({percent}%, {:.precision$} MB/s)",
        format_bytes(done),
        format_bytes(total),
        rate / 1e6
    ))
}

/// A node's measured time per step next to the planner's prediction.
fn format_step(measured: Option<f64>, predicted: Option<f64>) -> String {
    let ms = |v: Option<f64>| match v {
        None => "-".to_string(),
        Some(v) if v < 0.1 => format!("{:.0} µs", v * 1e3),
        Some(v) => format!("{v:.2} ms"),
    };
    match predicted {
        Some(_) => format!("{} ({})", ms(measured), ms(predicted)),
        None => ms(measured),
    }
}

pub fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let body = json!({ "node": args.node, "force": args.force, "wait": args.wait });
    // A drain that waits loads layers elsewhere first: give it time.
    let wait = if args.wait { Duration::from_secs(600) } else { Duration::from_secs(30) };
    let to = &args.coordinator;
    let value = runtime()?.block_on(call(
        &to.coordinator,
        to.admin_key.as_deref(),
        "POST",
        "/admin/drain",
        Some(body),
        wait,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let report: DrainReport = serde_json::from_value(value).context("the coordinator's answer is malformed")?;
    println!("{}", report.message);
    Ok(())
}

pub fn undrain(args: UndrainArgs) -> anyhow::Result<()> {
    post_node_command(&args.coordinator, "/admin/undrain", &args.node, Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn pull(layers: [usize; 2], done: u64, total: u64, rate: f64) -> PullReport {
        PullReport { layers, bytes_done: done, bytes_total: total, bytes_per_second: rate }
    }

    #[test]
    fn a_pull_shows_how_far_it_is_and_how_fast_it_goes() {
        assert_eq!(format_pulls(&[]), None);
        let one = pull([0, 20], 12 * GIB / 10, 98 * GIB / 10, 110e6);
        assert_eq!(format_pulls(&[one]).unwrap(), "pulling 1.2 GiB of 9.8 GiB (12%, 110 MB/s)");
        // Two shards at once count together.
        let two = [pull([0, 10], GIB, 4 * GIB, 50e6), pull([10, 20], 3 * GIB, 4 * GIB, 60e6)];
        assert_eq!(format_pulls(&two).unwrap(), "pulling 4.0 GiB of 8.0 GiB (50%, 110 MB/s)");
        let slow = pull([0, 20], GIB, 2 * GIB, 420e3);
        assert_eq!(format_pulls(&[slow]).unwrap(), "pulling 1.0 GiB of 2.0 GiB (50%, 0.4 MB/s)");
        let stalled = pull([0, 20], 999, 1000, 0.0);
        assert_eq!(format_pulls(&[stalled]).unwrap(), "pulling 999 B of 1000 B (99%, 0.0 MB/s)");
    }

    #[test]
    fn a_refused_worker_is_said_with_why() {
        let status: ClusterStatus = serde_json::from_value(serde_json::json!({
            "model": "m", "layers": 2, "pipeline_id": null, "nodes": [], "in_flight": 0, "waiting": 0,
            "waiting_reason": null, "predicted_tokens_per_second": null, "measured_tokens_per_second": 0.0,
            "transport": "mutual TLS",
            "refused": [{"address": "10.0.0.4:7070", "reason": "it does not hold this cluster's join token",
                         "seconds_ago": 3.2}],
        }))
        .unwrap();
        let shown = format_status(&status);
        assert!(shown.contains("refused 10.0.0.4:7070 (3s ago): it does not hold this cluster's join token"), "{shown}");
        assert!(!shown.contains("INSECURE"), "{shown}");
    }
}
