//! A stage's incoming messages: its queue, which every way in feeds (gRPC calls,
//! the threads that read local lanes, the coordinator's controls), and the local
//! lanes its compute thread reads itself once their reader thread hands them over.
//!
//! Why the compute thread reads lanes itself: with a reader thread between them, a
//! frame's hand-over woke the reader, which decoded it and woke the compute thread
//! (and the resting pool). On a 2-core VM with three workers, timestamps at each
//! step (2026-12-06) put a hand-over, from one stage's forward to the next one's,
//! at ~125 µs, ~85 of them from the sender's write to the compute thread running:
//! the reader's wake ~30, its decode and deliver ~25, the compute thread's wake
//! ~30. Waiting on the lane's socket, the compute thread (and its pool, which
//! watches the same sockets) is woken by the sender's write itself.
//!
//! A lane is handed over once the stage it feeds is loaded and would take its
//! sender's frames (the check a message gets); every message read from it after
//! that gets the whole admission again, on this thread (see [`LaneSource`]).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use prost::Message as _;
use strata_model::pool_rest::{PoolBell, Rest};
use strata_platform::doorbell::Doorbell;
use strata_platform::local_socket::{LocalStream, Watch};
use strata_proto::v1::StageMessage;
use strata_proto::MAX_MESSAGE_BYTES;
use tokio::sync::mpsc;

use crate::compute::Queued;

/// What goes into a stage's queue.
pub enum Inbound {
    Message(Queued),
    /// A lane whose messages the compute thread reads from now on.
    Lane(InLane),
}

impl From<StageMessage> for Inbound {
    fn from(message: StageMessage) -> Self {
        Self::Message(message.into())
    }
}

impl From<Queued> for Inbound {
    fn from(queued: Queued) -> Self {
        Self::Message(queued)
    }
}

/// What becomes of a message read from a handed-over lane.
pub enum Admission {
    /// This stage takes it.
    Take(StageMessage),
    /// It went elsewhere, or was answered with an error event.
    Done,
}

/// Where a handed-over lane came from (see [`crate::local_lane`]).
pub trait LaneSource: Send {
    /// The check every message of the lane gets before it is taken (what its
    /// reader thread did before delivering it); an error closes the lane.
    fn admit(&mut self, message: StageMessage) -> Result<Admission, String>;

    /// The compute thread is done with the lane while it is open (the stage
    /// stops): what comes later is read as before, by a thread of its own, so that
    /// nothing sent is dropped unanswered.
    fn give_back(self: Box<Self>, stream: LocalStream);
}

/// Reads the next message of a lane into `buffer` and decodes it; `None` at the
/// lane's clean end. Its reader thread and, once it has the lane, the stage's
/// compute thread both read with it.
pub(crate) fn read_message(stream: &mut LocalStream, buffer: &mut Vec<u8>) -> io::Result<Option<StageMessage>> {
    if !stream.read_record(buffer, MAX_MESSAGE_BYTES)? {
        return Ok(None);
    }
    let message = StageMessage::decode(buffer.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(message))
}

/// A local lane handed to a compute thread.
pub struct InLane {
    stream: LocalStream,
    source: Box<dyn LaneSource>,
}

impl InLane {
    pub fn new(stream: LocalStream, source: Box<dyn LaneSource>) -> Self {
        Self { stream, source }
    }

    pub fn into_parts(self) -> (LocalStream, Box<dyn LaneSource>) {
        (self.stream, self.source)
    }
}

pub struct Inbox {
    rx: mpsc::Receiver<Inbound>,
    lanes: Vec<InLane>,
    /// Rung by the queue's waker while this thread waits.
    doorbell: Arc<Doorbell>,
    /// What a resting pool sleeps on while lanes are watched (see [`Inbox::pool_rest`]).
    pool_doorbell: Arc<Doorbell>,
    buffer: Vec<u8>,
}

impl Inbox {
    pub fn new(rx: mpsc::Receiver<Inbound>) -> std::io::Result<Self> {
        Ok(Self {
            rx,
            lanes: Vec::new(),
            doorbell: Arc::new(Doorbell::new()?),
            pool_doorbell: Arc::new(Doorbell::new()?),
            buffer: Vec::new(),
        })
    }

