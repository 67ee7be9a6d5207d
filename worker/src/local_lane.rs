//! Local lanes: a stage's messages to a worker on the same machine over a Unix
//! socket, written by the sending stage's compute thread and read by a thread of
//! the receiving worker, past both workers' tokio runtimes and HTTP/2.
//!
//! Why: with every worker of a pipeline on one machine, a token's decode step was
//! spent mostly in its hops, not its layers. A `perf sched` trace of three workers
//! on two cores (2026-12-05) showed each stage computing as fast as one process
//! does, and each gRPC hop taking ~160 µs: the sender's runtime thread woken to
//! encode and write, the receiver's woken to read and decode, then the stage
//! thread. A lane is one write and one read between the two stage threads.
//!
//! The coordinator, where it runs on the worker's machine, takes the worker's events
//! (tokens, errors) over a lane too, in place of the Events stream's.
//!
//! Who may use a lane: the socket lies in a folder only this user can enter (see
//! [`strata_platform::local_socket`]), so a peer is a process of the worker's own
//! user, which could read the worker's key files anyway. The receiver then applies to every message the checks
//! a gRPC Forward call gets (the sender must be the stage before it in the
//! pipeline, and not revoked), with the node the sender names in its greeting. The
//! sender checks that the socket answers as the node the coordinator named (in a
//! cluster under mutual TLS; an `--insecure` one names no nodes and checks none).
//!
//! Linux only; elsewhere, and whenever a lane cannot be opened or breaks, messages
//! go over gRPC as before.

use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use prost::Message as _;
use strata_platform::local_socket::{self, LocalSocketFile, LocalStream};
use strata_proto::local_lane::{self, LaneGreeting, MAX_LANE_GREETING_BYTES};
use strata_proto::v1::StageMessage;
use strata_proto::{NodeId, MAX_MESSAGE_BYTES};

/// Where the receiving worker delivers what comes over its lanes.
pub trait LaneInbox: Send + Sync {
    /// Delivers `message` of `pipeline` from worker `sender`; an error closes the
    /// lane (the sender then goes over gRPC, where it hears the same refusal).
    fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String>;

    /// Sends this worker's events (but heartbeats) over `lane` from now on.
    fn send_events(&self, lane: LocalStream);
}

/// The sending end of a lane of frames, held by the sending stage's compute thread.
pub struct Lane {
    stream: LocalStream,
    /// Reused for every message: length prefix and encoding.
    buffer: Vec<u8>,
}

impl Lane {
    /// Opens a lane to the worker at `address` if it serves one on this machine and
    /// answers as `expected` (any node where `None`); `sender` is this worker,
    /// `pipeline` the pipeline the messages belong to. `None` means: use gRPC.
    pub fn open(address: &str, expected: Option<&NodeId>, sender: &NodeId, pipeline: u64) -> Option<Self> {
        match local_lane::open(address, &LaneGreeting::Frames { pipeline, sender: sender.clone() }, expected) {
            Ok(Some(stream)) => {
                tracing::info!(%address, "frames to this peer go over a local lane");
                Some(Self { stream, buffer: Vec::new() })
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%address, error = %e, "a local lane was given up; using gRPC");
                None
            }
        }
    }

    /// Writes `message`; returns its encoded size.
    pub fn send(&mut self, message: &StageMessage) -> io::Result<usize> {
        self.stream.write_encoded(&mut self.buffer, |buffer| message.encode(buffer).map_err(io::Error::other))
    }
}

/// A worker's lane socket, served while this lives; dropping it removes the socket
/// (threads reading lanes already open end when their senders close them).
pub struct Listener {
    _socket: LocalSocketFile,
}

