//! Opening a local lane to a worker on this machine (a socket of
//! [`strata_platform::local_socket`]; what lanes are for: the worker's
//! `local_lane`). The first record says what the opener wants of the worker, which
//! answers with its node id; then records are protobuf messages, one way.

use std::time::Duration;

use strata_platform::local_socket::{self, LocalStream};

use crate::NodeId;

/// How long opening a lane waits for the worker's answer.
const GREETING_TIMEOUT: Duration = Duration::from_secs(2);

/// Opens a lane to the worker at `address` and greets it with `greeting`, if that
/// worker serves lanes on this machine (`Ok(None)` where none does) and answers as
/// `expected` (any node where `None`); `Err` says why an open lane was given up.
pub fn open(address: &str, greeting: &LaneGreeting, expected: Option<&NodeId>) -> Result<Option<LocalStream>, String> {
    let Some(mut lane) = local_socket::connect(address) else { return Ok(None) };
    let answer = lane.ask(&greeting.encode(), MAX_LANE_GREETING_BYTES, GREETING_TIMEOUT).map_err(|e| e.to_string())?;
    match expected {
        Some(node) if answer != node.as_str().as_bytes() => {
            Err(format!("it answered as {:?}, not as {node}", String::from_utf8_lossy(&answer)))
        }
        _ => Ok(Some(lane)),
    }
}

/// What a lane carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneGreeting {
    /// `StageMessage`s of `pipeline`, from the stage `sender` to the worker.
    Frames { pipeline: u64, sender: NodeId },
    /// The worker's `WorkerEvent`s (all but heartbeats), from the worker to its
    /// coordinator, in place of those on the Events stream.
    Events,
}

/// Largest greeting or answer: a kind, a pipeline id and a node id.
pub const MAX_LANE_GREETING_BYTES: usize = 1024;

const FRAMES: u8 = 1;
const EVENTS: u8 = 2;

impl LaneGreeting {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Frames { pipeline, sender } => {
                let mut bytes = vec![FRAMES];
                bytes.extend_from_slice(&pipeline.to_le_bytes());
                bytes.extend_from_slice(sender.as_str().as_bytes());
                bytes
            }
            Self::Events => vec![EVENTS],
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&FRAMES, rest)) => {
                let (pipeline, sender) = rest.split_at_checked(8).ok_or("a short greeting")?;
                let pipeline = u64::from_le_bytes(pipeline.try_into().map_err(|_| "a short greeting")?);
                let sender =
                    std::str::from_utf8(sender).ok().and_then(NodeId::new).ok_or("the greeting names no node")?;
                Ok(Self::Frames { pipeline, sender })
            }
            Some((&EVENTS, [])) => Ok(Self::Events),
            Some((&EVENTS, _)) => Err("an events greeting with more after it".into()),
            Some((kind, _)) => Err(format!("a greeting of unknown kind {kind}")),
            None => Err("an empty greeting".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_round_trip_and_bad_ones_are_named() {
        let frames = LaneGreeting::Frames { pipeline: 7, sender: NodeId::new("stage-0").unwrap() };
        for greeting in [frames, LaneGreeting::Events] {
            assert_eq!(LaneGreeting::decode(&greeting.encode()), Ok(greeting));
        }
        assert_eq!(LaneGreeting::decode(&[1, 0, 0]), Err("a short greeting".into()));
        assert_eq!(LaneGreeting::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), Err("the greeting names no node".into()));
        assert_eq!(LaneGreeting::decode(&[9]), Err("a greeting of unknown kind 9".into()));
        assert_eq!(LaneGreeting::decode(&[2, 0]), Err("an events greeting with more after it".into()));
        assert_eq!(LaneGreeting::decode(&[]), Err("an empty greeting".into()));
    }
}