    /// Refuses what is sent to the queue from now on; what it holds can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// A message that is here already, from the queue first.
    pub fn try_recv(&mut self) -> Option<Queued> {
        while let Ok(inbound) = self.rx.try_recv() {
            match inbound {
                Inbound::Message(queued) => return Some(queued),
                Inbound::Lane(lane) => self.lanes.push(lane),
            }
        }
        self.read_lanes()
    }

    /// The next message if one comes within `limit` (forever where `None`):
    /// `Some(None)` once the queue is closed, `None` if none came. The queue's
    /// sender also rings `pool_bell`, so a resting pool wakes beside this thread
    /// (see [`strata_model::pool_rest`]); a resting pool from [`Inbox::pool_rest`]
    /// wakes on the lanes' writes itself. It waits on a doorbell rather than the
    /// runtime's timer: the runtime's own thread may be the one waiting for the
    /// pool meanwhile.
    pub fn recv_within(&mut self, limit: Option<Duration>, pool_bell: Option<&PoolBell>) -> Option<Option<Queued>> {
        self.send_then_recv_within(limit, pool_bell, || {})
    }

    /// As [`Inbox::recv_within`], running `send` first: just before this thread
    /// first sleeps, or before it returns if it need not. Why then: what `send`
    /// writes wakes the next stage, which takes this core at once (its thread is
    /// pinned to the same one), and whatever this thread had left to do ran only
    /// when that stage's turn was over, in the middle of its forward (a scheduler
    /// trace of three workers on two cores, 2026-12-06). Sent last, what is left is
    /// the call that sleeps.
    pub fn send_then_recv_within(
        &mut self,
        limit: Option<Duration>,
        pool_bell: Option<&PoolBell>,
        send: impl FnOnce(),
    ) -> Option<Option<Queued>> {
        let mut send = Some(send);
        let received = self.receive(limit, pool_bell, &mut send);
        if let Some(send) = send {
            send();
        }
        received
    }

