//! What a node offers the pipeline: its devices (memory it may use, bandwidth) and
//! the latency of its link to the next stage; and the `--nodes` text that names
//! nodes by the devices in them.

use serde::Serialize;
pub use strata_proto::units::MemoryLimits;
use strata_proto::units::{parse_bandwidth, parse_bytes, QuantityError};

use super::catalog;

/// One accelerator (or a CPU's memory) a stage can run on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSpec {
    pub name: String,
    /// Bytes the planner may fill, after `--max-memory` and `--reserve`.
    pub memory: u64,
    /// Memory bandwidth in bytes per second: decode reads every weight once per token.
    pub bandwidth: f64,
}

/// A machine: one or more devices behind one network link.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSpec {
    pub name: String,
    pub devices: Vec<DeviceSpec>,
    /// Seconds a hidden state takes from this node to the next stage.
    pub link_latency: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeSpecError {
    #[error("no nodes given")]
    Empty,
    #[error("node `{0}` has no devices")]
    NoDevices(String),
    #[error("unknown device `{name}` (known: {known}; or MEMORY@BANDWIDTH such as 64GiB@50GB/s)")]
    UnknownDevice { name: String, known: String },
    #[error("`{0}`: a device count must be at least 1")]
    ZeroCount(String),
    #[error("`{text}`: {reason}")]
    BadQuantity { text: String, reason: &'static str },
    #[error("node name `{0}` is used twice")]
    DuplicateName(String),
    #[error("node name `{0}` may not contain `,`, `:`, `=` or `+`")]
    BadName(String),
}

/// Parses `--nodes`: nodes separated by commas, each `[NAME=]DEVICE[+DEVICE…]`,
/// a device being `[Nx ]KIND` with KIND a catalog name (`rtx4090`, `m2-max-64gb`) or
/// `MEMORY@BANDWIDTH` (`64GiB@50GB/s`). `2x rtx4090` is one machine with two cards.
/// Unnamed nodes take the name of their first device, numbered when repeated.
pub fn parse_nodes(
    spec: &str,
    limits: MemoryLimits,
    link_latency: f64,
) -> Result<Vec<NodeSpec>, NodeSpecError> {
    let parts: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(NodeSpecError::Empty);
    }
    let mut nodes: Vec<NodeSpec> = Vec::new();
    let mut explicit: Vec<Option<String>> = Vec::new();
    for part in parts {
        let (name, devices_text) = match part.split_once('=') {
            Some((name, rest)) => (Some(name.trim().to_string()), rest),
            None => (None, part),
        };
        let mut devices = Vec::new();
        for device in devices_text
            .split('+')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            let (count, kind) = split_count(device)?;
            let parsed = parse_device(kind, limits)?;
            devices.extend(std::iter::repeat_n(parsed, count));
        }
        if devices.is_empty() {
            return Err(NodeSpecError::NoDevices(part.to_string()));
        }
        explicit.push(name.clone());
        nodes.push(NodeSpec {
            name: name.unwrap_or_default(),
            devices,
            link_latency,
        });
    }
    for name in explicit.iter().flatten() {
        if name.is_empty() || name.contains([',', ':', '=', '+']) {
            return Err(NodeSpecError::BadName(name.clone()));
        }
        if explicit.iter().flatten().filter(|n| *n == name).count() > 1 {
            return Err(NodeSpecError::DuplicateName(name.clone()));
        }
    }
    // Default names after the explicit ones are known, so they never collide.
    let mut taken: Vec<String> = explicit.iter().flatten().cloned().collect();
    for (node, name) in nodes.iter_mut().zip(&explicit) {
        if name.is_none() {
            let base = node.devices[0].name.replace('@', "-").replace('/', "");
            let mut candidate = base.clone();
            let mut n = 2;
            while taken.contains(&candidate) {
                candidate = format!("{base}-{n}");
                n += 1;
            }
            taken.push(candidate.clone());
            node.name = candidate;
        }
    }
    Ok(nodes)
}

/// `2x rtx4090`, `2xrtx4090` or `rtx4090` → (count, kind).
fn split_count(device: &str) -> Result<(usize, &str), NodeSpecError> {
    let digits = device.len()
        - device
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .len();
    let rest = &device[digits..];
    if digits > 0 {
        if let Some(kind) = rest.strip_prefix(['x', 'X', '×']) {
            let count: usize =
                device[..digits]
                    .parse()
                    .map_err(|_| NodeSpecError::BadQuantity {
                        text: device.to_string(),
                        reason: "the device count is too large",
                    })?;
            if count == 0 {
                return Err(NodeSpecError::ZeroCount(device.to_string()));
            }
            return Ok((count, kind.trim()));
        }
    }
    Ok((1, device))
}

