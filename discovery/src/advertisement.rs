//! What a worker says about itself in its mDNS TXT record, and the parsing of it.
//!
//! Every value is short: a TXT string (`key=value`) holds at most 255 bytes, and the
//! whole record should stay well inside one packet. Unknown keys are ignored, so a
//! later version may add some; a missing or malformed known key rejects the record.

use sha2::{Digest, Sha256};
use strata_proto::v1::{WorkerDescription, WorkerState};

/// Longest value we put in one TXT string; with the key and `=` it stays under 255.
pub const MAX_VALUE_BYTES: usize = 200;

const KEY_VERSION: &str = "v";
const KEY_NODE_ID: &str = "id";
const KEY_PORT: &str = "port";
const KEY_DEVICES: &str = "dev";
const KEY_DEVICE_NAMES: &str = "dnames";
const KEY_DEVICE_MEMORY: &str = "dmem";
const KEY_MEMORY: &str = "mem";
const KEY_SPEED: &str = "speed";
const KEY_STATE: &str = "state";
const KEY_CLUSTER: &str = "cluster";

/// A TXT record that is not a strata advertisement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxtError {
    #[error("the TXT record has no `{0}`")]
    Missing(&'static str),
    #[error("TXT `{key}={value}` is not valid")]
    Malformed { key: &'static str, value: String },
}

/// The tag of a cluster: the first 8 bytes of the SHA-256 of its name, in hex.
///
/// Workers and coordinators started with the same `--cluster NAME` find each other;
/// the name itself is never sent, so it says nothing to others on the network.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterTag(String);

impl ClusterTag {
    pub fn of(name: &str) -> Self {
        let digest = Sha256::digest(name.as_bytes());
        Self(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClusterTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a worker is doing, as advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Holding no shard; free to be planned.
    Idle,
    Loading,
    /// Holding a shard and serving it.
    Ready,
    /// Leaving: finishing what is in flight, taking nothing new.
    Draining,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Idle, Self::Loading, Self::Ready, Self::Draining].into_iter().find(|state| state.as_str() == s)
    }
}

impl From<WorkerState> for NodeState {
    /// An unspecified state (an older worker) is taken as idle.
    fn from(state: WorkerState) -> Self {
        match state {
            WorkerState::Unspecified | WorkerState::Idle => Self::Idle,
            WorkerState::Loading => Self::Loading,
            WorkerState::Serving => Self::Ready,
            WorkerState::Draining => Self::Draining,
        }
    }
}

/// A worker's compute devices, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceSummary {
    pub count: u32,
    /// As many names as fit in one TXT string; `count` may be larger.
    pub names: Vec<String>,
    /// Total memory of all devices, bytes.
    pub memory_bytes: u64,
}

/// Everything a worker advertises over mDNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub protocol_version: u32,
    pub node_id: String,
    /// The port of the worker's gRPC server (also the SRV record's port).
    pub grpc_port: u16,
    pub devices: DeviceSummary,
    pub memory_offered_bytes: u64,
    /// Memory bandwidth the worker measured, bytes per second (what bounds its
    /// decode speed); 0 when not measured.
    pub speed: u64,
    pub state: NodeState,
    pub cluster: ClusterTag,
}

impl Advertisement {
    /// The advertisement of a worker that describes itself as `description` and
    /// serves gRPC on `grpc_port`.
    pub fn from_description(description: &WorkerDescription, grpc_port: u16, cluster: &ClusterTag) -> Self {
        let devices = &description.devices;
        let state = WorkerState::try_from(description.state).unwrap_or(WorkerState::Unspecified);
        Self {
            protocol_version: description.protocol_version,
            node_id: description.node_id.clone(),
            grpc_port,
            devices: DeviceSummary {
                count: devices.len() as u32,
                names: devices.iter().map(|d| d.name.clone()).collect(),
                memory_bytes: devices.iter().map(|d| d.total_memory_bytes).sum(),
            },
            memory_offered_bytes: description.memory_offered_bytes,
            speed: devices.iter().map(|d| d.memory_bandwidth_bytes_per_second.max(0.0) as u64).sum(),
            state: state.into(),
            cluster: cluster.clone(),
        }
    }