    fn receive(
        &mut self,
        limit: Option<Duration>,
        pool_bell: Option<&PoolBell>,
        send: &mut Option<impl FnOnce()>,
    ) -> Option<Option<Queued>> {
        let deadline = limit.map(|limit| Instant::now() + limit);
        let waker = Waker::from(Arc::new(Ring { doorbell: self.doorbell.clone(), pool: pool_bell.cloned() }));
        let mut context = Context::from_waker(&waker);
        loop {
            // Cleared before looking, so a message that comes after the look rings
            // (and one that comes on a lane ends the wait by itself).
            self.doorbell.clear();
            loop {
                match self.rx.poll_recv(&mut context) {
                    Poll::Ready(Some(Inbound::Message(queued))) => return Some(Some(queued)),
                    Poll::Ready(Some(Inbound::Lane(lane))) => self.lanes.push(lane),
                    Poll::Ready(None) => return Some(None),
                    Poll::Pending => break,
                }
            }
            if let Some(queued) = self.read_lanes() {
                return Some(Some(queued));
            }
            let left = match deadline {
                Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return None,
                },
                None => None,
            };
            let watched = self.watched();
            if let Some(send) = send.take() {
                send();
            }
            if let Err(e) = self.doorbell.wait(&watched, left) {
                // Not expected (the descriptors are ours); a short nap keeps the
                // loop from taking a core meanwhile.
                tracing::warn!(error = %e, "waiting for messages failed");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// What a resting pool sleeps on while this thread waits: with lanes, a
    /// doorbell that a write on any of them also ends, so the pool wakes with this
    /// thread; with none, `None` (the pool's own rest is as good).
    pub fn pool_rest(&self) -> Option<Box<dyn Rest>> {
        if self.lanes.is_empty() {
            return None;
        }
        // Cleared only here, just before a rest on it, whose end rings it again.
        self.pool_doorbell.clear();
        Some(Box::new(LaneRest {
            doorbell: self.pool_doorbell.clone(),
            watched: self.watched(),
            woken: AtomicBool::new(false),
        }))
    }

    fn watched(&self) -> Vec<Watch> {
        self.lanes.iter().map(|lane| lane.stream.watch()).collect()
    }

    /// The first message waiting on a lane. A lane that ends, breaks or sends what
    /// its admission refuses is closed (its sender turns to gRPC, as it does when a
    /// reader thread closes it).
    // Without local streams (not Linux) there is no lane, and the code that takes
    // one apart cannot run.
    #[cfg_attr(not(target_os = "linux"), allow(unreachable_code, unused_variables))]
    fn read_lanes(&mut self) -> Option<Queued> {
        let mut i = 0;
        while i < self.lanes.len() {
            match self.read_lane(i) {
                Ok(Some(message)) => return Some(message.into()),
                Ok(None) => i += 1,
                Err(e) => {
                    if let Some(e) = e {
                        tracing::warn!(error = %e, "a local lane closed");
                    }
                    let lane = self.lanes.swap_remove(i);
                    lane.stream.close();
                }
            }
        }
        None
    }

    /// A message taken from lane `i`, if one is waiting there; `Err(None)` at its
    /// clean end.
    fn read_lane(&mut self, i: usize) -> Result<Option<StageMessage>, Option<String>> {
        let lane = &mut self.lanes[i];
        while lane.stream.has_input().map_err(|e| Some(e.to_string()))? {
            let Some(message) = read_message(&mut lane.stream, &mut self.buffer).map_err(|e| Some(e.to_string()))?
            else {
                return Err(None);
            };
            match lane.source.admit(message).map_err(Some)? {
                Admission::Take(message) => return Ok(Some(message)),
                Admission::Done => {}
            }
        }
        Ok(None)
    }
}

impl Drop for Inbox {
    // As in `read_lanes`: no lanes without local streams.
    #[cfg_attr(not(target_os = "linux"), allow(unreachable_code))]
    fn drop(&mut self) {
        for lane in self.lanes.drain(..) {
            let (stream, source) = lane.into_parts();
            source.give_back(stream);
        }
    }
}

/// The queue's waker while the compute thread waits.
struct Ring {
    doorbell: Arc<Doorbell>,
    pool: Option<PoolBell>,
}

impl Wake for Ring {
    fn wake(self: Arc<Self>) {
        self.doorbell.ring();
        if let Some(bell) = &self.pool {
            bell.ring();
        }
    }
}

/// A resting pool's sleep: until rung, or a write on one of the lanes.
struct LaneRest {
    doorbell: Arc<Doorbell>,
    watched: Vec<Watch>,
    /// Rung already: a pool thread that comes late (the doorbell may have been
    /// cleared for the next rest by then) does not sleep on it.
    woken: AtomicBool,
}

impl Rest for LaneRest {
    fn sleep(&self) {
        if self.woken.load(Ordering::Acquire) {
            return;
        }
        // One wait: whatever ended it, the compute thread's wait ends soon too (a
        // lane's message is read at once; a ring is its end).
        if let Err(e) = self.doorbell.wait(&self.watched, None) {
            tracing::debug!(error = %e, "a resting pool thread's wait failed");
        }
    }

    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.doorbell.ring();
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::sync::Mutex;

    use strata_platform::local_socket;
    use strata_proto::v1::{stage_message, ReleaseSequence};

    use super::*;

    fn release(seq_id: u64) -> StageMessage {
        StageMessage { kind: Some(stage_message::Kind::Release(ReleaseSequence { seq_id })) }
    }

    fn seq(queued: &Queued) -> Option<u64> {
        match &queued.message.kind {
            Some(stage_message::Kind::Release(r)) => Some(r.seq_id),
            _ => None,
        }
    }

    /// Takes every message but those of `refused`; records a lane given back.
    struct Source {
        refused: u64,
        given_back: Arc<Mutex<Option<LocalStream>>>,
    }

    impl LaneSource for Source {
        fn admit(&mut self, message: StageMessage) -> Result<Admission, String> {
            match &message.kind {
                Some(stage_message::Kind::Release(r)) if r.seq_id == self.refused => Err("refused".into()),
                _ => Ok(Admission::Take(message)),
            }
        }

        fn give_back(self: Box<Self>, stream: LocalStream) {
            *self.given_back.lock().unwrap() = Some(stream);
        }
    }

    /// A connected pair of local streams: (the writing end, the reading end).
    fn pair(name: &str) -> (LocalStream, LocalStream, local_socket::LocalSocketFile) {
        let address = format!("127.0.0.1:inbox-{name}-{}", std::process::id());
        let (acceptor, file) = local_socket::bind(&address).unwrap();
        let writer = local_socket::connect(&address).expect("the socket is found");
        (writer, acceptor.accept().unwrap(), file)
    }

    fn inbox() -> (mpsc::Sender<Inbound>, Inbox) {
        let (tx, rx) = mpsc::channel::<Inbound>(16);
        (tx, Inbox::new(rx).unwrap())
    }

    /// A lane's source that refuses sequence 9, and where it puts a lane given back.
    fn source() -> (Box<Source>, Arc<Mutex<Option<LocalStream>>>) {
        let given_back = Arc::new(Mutex::new(None));
        (Box::new(Source { refused: 9, given_back: given_back.clone() }), given_back)
    }

    fn write(lane: &mut LocalStream, message: &StageMessage) {
        lane.write_encoded(&mut Vec::new(), |b| message.encode(b).map_err(std::io::Error::other)).unwrap();
    }

    #[test]
    fn a_handed_over_lane_is_read_behind_the_queue_and_a_refusal_closes_it() {
        let (tx, mut inbox) = inbox();
        let (mut writer, reader, _file) = pair("order");
        let (source, given_back) = source();
        tx.try_send(release(1).into()).unwrap();
        tx.try_send(Inbound::Lane(InLane::new(reader, source))).unwrap();
        write(&mut writer, &release(2));
        let got = inbox.recv_within(Some(Duration::from_secs(30)), None).flatten();
        assert_eq!(got.as_ref().and_then(seq), Some(1), "the queue's message first");
        let got = inbox.recv_within(Some(Duration::from_secs(30)), None).flatten();
        assert_eq!(got.as_ref().and_then(seq), Some(2), "then the lane's");

        // A write ends a wait on the lane.
        let writing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            write(&mut writer, &release(3));
            writer
        });
        let got = inbox.recv_within(Some(Duration::from_secs(30)), None).flatten();
        assert_eq!(got.as_ref().and_then(seq), Some(3));
        let mut writer = writing.join().unwrap();

        // Refused: the lane closes (its writer reads the end) and nothing comes.
        write(&mut writer, &release(9));
        assert!(inbox.recv_within(Some(Duration::from_millis(50)), None).is_none());
        assert!(!writer.read_record(&mut Vec::new(), 16).unwrap(), "the refused lane was closed");
        drop(inbox);
        assert!(given_back.lock().unwrap().is_none(), "a closed lane is not given back");
    }

