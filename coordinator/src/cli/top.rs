//! `strata top`: `strata status` refreshing in place, for the person on the server
//! over SSH: the nodes with their state, layers, memory and speed, the layer map
//! from layer 0 to N by node, the requests running and queued. Plain ANSI (clear
//! and redraw) on a terminal; frames one after another otherwise (a pipe, a log).

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;

use super::admin::{call, format_status, runtime, CoordinatorArg};
use crate::cluster::ClusterStatus;

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub coordinator: CoordinatorArg,
    /// Seconds between two refreshes.
    #[arg(long, default_value_t = 1.0, value_parser = positive_seconds)]
    pub interval: f64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    pub iterations: Option<u64>,
}

fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
        _ => Err(format!("{text:?} is not a number of seconds above 0")),
    }
}

/// The widest the layer map is drawn, in characters.
const MAP_WIDTH: usize = 60;

pub fn top(args: TopArgs) -> anyhow::Result<()> {
    let to = &args.coordinator;
    let terminal = std::io::stdout().is_terminal();
    runtime()?.block_on(async {
        let stop = strata_platform::stop::requested();
        tokio::pin!(stop);
        let mut shown = 0;
        loop {
            let status =
                call(&to.coordinator, to.admin_key.as_deref(), "GET", "/admin/status", None, Duration::from_secs(5));
            let frame = match status.await.and_then(|v| Ok(serde_json::from_value::<ClusterStatus>(v)?)) {
                Ok(s) => render(&s),
                // Said in the frame, and tried again: a coordinator restarting comes back.
                Err(e) => format!("cannot read the status of {}: {e:#}\n", to.coordinator),
            };
            let mut out = std::io::stdout().lock();
            if terminal {
                // Home, then clear: the new frame replaces the old without scrolling.
                write!(out, "\x1b[H\x1b[2J")?;
            } else if shown > 0 {
                writeln!(out)?;
            }
            write!(out, "{frame}")?;
            if terminal {
                write!(out, "refreshing every {}s; Ctrl-C to leave", args.interval)?;
            }
            out.flush()?;
            shown += 1;
            if args.iterations.is_some_and(|n| shown >= n) {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs_f64(args.interval)) => {}
                () = &mut stop => break,
            }
        }
        if terminal {
            println!();
        }
        anyhow::Ok(())
    })
}

/// One frame: the status table and the layer map.
pub fn render(s: &ClusterStatus) -> String {
    let mut out = format_status(s);
    out.push_str(&layer_map(s));
    out
}

/// Layers 0..N as a bar, each cell the index of the node holding it (`.` none),
/// and the key: `layers |0000011111222222| 0 gaming-pc  1 server  2 rack`.
fn layer_map(s: &ClusterStatus) -> String {
    if s.layers == 0 {
        return String::new();
    }
    let holders: Vec<(usize, &crate::cluster::NodeReport)> =
        s.nodes.iter().filter(|n| n.layers.is_some()).enumerate().collect();
    let width = s.layers.min(MAP_WIDTH);
    let bar: String = (0..width)
        .map(|cell| {
            let layer = cell * s.layers / width;
            let holder = holders.iter().find(|(_, n)| n.layers.is_some_and(|[a, b]| (a..b).contains(&layer)));
            holder.map_or('.', |(i, _)| mark(*i))
        })
        .collect();
    let key: Vec<String> = holders.iter().map(|(i, n)| format!("{} {}", mark(*i), n.name)).collect();
    format!("layers 0..{} |{bar}| {}\n", s.layers, key.join("  "))
}

/// The character that marks the `i`th holder in the map: 0-9, then a-z, again.
fn mark(i: usize) -> char {
    char::from_digit((i % 36) as u32, 36).unwrap_or('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(nodes: &[(&str, Option<[usize; 2]>)], layers: usize) -> ClusterStatus {
        let nodes: Vec<serde_json::Value> = nodes
            .iter()
            .map(|(name, l)| {
                serde_json::json!({
                    "name": name, "address": "10.0.0.1:7070", "node_id": "", "state": "ready", "devices": [],
                    "memory_offered_bytes": 0, "memory_used_bytes": 0, "bandwidth_bytes_per_second": 0.0,
                    "layers": l, "stage": null, "sequences": 0, "measured_tokens_per_second": 0.0,
                    "measured_step_ms": null, "predicted_step_ms": null, "reason": null, "pulls": [],
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "model": "m", "layers": layers, "pipeline_id": 1, "nodes": nodes, "in_flight": 0, "waiting": 0,
            "waiting_reason": null, "predicted_tokens_per_second": null, "measured_tokens_per_second": 0.0,
        }))
        .unwrap()
    }

    #[test]
    fn the_layer_map_shows_who_holds_each_layer() {
        let s = status(&[("pc", Some([0, 3])), ("idle", None), ("rack", Some([3, 6]))], 6);
        assert_eq!(layer_map(&s), "layers 0..6 |000111| 0 pc  1 rack\n");
        let gap = status(&[("pc", Some([0, 2]))], 4);
        assert_eq!(layer_map(&gap), "layers 0..4 |00..| 0 pc\n");
        // Many layers are drawn at most MAP_WIDTH wide.
        let wide = status(&[("a", Some([0, 40])), ("b", Some([40, 80]))], 80);
        let map = layer_map(&wide);
        let bar = map.split('|').nth(1).unwrap();
        assert_eq!(bar.len(), MAP_WIDTH, "{map}");
        assert_eq!(bar, format!("{}{}", "0".repeat(MAP_WIDTH / 2), "1".repeat(MAP_WIDTH / 2)), "{map}");
        assert!(render(&wide).contains("model m (80 layers)"));
    }
}
