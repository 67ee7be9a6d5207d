//! Local lanes: a stage's messages to a worker on the same machine over a Unix
//! socket, written by the sending stage's compute thread and read by a thread of
//! the receiving worker, past both workers' tokio runtimes and HTTP/2. Once the
//! receiving stage is loaded, that thread hands the lane to the stage's compute
//! thread, which reads it itself from then on (see [`crate::inbox`]).
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
use strata_proto::NodeId;
use tokio::sync::mpsc;

use crate::inbox::{read_message, Admission, InLane, Inbound, LaneSource};

/// Where the receiving worker delivers what comes over its lanes.
pub trait LaneInbox: Send + Sync {
    /// Delivers `message` of `pipeline` from worker `sender`; an error closes the
    /// lane (the sender then goes over gRPC, where it hears the same refusal).
    fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String>;

    /// The queue of the stage that takes `pipeline`'s messages from `sender` now,
    /// where one is loaded and would: its compute thread can read the lane itself
    /// (see [`crate::inbox`]). `None` keeps the lane on its reader thread.
    fn reader_for(&self, _pipeline: u64, _sender: &NodeId) -> Option<mpsc::Sender<Inbound>> {
        None
    }

    /// As [`LaneInbox::deliver`], but a message bound for the queue `own` is handed
    /// back (`Take`) instead of queued there: its compute thread read it.
    fn take_or_deliver(
        &self,
        pipeline: u64,
        sender: &NodeId,
        message: StageMessage,
        _own: &mpsc::WeakSender<Inbound>,
    ) -> Result<Admission, String> {
        self.deliver(pipeline, sender, message).map(|()| Admission::Done)
    }

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
    read_frames(stream, LaneOrigin { pipeline, sender, inbox: inbox.clone() })
}

/// Delivers a lane's messages on this thread until its stage's compute thread
/// takes the lane over, or it closes.
fn read_frames(mut stream: LocalStream, lane: LaneOrigin) -> io::Result<()> {
    let mut buffer = Vec::new();
    loop {
        // Tried before each message: the stage may load after the lane opened.
        stream = match lane.hand_over(stream) {
            Ok(()) => return Ok(()),
            Err(stream) => stream,
        };
        let Some(message) = read_message(&mut stream, &mut buffer)? else { return Ok(()) };
        let Some(inbox) = lane.inbox.upgrade() else { return Ok(()) };
        inbox.deliver(lane.pipeline, &lane.sender, message).map_err(io::Error::other)?;
    }
}

/// A lane of frames: whose, and the worker it delivers to.
#[derive(Clone)]
struct LaneOrigin {
    pipeline: u64,
    sender: NodeId,
    inbox: Weak<dyn LaneInbox>,
}

impl LaneOrigin {
    /// Hands `stream` to the compute thread of the stage it feeds, behind what was
    /// queued for it already; gives it back where there is none.
    fn hand_over(&self, stream: LocalStream) -> Result<(), LocalStream> {
        let Some(queue) = self.inbox.upgrade().and_then(|inbox| inbox.reader_for(self.pipeline, &self.sender)) else {
            return Err(stream);
        };
        // A full or closed queue keeps the lane here.
        let Ok(permit) = queue.try_reserve() else { return Err(stream) };
        let source = StageLane { origin: self.clone(), own: queue.downgrade() };
        permit.send(Inbound::Lane(InLane::new(stream, Box::new(source))));
        Ok(())
    }
}

/// A lane its stage's compute thread reads: `own` is that stage's queue.
struct StageLane {
    origin: LaneOrigin,
    own: mpsc::WeakSender<Inbound>,
}

impl LaneSource for StageLane {
    fn admit(&mut self, message: StageMessage) -> Result<Admission, String> {
        let LaneOrigin { pipeline, sender, inbox } = &self.origin;
        let inbox = inbox.upgrade().ok_or("the worker stopped")?;
        inbox.take_or_deliver(*pipeline, sender, message, &self.own)
    }

    fn give_back(self: Box<Self>, stream: LocalStream) {
        let origin = self.origin;
        let spawned = std::thread::Builder::new().name("lane-read".into()).spawn(move || {
            if let Err(e) = read_frames(stream, origin) {
                tracing::warn!(error = %e, "a local lane closed");
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "a local lane given back found no thread to read it; it closes");
        }
    }
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

    /// Delivers into `got` until `queue` is set; then the lane is handed to it.
    #[derive(Default)]
    struct HandingInbox {
        got: Mutex<Vec<u64>>,
        arrived: Condvar,
        queue: Mutex<Option<mpsc::Sender<Inbound>>>,
    }

    impl LaneInbox for HandingInbox {
        fn deliver(&self, _: u64, _: &NodeId, message: StageMessage) -> Result<(), String> {
            let Some(stage_message::Kind::Frame(frame)) = message.kind else { return Err("not a frame".into()) };
            self.got.lock().unwrap().push(frame.seq_id);
            self.arrived.notify_all();
            Ok(())
        }

        fn send_events(&self, _: LocalStream) {}

        fn reader_for(&self, _: u64, _: &NodeId) -> Option<mpsc::Sender<Inbound>> {
            self.queue.lock().unwrap().clone()
        }

        fn take_or_deliver(
            &self,
            _: u64,
            _: &NodeId,
            message: StageMessage,
            _: &mpsc::WeakSender<Inbound>,
        ) -> Result<Admission, String> {
            Ok(Admission::Take(message))
        }
    }

    #[test]
    fn a_lane_is_handed_to_its_stage_once_there_is_one_and_read_there_in_order() {
        let address = format!("127.0.0.1:lane-hand-over-{}", std::process::id());
        let inbox = Arc::new(HandingInbox::default());
        let _listener = Listener::open(&address, node("receiver"), Arc::downgrade(&inbox) as Weak<dyn LaneInbox>)
            .expect("lanes are served here");
        let mut lane = Lane::open(&address, None, &node("sender"), 7).expect("a lane opens");
        lane.send(&frame(1)).unwrap();
        drop(inbox.arrived.wait_while(inbox.got.lock().unwrap(), |got| got.is_empty()).unwrap());
        // The stage loads: the reader hands the lane over before the next message.
        let (tx, rx) = mpsc::channel(16);
        *inbox.queue.lock().unwrap() = Some(tx);
        lane.send(&frame(2)).unwrap();
        lane.send(&frame(3)).unwrap();
        let mut stage = crate::inbox::Inbox::new(rx).unwrap();
        let mut seqs = Vec::new();
        while seqs.last() != Some(&3) {
            let queued = stage.recv_within(Some(Duration::from_secs(30)), None).flatten().expect("a message comes");
            let Some(stage_message::Kind::Frame(f)) = queued.message.kind else { panic!("not a frame") };
            seqs.push(f.seq_id);
        }
        let delivered = inbox.got.lock().unwrap().clone();
        // Frame 2 may have been read by the thread before the hand-over; either way
        // each came once, in order.
        let all: Vec<u64> = delivered.iter().chain(&seqs).copied().collect();
        assert_eq!(all, [1, 2, 3]);
        assert_eq!(seqs.last(), Some(&3), "the stage read the lane itself");
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
