//! A stage's compute threads pinned one to a core, for workers that take turns on
//! one machine's cores.
//!
//! Workers that share a machine compute one at a time under a compute lock, and
//! between its turns a stage's pool threads sleep ([`crate::pool_rest`]). Linux
//! wakes a sleeping thread on the waker's core whenever the other cores look busy
//! at that instant, which they often do for a moment as the previous stage hands
//! its frame on; the two threads then share one core while another idles, and stay
//! so, because a thread that ran within the last half millisecond counts as
//! cache-hot and is not moved. A scheduler trace of three workers on two cores
//! showed stage steps of 2.3 ms taking 8 that way. Pinned, each compute thread has
//! a core of its own; every worker uses the same cores in the same order, which is
//! what taking turns wants.
//!
//! Only for workers that take turns: a worker that has a machine to itself shares
//! it with the owner's other programs, and a pinned thread could not leave a core
//! that one of them keeps busy.

/// Why the threads were not pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{threads} compute threads but only {cores} cores are allowed to this process")]
    TooFewCores { threads: usize, cores: usize },
    #[error("the system refused: {0}")]
    Refused(std::io::Error),
    #[error("pinning threads is only done on Linux")]
    Unsupported,
}

/// The core each compute thread gets, indexed as the compute pool numbers them: its
/// pool threads `0..threads - 1`, then the thread that calls into the pool. The caller
/// takes the first core, since it also does the step's serial work.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn assignment(allowed: &[usize], threads: usize) -> Result<Vec<usize>, PinError> {
    if threads == 0 || allowed.len() < threads {
        return Err(PinError::TooFewCores { threads, cores: allowed.len() });
    }
    Ok((0..threads).map(|thread| allowed[(thread + 1) % threads]).collect())
}

/// Pins the calling thread and each of the compute pool's threads to a core of its
/// own, among those this process may use, and returns the cores in the pool's
/// thread order. The calling thread should be the one that runs the stage.
pub fn pin_compute_threads() -> Result<Vec<usize>, PinError> {
    os::pin_compute_threads()
}

#[cfg(target_os = "linux")]
mod os {
    use std::sync::Mutex;

    use super::{assignment, PinError};

    pub(super) fn pin_compute_threads() -> Result<Vec<usize>, PinError> {
        let pool = crate::compute_pool::compute_pool();
        let cores = assignment(&allowed_cores()?, pool.threads())?;
        let refusal = Mutex::new(None);
        // Each thread can only be pinned from itself (by its pthread handle), so the
        // pinning is a job every pool thread runs once.
        pool.on_every_thread(|thread| {
            if let Err(e) = pin_this_thread(cores[thread]) {
                *refusal.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
            }
        });
        match refusal.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            Some(e) => Err(PinError::Refused(e)),
            None => Ok(cores),
        }
    }

    fn allowed_cores() -> Result<Vec<usize>, PinError> {
        // SAFETY: a zeroed cpu_set_t is an empty set, which sched_getaffinity fills.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: the size given is the set's own.
        if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
            return Err(PinError::Refused(std::io::Error::last_os_error()));
        }
        // SAFETY: CPU_ISSET reads the set within CPU_SETSIZE.
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&core| unsafe { libc::CPU_ISSET(core, &set) }).collect())
    }

    pub(super) fn pin_this_thread(core: usize) -> std::io::Result<()> {
        // SAFETY: as above; CPU_SET writes within the set for a core below CPU_SETSIZE,
        // which every allowed core is.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        unsafe { libc::CPU_SET(core, &mut set) };
        // SAFETY: pthread_self is this thread; the size given is the set's own.
        let status =
            unsafe { libc::pthread_setaffinity_np(libc::pthread_self(), std::mem::size_of::<libc::cpu_set_t>(), &set) };
        match status {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }

    #[cfg(test)]
    pub(super) fn this_threads_cores() -> Vec<usize> {
        allowed_cores().unwrap_or_default()
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    use super::PinError;

    pub(super) fn pin_compute_threads() -> Result<Vec<usize>, PinError> {
        Err(PinError::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_takes_the_first_core_and_each_pool_thread_the_next() {
        // The pool's order: pool threads 0 and 1, then the caller.
        assert_eq!(assignment(&[4, 5, 7], 3).unwrap(), vec![5, 7, 4]);
        assert_eq!(assignment(&[0, 1], 2).unwrap(), vec![1, 0]);
        assert_eq!(assignment(&[2, 3, 6, 9], 1).unwrap(), vec![2]);
    }

    #[test]
    fn more_threads_than_cores_are_not_pinned() {
        assert!(matches!(assignment(&[0, 1], 3), Err(PinError::TooFewCores { threads: 3, cores: 2 })));
        assert!(matches!(assignment(&[], 1), Err(PinError::TooFewCores { .. })));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn every_compute_thread_ends_on_its_own_core() {
        let _turn = crate::compute_pool::one_test_at_a_time();
        // On a thread of its own: the pinning stays with the thread, and this one ends.
        std::thread::spawn(|| {
            let cores = match pin_compute_threads() {
                Ok(cores) => cores,
                Err(e @ PinError::TooFewCores { .. }) => {
                    eprintln!("SKIPPED: {e}");
                    return;
                }
                Err(e) => panic!("pinning failed: {e}"),
            };
            let seen = std::sync::Mutex::new(vec![Vec::new(); cores.len()]);
            crate::compute_pool::compute_pool().on_every_thread(|thread| {
                seen.lock().unwrap()[thread] = os::this_threads_cores();
            });
            let seen = seen.into_inner().unwrap();
            let expected: Vec<Vec<usize>> = cores.iter().map(|&core| vec![core]).collect();
            assert_eq!(seen, expected);
            let mut distinct = cores.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), cores.len(), "{cores:?}");
        })
        .join()
        .unwrap();
    }
}