    /// The TXT record, as `(key, value)` pairs; every pair fits in one TXT string.
    pub fn to_txt(&self) -> Vec<(&'static str, String)> {
        vec![
            (KEY_VERSION, self.protocol_version.to_string()),
            (KEY_NODE_ID, truncate(&self.node_id, MAX_VALUE_BYTES).to_string()),
            (KEY_PORT, self.grpc_port.to_string()),
            (KEY_DEVICES, self.devices.count.to_string()),
            (KEY_DEVICE_NAMES, join_names(&self.devices.names, MAX_VALUE_BYTES)),
            (KEY_DEVICE_MEMORY, self.devices.memory_bytes.to_string()),
            (KEY_MEMORY, self.memory_offered_bytes.to_string()),
            (KEY_SPEED, self.speed.to_string()),
            (KEY_STATE, self.state.as_str().to_string()),
            (KEY_CLUSTER, self.cluster.as_str().to_string()),
        ]
    }

    /// Parses a TXT record; `get` returns a key's value (`Some("")` for a key
    /// without one).
    pub fn from_txt<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Result<Self, TxtError> {
        let value = |key: &'static str| get(key).ok_or(TxtError::Missing(key));
        let number = |key: &'static str| -> Result<u64, TxtError> {
            let v = value(key)?;
            v.parse().map_err(|_| TxtError::Malformed { key, value: v.to_string() })
        };
        let malformed = |key: &'static str, v: &str| TxtError::Malformed { key, value: v.to_string() };
        let narrow = |key: &'static str, n: u64| -> Result<u32, TxtError> {
            u32::try_from(n).map_err(|_| malformed(key, &n.to_string()))
        };

        let node_id = value(KEY_NODE_ID)?;
        if node_id.is_empty() || node_id.len() > MAX_VALUE_BYTES {
            return Err(malformed(KEY_NODE_ID, node_id));
        }
        let port = number(KEY_PORT)?;
        let grpc_port =
            u16::try_from(port).ok().filter(|&p| p != 0).ok_or_else(|| malformed(KEY_PORT, &port.to_string()))?;
        let names = value(KEY_DEVICE_NAMES)?;
        let state = value(KEY_STATE)?;
        let cluster = value(KEY_CLUSTER)?;
        if cluster.len() != 16 || !cluster.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed(KEY_CLUSTER, cluster));
        }
        Ok(Self {
            protocol_version: narrow(KEY_VERSION, number(KEY_VERSION)?)?,
            node_id: node_id.to_string(),
            grpc_port,
            devices: DeviceSummary {
                count: narrow(KEY_DEVICES, number(KEY_DEVICES)?)?,
                names: names.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect(),
                memory_bytes: number(KEY_DEVICE_MEMORY)?,
            },
            memory_offered_bytes: number(KEY_MEMORY)?,
            speed: number(KEY_SPEED)?,
            state: NodeState::parse(state).ok_or_else(|| malformed(KEY_STATE, state))?,
            cluster: ClusterTag(cluster.to_ascii_lowercase()),
        })
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Names joined by commas, as many whole names as fit in `max` bytes (a first name
/// longer than that is cut). Commas inside a name become spaces.
fn join_names(names: &[String], max: usize) -> String {
    let mut out = String::new();
    for name in names {
        let name = name.replace(',', " ");
        let separator = usize::from(!out.is_empty());
        if out.len() + separator + name.len() > max {
            if out.is_empty() {
                out.push_str(truncate(&name, max));
            }
            break;
        }
        if separator == 1 {
            out.push(',');
        }
        out.push_str(&name);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use strata_proto::v1::{Device, DeviceKind};

    use super::*;

    fn sample() -> Advertisement {
        Advertisement {
            protocol_version: strata_proto::PROTOCOL_VERSION,
            node_id: "0123456789abcdef".into(),
            grpc_port: 7070,
            devices: DeviceSummary { count: 2, names: vec!["cuda:0".into(), "cuda:1".into()], memory_bytes: 48 << 30 },
            memory_offered_bytes: 40 << 30,
            speed: 900_000_000_000,
            state: NodeState::Ready,
            cluster: ClusterTag::of("strata"),
        }
    }

    fn as_map(txt: &[(&'static str, String)]) -> HashMap<String, String> {
        txt.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn parse(map: &HashMap<String, String>) -> Result<Advertisement, TxtError> {
        Advertisement::from_txt(|k| map.get(k).map(String::as_str))
    }

    #[test]
    fn an_advertisement_survives_its_txt_record() {
        let ad = sample();
        assert_eq!(parse(&as_map(&ad.to_txt())).unwrap(), ad);
        let idle = Advertisement { state: NodeState::Idle, speed: 0, devices: DeviceSummary::default(), ..ad };
        assert_eq!(parse(&as_map(&idle.to_txt())).unwrap(), idle);
    }

    #[test]
    fn every_txt_string_fits_in_255_bytes() {
        let mut ad = sample();
        ad.node_id = "n".repeat(1000);
        ad.devices.names = (0..64).map(|i| format!("NVIDIA GeForce RTX 4090 #{i}")).collect();
        ad.devices.count = 64;
        let txt = ad.to_txt();
        for (k, v) in &txt {
            assert!(k.len() + 1 + v.len() <= 255, "{k}: {} bytes", v.len());
        }
        let back = parse(&as_map(&txt)).unwrap();
        assert_eq!(back.devices.count, 64);
        // Whole names only, as many as fit.
        assert!(!back.devices.names.is_empty() && back.devices.names.len() < 64);
        assert_eq!(back.devices.names[..], ad.devices.names[..back.devices.names.len()]);
    }

    #[test]
    fn device_names_are_cut_sensibly() {
        assert_eq!(join_names(&["a,b".into(), "c".into()], 10), "a b,c");
        assert_eq!(join_names(&["abcdef".into(), "gh".into()], 8), "abcdef");
        assert_eq!(join_names(&["é".repeat(10)], 5), "éé");
        assert_eq!(join_names(&[], 5), "");
    }

    #[test]
    fn missing_or_malformed_fields_reject_the_record() {
        let good = as_map(&sample().to_txt());
        for key in [
            KEY_VERSION,
            KEY_NODE_ID,
            KEY_PORT,
            KEY_DEVICES,
            KEY_DEVICE_NAMES,
            KEY_DEVICE_MEMORY,
            KEY_MEMORY,
            KEY_SPEED,
            KEY_STATE,
            KEY_CLUSTER,
        ] {
            let mut map = good.clone();
            map.remove(key);
            assert_eq!(parse(&map), Err(TxtError::Missing(key)));
        }
        let bad = [
            (KEY_VERSION, "one"),
            (KEY_VERSION, "-1"),
            (KEY_VERSION, "4294967296"),
            (KEY_NODE_ID, ""),
            (KEY_PORT, "0"),
            (KEY_PORT, "65536"),
            (KEY_PORT, ""),
            (KEY_DEVICES, "x"),
            (KEY_DEVICE_MEMORY, "1e9"),
            (KEY_MEMORY, " 5"),
            (KEY_SPEED, "fast"),
            (KEY_STATE, "serving"),
            (KEY_CLUSTER, "strata"),
            (KEY_CLUSTER, "0123456789abcdeg"),
        ];
        for (key, value) in bad {
            let mut map = good.clone();
            map.insert(key.to_string(), value.to_string());
            assert_eq!(parse(&map), Err(TxtError::Malformed { key, value: value.to_string() }), "{key}={value}");
        }
        // Unknown keys are someone else's business.
        let mut map = good.clone();
        map.insert("future".into(), "whatever".into());
        assert!(parse(&map).is_ok());
    }

    #[test]
    fn the_cluster_tag_hides_the_name() {
        let tag = ClusterTag::of("strata");
        assert_eq!(tag.as_str().len(), 16);
        assert!(!tag.as_str().contains("strata"));
        assert_eq!(tag, ClusterTag::of("strata"));
        assert_ne!(tag, ClusterTag::of("lab"));
    }

    #[test]
    fn worker_states_map_to_advertised_states() {
        assert_eq!(NodeState::from(WorkerState::Serving), NodeState::Ready);
        assert_eq!(NodeState::from(WorkerState::Draining), NodeState::Draining);
        assert_eq!(NodeState::from(WorkerState::Loading), NodeState::Loading);
        assert_eq!(NodeState::from(WorkerState::Idle), NodeState::Idle);
        assert_eq!(NodeState::from(WorkerState::Unspecified), NodeState::Idle);
        for s in [NodeState::Idle, NodeState::Loading, NodeState::Ready, NodeState::Draining] {
            assert_eq!(NodeState::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn a_description_becomes_an_advertisement() {
        let device = |name: &str, memory: u64, bandwidth: f64| Device {
            kind: DeviceKind::Cuda as i32,
            name: name.into(),
            total_memory_bytes: memory,
            memory_bandwidth_bytes_per_second: bandwidth,
            ..Default::default()
        };
        let description = WorkerDescription {
            node_id: "abc".into(),
            protocol_version: 1,
            devices: vec![device("cuda:0", 8, 100.0), device("cuda:1", 16, 50.5)],
            memory_offered_bytes: 20,
            state: WorkerState::Draining as i32,
            ..Default::default()
        };
        let ad = Advertisement::from_description(&description, 9000, &ClusterTag::of("x"));
        assert_eq!(
            ad.devices,
            DeviceSummary { count: 2, names: vec!["cuda:0".into(), "cuda:1".into()], memory_bytes: 24 }
        );
        assert_eq!((ad.grpc_port, ad.memory_offered_bytes, ad.speed, ad.state), (9000, 20, 150, NodeState::Draining));
    }
}
