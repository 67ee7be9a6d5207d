//! A thread's wait for whichever comes first: its doorbell rung by another thread,
//! or something to read on one of the local streams it watches
//! ([`crate::local_socket`]).
//!
//! Why one wait for both: a stage's compute thread reads the lanes of its peers on
//! the same machine itself, and still takes messages from its queue. Waiting on the
//! lanes' sockets directly, the sender's write wakes the thread that computes next,
//! where a reader thread between them cost a second wake-up (on a 2-core VM, ~55 µs
//! a hop of the ~125 a hand-over took).
//!
//! A ring stays until [`Doorbell::clear`]: a thread that starts waiting after the
//! ring returns at once. On Linux the doorbell is an eventfd and the wait a
//! `ppoll`; elsewhere there are no local streams, and it is a condition variable.

use std::io;
use std::time::Duration;

use crate::local_socket::Watch;

pub struct Doorbell(imp::Doorbell);

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        imp::Doorbell::new().map(Self)
    }

    /// Rings it: waits in progress return, and later ones until [`Doorbell::clear`].
    pub fn ring(&self) {
        self.0.ring();
    }

    /// Takes the ring back.
    pub fn clear(&self) {
        self.0.clear();
    }

    /// Waits until it is rung, one of `watched` has something to read (or was
    /// closed by its peer), or `timeout` (forever where `None`) has passed. A
    /// return says only that one of these may have happened: callers check.
    pub fn wait(&self, watched: &[Watch], timeout: Option<Duration>) -> io::Result<()> {
        self.0.wait(watched, timeout)
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    use std::time::Duration;

    use crate::local_socket::Watch;

    pub struct Doorbell {
        event: OwnedFd,
    }

    impl Doorbell {
        pub fn new() -> io::Result<Self> {
            // SAFETY: eventfd takes no pointers; a non-negative result is a new
            // descriptor that only this value owns.
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: as above.
            Ok(Self { event: unsafe { OwnedFd::from_raw_fd(fd) } })
        }

        pub fn ring(&self) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to our own descriptor. It
            // cannot fail short of the counter's overflow, which a ring then
            // still is (the counter stays non-zero).
            unsafe { libc::write(self.event.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }

        pub fn clear(&self) {
            let mut count = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a live buffer; non-blocking, so an
            // unrung doorbell returns EAGAIN at once.
            unsafe { libc::read(self.event.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
        }

        pub fn wait(&self, watched: &[Watch], timeout: Option<Duration>) -> io::Result<()> {
            let mut fds: Vec<libc::pollfd> = std::iter::once(self.event.as_raw_fd())
                .chain(watched.iter().map(|w| w.fd()))
                .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
                .collect();
            let timeout = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: `fds` and the timeout outlive the call; the count is theirs.
            let ready =
                unsafe { libc::ppoll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ptr, std::ptr::null()) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                // A signal: the caller checks and waits again.
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            Ok(())
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;
    use std::sync::{Condvar, Mutex, PoisonError};
    use std::time::Duration;

    use crate::local_socket::Watch;

    #[derive(Default)]
    pub struct Doorbell {
        rung: Mutex<bool>,
        bell: Condvar,
    }

    impl Doorbell {
        pub fn new() -> io::Result<Self> {
            Ok(Self::default())
        }

        pub fn ring(&self) {
            *self.rung.lock().unwrap_or_else(PoisonError::into_inner) = true;
            self.bell.notify_all();
        }

        pub fn clear(&self) {
            *self.rung.lock().unwrap_or_else(PoisonError::into_inner) = false;
        }

        /// No stream can be watched here (there are none).
        pub fn wait(&self, _watched: &[Watch], timeout: Option<Duration>) -> io::Result<()> {
            let rung = self.rung.lock().unwrap_or_else(PoisonError::into_inner);
            match timeout {
                Some(t) => drop(self.bell.wait_timeout_while(rung, t, |r| !*r).unwrap_or_else(PoisonError::into_inner)),
                None => drop(self.bell.wait_while(rung, |r| !*r).unwrap_or_else(PoisonError::into_inner)),
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_ring_before_or_during_a_wait_ends_it_and_stays_until_cleared() {
        let bell = std::sync::Arc::new(Doorbell::new().unwrap());
        bell.ring();
        bell.wait(&[], None).unwrap();
        bell.wait(&[], None).unwrap();
        bell.clear();
        let start = Instant::now();
        bell.wait(&[], Some(Duration::from_millis(30))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25), "an unrung wait ran its time out");
        let ringer = bell.clone();
        let ringing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            ringer.ring();
        });
        let start = Instant::now();
        bell.wait(&[], Some(Duration::from_secs(60))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "the ring ended the wait");
        ringing.join().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_record_on_a_watched_stream_ends_the_wait() {
        let address = format!("127.0.0.1:doorbell-{}", std::process::id());
        let (acceptor, _file) = crate::local_socket::bind(&address).unwrap();
        let mut client = crate::local_socket::connect(&address).expect("the socket is found");
        let server = acceptor.accept().unwrap();
        let bell = Doorbell::new().unwrap();
        let start = Instant::now();
        bell.wait(&[server.watch()], Some(Duration::from_millis(30))).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(25), "nothing to read: the wait ran its time out");
        let writing = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            client.write_record(b"hello").unwrap();
            client
        });
        let start = Instant::now();
        bell.wait(&[server.watch()], Some(Duration::from_secs(60))).unwrap();
        assert!(start.elapsed() < Duration::from_secs(30), "the record ended the wait");
        drop(writing.join().unwrap());
    }
}
