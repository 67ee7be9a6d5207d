//! Sockets between the processes of one user on one machine: a server names its
//! socket after the network address it serves, so a process that knows that address
//! can reach it past TCP. Records on them are length-prefixed.
//!
//! Linux only (Unix sockets in a folder per user and network namespace); elsewhere
//! no socket is served or found, and callers use the network as before.
//!
//! Who may connect: the sockets lie in a folder only this user can enter (0700,
//! owned by this user, not a link; checked by server and client alike), so a peer is
//! a process of the same user, which could read this user's key files anyway. One
//! folder per network namespace, so processes in different namespaces (the tests'
//! hosts) never find each other's.

use std::io;

/// The four bytes that go before a record of `length` bytes.
pub fn length_prefix(length: usize) -> io::Result<[u8; 4]> {
    u32::try_from(length).map(u32::to_le_bytes).map_err(|_| io::Error::other(format!("a record of {length} bytes")))
}

#[cfg(target_os = "linux")]
pub use linux::{LocalAcceptor, LocalSocketFile, LocalStream, Watch};

#[cfg(not(target_os = "linux"))]
pub use elsewhere::{LocalAcceptor, LocalSocketFile, LocalStream, Watch};

/// Serves a socket for `address`: the acceptor takes connections, the file removes
/// the socket when dropped (if it is still this server's). A socket left at that
/// place by an earlier server of the address is replaced.
pub fn bind(address: &str) -> io::Result<(LocalAcceptor, LocalSocketFile)> {
    #[cfg(target_os = "linux")]
    return linux::bind(address);
    #[cfg(not(target_os = "linux"))]
    return Err(io::Error::new(io::ErrorKind::Unsupported, format!("no local sockets on this system (for {address})")));
}