fn parse_device(kind: &str, limits: MemoryLimits) -> Result<DeviceSpec, NodeSpecError> {
    if let Some((memory, bandwidth)) = kind.split_once('@') {
        let memory = parse_bytes(memory)?;
        let bandwidth = parse_bandwidth(bandwidth)?;
        return Ok(DeviceSpec {
            name: kind.to_string(),
            memory: limits.offered(memory, 0),
            bandwidth,
        });
    }
    let model = catalog::device(kind).ok_or_else(|| NodeSpecError::UnknownDevice {
        name: kind.to_string(),
        known: known_devices(),
    })?;
    Ok(DeviceSpec {
        name: model.name.clone(),
        memory: limits.offered(model.memory, model.default_reserve),
        bandwidth: model.bandwidth,
    })
}

/// Catalog devices, Apple chips once each rather than once per memory size.
fn known_devices() -> String {
    let mut names: Vec<String> = Vec::new();
    for d in catalog::devices() {
        let short = match d.name.rsplit_once('-') {
            Some((chip, size)) if size.ends_with("gb") && d.default_reserve > 0 => {
                format!("{chip}-<GB>gb")
            }
            _ => d.name.clone(),
        };
        if !names.contains(&short) {
            names.push(short);
        }
    }
    names.join(", ")
}

impl From<QuantityError> for NodeSpecError {
    fn from(e: QuantityError) -> Self {
        Self::BadQuantity {
            text: e.text,
            reason: e.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn nodes_are_named_after_their_devices() {
        let nodes = parse_nodes(
            "rtx3070, rtx3090,2x rtx4090, rtx3090",
            MemoryLimits::default(),
            1e-3,
        )
        .unwrap();
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["rtx3070", "rtx3090", "rtx4090", "rtx3090-2"]);
        assert_eq!(nodes[2].devices.len(), 2);
        assert_eq!(nodes[2].devices[1].memory, 24 * GIB);
        assert_eq!(nodes[0].link_latency, 1e-3);
    }

    #[test]
    fn named_nodes_custom_devices_and_limits() {
        let limits = MemoryLimits {
            max_memory: Some(20 * GIB),
            reserve: Some(2 * GIB),
        };
        let nodes = parse_nodes(
            "gaming-pc=rtx4090+rtx3070,rack=64GiB@50GB/s,m2-max-64gb",
            limits,
            0.0,
        )
        .unwrap();
        assert_eq!(nodes[0].name, "gaming-pc");
        assert_eq!(
            nodes[0].devices[0].memory,
            20 * GIB,
            "capped by --max-memory"
        );
        assert_eq!(
            nodes[0].devices[1].memory,
            6 * GIB,
            "8 GiB less the reserve"
        );
        assert_eq!(nodes[1].devices[0].bandwidth, 50e9);
        assert_eq!(nodes[1].devices[0].memory, 20 * GIB);
        assert_eq!(nodes[2].devices[0].memory, 20 * GIB);
        let apple = parse_nodes("m2-max-64gb", MemoryLimits::default(), 0.0).unwrap();
        assert_eq!(
            apple[0].devices[0].memory,
            48 * GIB,
            "a quarter of unified memory stays with macOS"
        );
    }

    #[test]
    fn bad_node_lists_are_refused() {
        let parse = |s| {
            parse_nodes(s, MemoryLimits::default(), 0.0)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(parse(" , "), "no nodes given");
        assert!(
            parse("rtx9999").starts_with("unknown device `rtx9999` (known: rtx3070"),
            "{}",
            parse("rtx9999")
        );
        assert_eq!(
            parse("0x rtx4090"),
            "`0x rtx4090`: a device count must be at least 1"
        );
        assert_eq!(parse("a=rtx4090,a=rtx3090"), "node name `a` is used twice");
        assert_eq!(
            parse("a:b=rtx4090"),
            "node name `a:b` may not contain `,`, `:`, `=` or `+`"
        );
        assert!(parse("12QB@5GB/s").contains("unknown unit"));
        assert!(parse("12GB@5GB").contains("needs a unit"));
        assert_eq!(parse("x="), "node `x=` has no devices");
    }
}