    #[test]
    fn an_open_lane_is_given_back_when_the_inbox_goes() {
        let (tx, mut inbox) = inbox();
        let (_writer, reader, _file) = pair("back");
        let (source, given_back) = source();
        tx.try_send(Inbound::Lane(InLane::new(reader, source))).unwrap();
        assert!(inbox.recv_within(Some(Duration::from_millis(10)), None).is_none());
        drop(inbox);
        assert!(given_back.lock().unwrap().is_some(), "the lane went back to be read on");
    }

    #[test]
    fn a_closed_queue_refuses_new_messages_and_still_gives_those_it_holds() {
        let (tx, mut inbox) = inbox();
        tx.try_send(release(1).into()).unwrap();
        inbox.close();
        assert!(tx.try_send(release(2).into()).is_err(), "refused once closed");
        assert_eq!(inbox.try_recv().as_ref().and_then(seq), Some(1));
        assert!(inbox.try_recv().is_none());
    }

    #[test]
    fn send_runs_once_whether_a_message_waits_or_not() {
        let (tx, mut inbox) = inbox();
        let mut sends = 0;
        assert!(inbox.send_then_recv_within(Some(Duration::from_millis(10)), None, || sends += 1).is_none());
        assert_eq!(sends, 1, "before it slept");
        tx.try_send(release(4).into()).unwrap();
        let got = inbox.send_then_recv_within(Some(Duration::from_secs(30)), None, || sends += 1).flatten();
        assert_eq!(got.as_ref().and_then(seq), Some(4));
        assert_eq!(sends, 2, "before it returned what was waiting");
        drop(tx);
        assert!(matches!(inbox.recv_within(None, None), Some(None)), "a closed queue ends the wait");
    }
}