/// Connects to the socket of the server at `address`, if one serves on this machine
/// for this user; `None` otherwise.
pub fn connect(address: &str) -> Option<LocalStream> {
    #[cfg(target_os = "linux")]
    return linux::connect(address);
    #[cfg(not(target_os = "linux"))]
    return {
        let _ = address;
        None
    };
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io::{self, Read as _, Write as _};
    use std::net::Shutdown;
    use std::os::fd::{AsRawFd as _, RawFd};
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::length_prefix;

    /// This user's folder of sockets for this network namespace, made if missing
    /// (where `make`); `None` when it is missing or is not this user's alone.
    fn folder(make: bool) -> Option<PathBuf> {
        let uid = std::fs::metadata("/proc/self").ok()?.uid();
        let namespace = std::fs::read_link("/proc/self/ns/net").ok()?;
        let namespace: String = namespace.to_string_lossy().chars().filter(char::is_ascii_digit).collect();
        let base = std::env::temp_dir().join(format!("strata-lanes-{uid}"));
        let folder = base.join(namespace);
        for dir in [&base, &folder] {
            if make {
                match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(_) => return None,
                }
            }
            // Not followed if a link: someone else's folder must not pass for ours.
            let meta = std::fs::symlink_metadata(dir).ok()?;
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
                tracing::warn!(folder = %dir.display(), "not this user's alone; local sockets are off");
                return None;
            }
        }
        Some(folder)
    }

    /// The socket of the server at `address`.
    fn socket_path(folder: &Path, address: &str) -> PathBuf {
        let name: String =
            address.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        folder.join(format!("{name}.sock"))
    }

    pub fn bind(address: &str) -> io::Result<(LocalAcceptor, LocalSocketFile)> {
        let folder = folder(true).ok_or_else(|| io::Error::other("no folder of this user's alone for sockets"))?;
        let path = socket_path(&folder, address);
        // Only one process serves an address at a time: a socket left there was its
        // earlier holder's.
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let inode = std::fs::symlink_metadata(&path).ok().map(|m| m.ino());
        Ok((LocalAcceptor { listener }, LocalSocketFile { path, inode }))
    }

    pub fn connect(address: &str) -> Option<LocalStream> {
        let path = socket_path(&folder(false)?, address);
        UnixStream::connect(path).ok().map(|stream| LocalStream { stream })
    }

    /// Takes the connections to a served socket.
    pub struct LocalAcceptor {
        listener: UnixListener,
    }

    impl LocalAcceptor {
        pub fn accept(&self) -> io::Result<LocalStream> {
            self.listener.accept().map(|(stream, _)| LocalStream { stream })
        }
    }

    /// A served socket's place; dropping it removes the socket, unless a server
    /// started at the same address since has put a socket of its own there.
    pub struct LocalSocketFile {
        path: PathBuf,
        inode: Option<u64>,
    }

    impl Drop for LocalSocketFile {
        fn drop(&mut self) {
            if std::fs::symlink_metadata(&self.path).ok().map(|m| m.ino()) == self.inode {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// One end of a connection.
    pub struct LocalStream {
        stream: UnixStream,
    }

    /// What [`crate::doorbell::Doorbell::wait`] watches a stream by: its
    /// descriptor, which the stream must outlive the waits on.
    #[derive(Clone, Copy, Debug)]
    pub struct Watch(RawFd);

    impl Watch {
        pub(crate) fn fd(self) -> RawFd {
            self.0
        }
    }

    impl LocalStream {
        /// How a doorbell's wait watches this stream.
        pub fn watch(&self) -> Watch {
            Watch(self.stream.as_raw_fd())
        }

        /// Whether a read would not block: a record (or part of one) has come, or
        /// the peer closed its end.
        pub fn has_input(&self) -> io::Result<bool> {
            let mut fd = libc::pollfd { fd: self.stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one live pollfd, no waiting.
            let ready = unsafe { libc::poll(&mut fd, 1, 0) };
            if ready < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(ready > 0)
        }

        /// Writes `record` with its length prefix.
        pub fn write_record(&mut self, record: &[u8]) -> io::Result<()> {
            self.stream.write_all(&length_prefix(record.len())?)?;
            self.stream.write_all(record)
        }

        /// Writes the record `encode` appends to `buffer` (cleared first; kept for
        /// the next record), prefix and record in one write.
        pub fn write_encoded(
            &mut self,
            buffer: &mut Vec<u8>,
            encode: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
        ) -> io::Result<usize> {
            buffer.clear();
            buffer.extend_from_slice(&[0; 4]);
            encode(buffer)?;
            let length = buffer.len() - 4;
            buffer[..4].copy_from_slice(&length_prefix(length)?);
            self.stream.write_all(buffer)?;
            Ok(length)
        }

        /// Reads one record into `buffer`; `Ok(false)` at a clean end.
        pub fn read_record(&mut self, buffer: &mut Vec<u8>, limit: usize) -> io::Result<bool> {
            let mut length = [0u8; 4];
            match self.stream.read_exact(&mut length) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            }
            let length = u32::from_le_bytes(length) as usize;
            if length > limit {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a record of {length} bytes")));
            }
            buffer.resize(length, 0);
            self.stream.read_exact(buffer)?;
            Ok(true)
        }

        /// Writes `record` and reads the peer's one-record answer, waiting at most
        /// `timeout` for it.
        pub fn ask(&mut self, record: &[u8], limit: usize, timeout: Duration) -> io::Result<Vec<u8>> {
            self.stream.set_read_timeout(Some(timeout))?;
            self.write_record(record)?;
            let mut answer = Vec::new();
            if !self.read_record(&mut answer, limit)? {
                return Err(io::Error::other("closed before answering"));
            }
            self.stream.set_read_timeout(None)?;
            Ok(answer)
        }

        /// Another handle on the same connection (to close it from another thread).
        pub fn try_clone(&self) -> io::Result<Self> {
            self.stream.try_clone().map(|stream| Self { stream })
        }

        /// Ends the connection both ways: a read blocked on it, here or at the peer,
        /// returns.
        pub fn close(&self) {
            let _ = self.stream.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod elsewhere {
    use std::io;
    use std::time::Duration;

    /// None here: [`super::bind`] fails.
    pub enum LocalAcceptor {}

    impl LocalAcceptor {
        pub fn accept(&self) -> io::Result<LocalStream> {
            match *self {}
        }
    }

    pub enum LocalSocketFile {}

    /// None here: [`super::connect`] finds none.
    pub enum LocalStream {}

    /// None here, as there are no streams.
    #[derive(Clone, Copy, Debug)]
    pub enum Watch {}

    impl LocalStream {
        pub fn watch(&self) -> Watch {
            match *self {}
        }

        pub fn has_input(&self) -> io::Result<bool> {
            match *self {}
        }

        pub fn write_record(&mut self, _record: &[u8]) -> io::Result<()> {
            match *self {}
        }

        pub fn write_encoded(
            &mut self,
            _buffer: &mut Vec<u8>,
            _encode: impl FnOnce(&mut Vec<u8>) -> io::Result<()>,
        ) -> io::Result<usize> {
            match *self {}
        }

        pub fn read_record(&mut self, _buffer: &mut Vec<u8>, _limit: usize) -> io::Result<bool> {
            match *self {}
        }

        pub fn ask(&mut self, _record: &[u8], _limit: usize, _timeout: Duration) -> io::Result<Vec<u8>> {
            match *self {}
        }

        pub fn try_clone(&self) -> io::Result<Self> {
            match *self {}
        }

        pub fn close(&self) {
            match *self {}
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn records_cross_and_a_dropped_server_takes_its_socket_but_not_a_newer_one() {
        let address = format!("127.0.0.1:local-socket-{}", std::process::id());
        let (acceptor, old_file) = bind(&address).unwrap();
        let mut client = connect(&address).expect("the socket is found");
        let mut server = acceptor.accept().unwrap();
        let mut got = Vec::new();
        let asking = std::thread::spawn(move || client.ask(b"who?", 16, Duration::from_secs(5)).map(|a| (a, client)));
        assert!(server.read_record(&mut got, 16).unwrap());
        assert_eq!(got, b"who?");
        server.write_record(b"me").unwrap();
        let (answer, mut client) = asking.join().unwrap().unwrap();
        assert_eq!(answer, b"me");
        client.write_record(b"hello").unwrap();
        assert_eq!(client.write_encoded(&mut Vec::new(), |b| Ok(b.extend_from_slice(b"again"))).unwrap(), 5);
        assert!(server.read_record(&mut got, 16).unwrap());
        assert_eq!(got, b"hello");
        assert!(server.read_record(&mut got, 16).unwrap());
        assert_eq!(got, b"again");
        client.write_record(&[0; 17]).unwrap();
        assert_eq!(server.read_record(&mut got, 16).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let second = connect(&address).expect("the socket is found");
        let mut server = acceptor.accept().unwrap();
        second.close();
        assert!(!server.read_record(&mut got, 16).unwrap(), "a closed peer is a clean end");

        let (_newer, new_file) = bind(&address).unwrap();
        drop(old_file);
        assert!(connect(&address).is_some(), "the newer server's socket stays");
        drop(new_file);
        assert!(connect(&address).is_none());
    }
}
