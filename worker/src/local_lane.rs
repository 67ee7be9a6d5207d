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
//! Who may use a lane: the socket lies in a folder only this user can enter (0700,
//! checked), so a peer is a process of the worker's own user, which could read the
//! worker's key files anyway. The receiver then applies to every message the checks
//! a gRPC Forward call gets (the sender must be the stage before it in the
//! pipeline, and not revoked), with the node the sender names in its greeting. The
//! sender checks that the socket answers as the node the coordinator named (in a
//! cluster under mutual TLS; an `--insecure` one names no nodes and checks none).
//!
//! Sockets are named after the worker's address and its network namespace, so
//! workers in different namespaces (the tests' hosts) never find each other's.
//! Linux only; elsewhere, and whenever a lane cannot be opened or breaks, messages
//! go over gRPC as before.

use strata_proto::v1::StageMessage;
use strata_proto::NodeId;

/// Where the receiving worker delivers what comes over its lanes.
pub trait LaneInbox: Send + Sync {
    /// Delivers `message` of `pipeline` from worker `sender`; an error closes the
    /// lane (the sender then goes over gRPC, where it hears the same refusal).
    fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String>;
}

#[cfg(target_os = "linux")]
pub use linux::{Lane, Listener};

#[cfg(not(target_os = "linux"))]
pub use elsewhere::{Lane, Listener};

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, Read as _, Write as _};
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Weak};
    use std::time::Duration;

    use prost::Message as _;
    use strata_proto::v1::StageMessage;
    use strata_proto::{NodeId, MAX_MESSAGE_BYTES};

    use super::LaneInbox;

    /// Largest greeting a lane accepts: a pipeline id and a node id.
    const MAX_GREETING_BYTES: usize = 1024;

    /// How long opening a lane waits for the receiver's answer.
    const GREETING_TIMEOUT: Duration = Duration::from_secs(2);

    /// This user's folder of lane sockets for this network namespace, made if
    /// missing; `None` when it cannot be made or is not this user's alone.
    fn folder() -> Option<PathBuf> {
        let uid = std::fs::metadata("/proc/self").ok()?.uid();
        let namespace = std::fs::read_link("/proc/self/ns/net").ok()?;
        let namespace: String = namespace.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
        let base = std::env::temp_dir().join(format!("strata-lanes-{uid}"));
        let folder = base.join(namespace);
        for dir in [&base, &folder] {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(_) => return None,
            }
            // Not followed if a link: someone else's folder must not pass for ours.
            let meta = std::fs::symlink_metadata(dir).ok()?;
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
                tracing::warn!(folder = %dir.display(), "not this user's alone; local lanes are off");
                return None;
            }
        }
        Some(folder)
    }

    /// The socket of the worker serving at `address`.
    fn socket_path(folder: &Path, address: &str) -> PathBuf {
        let name: String =
            address.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        folder.join(format!("{name}.sock"))
    }

    /// The four bytes that go before a record of `length` bytes.
    fn length_prefix(length: usize) -> io::Result<[u8; 4]> {
        u32::try_from(length).map(u32::to_le_bytes).map_err(|_| io::Error::other(format!("a record of {length} bytes")))
    }

    fn write_record(stream: &mut UnixStream, record: &[u8]) -> io::Result<()> {
        stream.write_all(&length_prefix(record.len())?)?;
        stream.write_all(record)
    }

    /// Reads one length-prefixed record into `buffer`; `Ok(false)` at a clean end.
    fn read_record(stream: &mut UnixStream, buffer: &mut Vec<u8>, limit: usize) -> io::Result<bool> {
        let mut length = [0u8; 4];
        match stream.read_exact(&mut length) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let length = u32::from_le_bytes(length) as usize;
        if length > limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a record of {length} bytes")));
        }
        buffer.resize(length, 0);
        stream.read_exact(buffer)?;
        Ok(true)
    }

    /// The sending end of a lane, held by the sending stage's compute thread.
    pub struct Lane {
        stream: UnixStream,
        /// Reused for every message: length prefix and encoding.
        buffer: Vec<u8>,
    }

    impl Lane {
        /// Opens a lane to the worker at `address` if it serves one on this machine
        /// and answers as `expected` (any node where `None`); `sender` is this
        /// worker, `pipeline` the pipeline the messages belong to. `None` means: use
        /// gRPC.
        pub fn open(address: &str, expected: Option<&NodeId>, sender: &NodeId, pipeline: u64) -> Option<Self> {
            let path = socket_path(&folder()?, address);
            let mut stream = UnixStream::connect(&path).ok()?;
            let greeted = (|| {
                stream.set_read_timeout(Some(GREETING_TIMEOUT))?;
                let mut greeting = pipeline.to_le_bytes().to_vec();
                greeting.extend_from_slice(sender.as_str().as_bytes());
                write_record(&mut stream, &greeting)?;
                let mut answer = Vec::new();
                if !read_record(&mut stream, &mut answer, MAX_GREETING_BYTES)? {
                    return Err(io::Error::other("closed before answering"));
                }
                stream.set_read_timeout(None)?;
                Ok::<_, io::Error>(answer)
            })();
            match greeted {
                Ok(answer) if expected.is_none_or(|node| answer == node.as_str().as_bytes()) => {
                    tracing::info!(%address, "frames to this peer go over a local lane");
                    Some(Self { stream, buffer: Vec::new() })
                }
                Ok(answer) => {
                    let answered = String::from_utf8_lossy(&answer);
                    tracing::warn!(%address, %answered, ?expected, "a local lane answered as another node; using gRPC");
                    None
                }
                Err(e) => {
                    tracing::warn!(%address, error = %e, "could not open a local lane; using gRPC");
                    None
                }
            }
        }

        /// Writes `message`; returns its encoded size.
        pub fn send(&mut self, message: &StageMessage) -> io::Result<usize> {
            let size = message.encoded_len();
            self.buffer.clear();
            self.buffer.extend_from_slice(&length_prefix(size)?);
            message.encode(&mut self.buffer).map_err(io::Error::other)?;
            self.stream.write_all(&self.buffer)?;
            Ok(size)
        }
    }

    /// A worker's lane socket; dropping it removes the socket (threads reading
    /// lanes already open end when their senders close them).
    pub struct Listener {
        path: PathBuf,
        /// The socket's inode: a worker started at the same address since has put
        /// a socket of its own at the path, which must stay.
        inode: Option<u64>,
    }

    impl Listener {
        /// Serves lanes for the worker `node` at `address`, delivering to `inbox`
        /// for as long as it lives. `None` (logged) where lanes cannot be served.
        pub fn open(address: &str, node: NodeId, inbox: Weak<dyn LaneInbox>) -> Option<Self> {
            let path = socket_path(&folder()?, address);
            // Only one process serves an address at a time: a socket left there was
            // its earlier holder's.
            let _ = std::fs::remove_file(&path);
            let listener = match UnixListener::bind(&path) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot serve local lanes; peers use gRPC");
                    return None;
                }
            };
            let node = Arc::new(node);
            let spawned = std::thread::Builder::new().name("lane-accept".into()).spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { continue };
                    if inbox.strong_count() == 0 {
                        return;
                    }
                    let (inbox, node) = (inbox.clone(), node.clone());
                    let _ = std::thread::Builder::new().name("lane-read".into()).spawn(move || {
                        if let Err(e) = read_lane(stream, &node, &inbox) {
                            tracing::warn!(error = %e, "a local lane closed");
                        }
                    });
                }
            });
            let inode = std::fs::symlink_metadata(&path).ok().map(|m| m.ino());
            let listener = Self { path, inode };
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot serve local lanes; peers use gRPC");
                return None;
            }
            Some(listener)
        }
    }

    impl Drop for Listener {
        fn drop(&mut self) {
            if std::fs::symlink_metadata(&self.path).ok().map(|m| m.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Answers a lane's greeting and delivers its messages until it closes.
    fn read_lane(mut stream: UnixStream, node: &NodeId, inbox: &Weak<dyn LaneInbox>) -> io::Result<()> {
        let mut buffer = Vec::new();
        if !read_record(&mut stream, &mut buffer, MAX_GREETING_BYTES)? {
            return Ok(());
        }
        let (pipeline, sender) = buffer.split_at_checked(8).ok_or_else(|| io::Error::other("a short greeting"))?;
        let pipeline = u64::from_le_bytes(pipeline.try_into().map_err(io::Error::other)?);
        let sender = std::str::from_utf8(sender)
            .ok()
            .and_then(NodeId::new)
            .ok_or_else(|| io::Error::other("the greeting names no node"))?;
        write_record(&mut stream, node.as_str().as_bytes())?;
        while read_record(&mut stream, &mut buffer, MAX_MESSAGE_BYTES)? {
            let message =
                StageMessage::decode(buffer.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let Some(inbox) = inbox.upgrade() else { return Ok(()) };
            inbox.deliver(pipeline, &sender, message).map_err(io::Error::other)?;
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use std::sync::{Arc, Condvar, Mutex};

        use strata_proto::v1::{stage_message, ActivationFrame};

        use super::*;

        #[derive(Default)]
        struct Inbox {
            got: Mutex<Vec<(u64, String, u64)>>,
            arrived: Condvar,
        }

        impl LaneInbox for Inbox {
            fn deliver(&self, pipeline: u64, sender: &NodeId, message: StageMessage) -> Result<(), String> {
                let Some(stage_message::Kind::Frame(frame)) = message.kind else { return Err("not a frame".into()) };
                self.got.lock().unwrap().push((pipeline, sender.to_string(), frame.seq_id));
                self.arrived.notify_all();
                Ok(())
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
            assert_eq!(lane.stream.read(&mut [0u8; 1]).unwrap(), 0);
            assert!(inbox.got.lock().unwrap().is_empty());
            drop(listener);
            assert!(Lane::open(&address, None, &node("sender"), 1).is_none());
        }

        #[test]
        fn a_listener_leaves_the_socket_of_a_worker_started_at_its_address_since() {
            let address = format!("127.0.0.1:lane-restart-{}", std::process::id());
            let inbox = Arc::new(Inbox::default());
            let old = serve(&address, &inbox);
            let new = serve(&address, &inbox);
            drop(old);
            assert!(Lane::open(&address, Some(&node("receiver")), &node("sender"), 1).is_some());
            drop(new);
            assert!(Lane::open(&address, None, &node("sender"), 1).is_none());
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::sync::Weak;

    use strata_proto::v1::StageMessage;
    use strata_proto::NodeId;

    use super::LaneInbox;

    /// No lanes here: every message goes over gRPC.
    pub enum Lane {}

    impl Lane {
        pub fn open(_address: &str, _expected: Option<&NodeId>, _sender: &NodeId, _pipeline: u64) -> Option<Self> {
            None
        }

        pub fn send(&mut self, _message: &StageMessage) -> std::io::Result<usize> {
            match *self {}
        }
    }

    pub struct Listener;

    impl Listener {
        pub fn open(_address: &str, _node: NodeId, _inbox: Weak<dyn LaneInbox>) -> Option<Self> {
            None
        }
    }
}