impl Listener {
    /// Serves lanes for the worker `node` at `address`, delivering to `inbox` for
    /// as long as it lives. `None` (logged) where lanes cannot be served.
    pub fn open(address: &str, node: NodeId, inbox: Weak<dyn LaneInbox>) -> Option<Self> {
        let (acceptor, socket) = match local_socket::bind(address) {
            Ok(served) => served,
            Err(e) => {
                tracing::info!(error = %e, "local lanes are not served; peers use gRPC");
                return None;
            }
        };
        let node = Arc::new(node);
        let spawned = std::thread::Builder::new().name("lane-accept".into()).spawn(move || loop {
            let accepted = acceptor.accept();
            if inbox.strong_count() == 0 {
                return;
            }
            let Ok(stream) = accepted else {
                // Out of descriptors, say: not a loop that takes a core meanwhile.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let (inbox, node) = (inbox.clone(), node.clone());
            let _ = std::thread::Builder::new().name("lane-read".into()).spawn(move || {
                if let Err(e) = serve_lane(stream, &node, &inbox) {
                    tracing::warn!(error = %e, "a local lane closed");
                }
            });
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot serve local lanes; peers use gRPC");
            return None;
        }
        Some(Self { _socket: socket })
    }
}

/// Answers a lane's greeting; then delivers its messages until it closes, or hands
/// it to the events.
fn serve_lane(mut stream: LocalStream, node: &NodeId, inbox: &Weak<dyn LaneInbox>) -> io::Result<()> {
    let mut buffer = Vec::new();
    if !stream.read_record(&mut buffer, MAX_LANE_GREETING_BYTES)? {
        return Ok(());
    }
    let greeting = LaneGreeting::decode(&buffer).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    stream.write_record(node.as_str().as_bytes())?;
    let (pipeline, sender) = match greeting {
        LaneGreeting::Frames { pipeline, sender } => (pipeline, sender),
        LaneGreeting::Events => {
            if let Some(inbox) = inbox.upgrade() {
                inbox.send_events(stream);
            }
            return Ok(());
        }
    };
    while stream.read_record(&mut buffer, MAX_MESSAGE_BYTES)? {
        let message =
            StageMessage::decode(buffer.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let Some(inbox) = inbox.upgrade() else { return Ok(()) };
        inbox.deliver(pipeline, &sender, message).map_err(io::Error::other)?;
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};

    use strata_proto::v1::{stage_message, ActivationFrame};

    use super::*;

    #[derive(Default)]
    struct Inbox {
        got: Mutex<Vec<(u64, String, u64)>>,
        arrived: Condvar,
        events: Mutex<Option<LocalStream>>,
    }

    impl LaneInbox for Inbox {
        fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String> {
            let Some(stage_message::Kind::Frame(frame)) = message.kind else { return Err("not a frame".into()) };
            self.got.lock().unwrap().push((pipeline, sender.to_string(), frame.seq_id));
            self.arrived.notify_all();
            Ok(())
        }

        fn send_events(&self, lane: LocalStream) {
            *self.events.lock().unwrap() = Some(lane);
            self.arrived.notify_all();
        }
    }

    fn frame(seq_id: u64) -> StageMessage {
        StageMessage { kind: Some(stage_message::Kind::Frame(ActivationFrame { seq_id, ..Default::default() })) }
    }

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn serve(address: &str, inbox: &Arc<Inbox>) -> Listener {
        let inbox: Weak<dyn LaneInbox> = Arc::downgrade(inbox) as Weak<dyn LaneInbox>;
        Listener::open(address, node("receiver"), inbox).expect("lanes are served here")
    }

    #[test]
    fn messages_arrive_in_order_with_the_pipeline_and_sender_and_a_wrong_node_gets_no_lane() {
        let address = format!("127.0.0.1:lane-order-{}", std::process::id());
        let inbox = Arc::new(Inbox::default());
        let _listener = serve(&address, &inbox);
        assert!(Lane::open(&address, Some(&node("someone-else")), &node("sender"), 7).is_none());
        let mut lane = Lane::open(&address, Some(&node("receiver")), &node("sender"), 7).expect("a lane opens");
        for seq in 0..3 {
            assert!(lane.send(&frame(seq)).unwrap() > 0);
        }
        let got = inbox.arrived.wait_while(inbox.got.lock().unwrap(), |got| got.len() < 3).unwrap();
        assert_eq!(*got, (0..3).map(|seq| (7, "sender".to_string(), seq)).collect::<Vec<_>>());
    }

    #[test]
    fn a_refused_message_closes_the_lane_and_a_dropped_listener_takes_its_socket_away() {
        let address = format!("127.0.0.1:lane-refusal-{}", std::process::id());
        let inbox = Arc::new(Inbox::default());
        let listener = serve(&address, &inbox);
        let mut lane = Lane::open(&address, None, &node("sender"), 1).expect("a lane opens");
        lane.send(&StageMessage { kind: None }).unwrap();
        // The receiver refuses it and closes its end: the sender reads the end.
        assert!(!lane.stream.read_record(&mut Vec::new(), 1).unwrap());
        assert!(inbox.got.lock().unwrap().is_empty());
        drop(listener);
        assert!(Lane::open(&address, None, &node("sender"), 1).is_none());
    }

    #[test]
    fn an_events_lane_is_answered_then_handed_to_the_events() {
        let address = format!("127.0.0.1:lane-events-{}", std::process::id());
        let inbox = Arc::new(Inbox::default());
        let _listener = serve(&address, &inbox);
        assert!(local_lane::open(&address, &LaneGreeting::Events, Some(&node("someone-else"))).is_err());
        // The worker handed that one over before the opener turned it down.
        inbox.arrived.wait_while(inbox.events.lock().unwrap(), |e| e.is_none()).unwrap().take();
        let mut lane =
            local_lane::open(&address, &LaneGreeting::Events, Some(&node("receiver"))).unwrap().expect("a lane");
        let mut events = inbox.arrived.wait_while(inbox.events.lock().unwrap(), |e| e.is_none()).unwrap();
        events.as_mut().unwrap().write_record(b"an event").unwrap();
        let mut got = Vec::new();
        assert!(lane.read_record(&mut got, 64).unwrap());
        assert_eq!(got, b"an event");
    }
}
