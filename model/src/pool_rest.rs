//! Candle's compute pool asleep while a stage waits for work.
//!
//! Candle's pool threads spin after each operation before they sleep (thousands of
//! spins, a few hundred microseconds), so that the next operation of a step finds
//! them awake. Once a stage has finished a step and waits for its next frame, that
//! spin only takes a core from whoever computes next: with three pipeline stages
//! taking turns on two cores, a scheduler trace showed each stage's pool thread
//! spinning 0.3–0.5 ms into the next stage's step, whose own pool thread waited for
//! the core meanwhile. [`wait_with_pool_asleep`] runs a blocking wait as one job of
//! the pool in which the pool's threads sleep on a condition variable: they stop
//! spinning the moment the wait starts and wake when it ends.
//!
//! While the wait lasts no other thread can use the pool (candle runs one job at a
//! time), so a wait should be bounded.
//!
//! The job ends only once every pool thread is back from it, so a pool thread woken
//! when the wait ends would hold the calling thread for as long as its wake takes (a
//! sleeping virtual CPU: 60–70 µs on average, measured in three workers of a 2-core
//! VM, per stage and token). The wait is handed a [`PoolBell`] instead, for whoever
//! ends it (the waker of the channel it waits on): the pool then wakes at the same
//! moment as the calling thread, not after it.
//!
//! A caller that waits on sockets can have the pool sleep on them too
//! ([`wait_with_pool_resting`] with a [`Rest`] of its own): the pool then wakes at
//! the write that ends the wait, without a second wake-up from the caller.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// What a resting pool's threads sleep on, and what wakes them: by default a
/// condition variable; a caller that waits on sockets can have the pool wake on
/// them too ([`wait_with_pool_resting`]).
pub trait Rest: Send + Sync {
    /// Returns once [`Rest::wake`] was called, or earlier for a reason of its own
    /// (the caller's wait will end soon). Called once per pool thread and wait.
    fn sleep(&self);
    /// Wakes the sleepers; a sleep that starts afterwards returns at once.
    fn wake(&self);
}

/// Wakes the pool's threads from a [`wait_with_pool_asleep`] before the wait has
/// returned. Ringing it after the wait, or more than once, does nothing.
#[derive(Clone)]
pub struct PoolBell(Arc<Bell>);

struct Bell {
    rest: Box<dyn Rest>,
    /// Pool threads back from their sleep (what the tests look at).
    woken: AtomicUsize,
}

/// A bell on the default rest (a condition variable), for waits that have none.
impl Default for PoolBell {
    fn default() -> Self {
        Self(Arc::new(Bell { rest: Box::new(Alarm::default()), woken: AtomicUsize::new(0) }))
    }
}

impl PoolBell {
    pub fn ring(&self) {
        self.0.rest.wake();
    }
}

/// Runs `wait` on this thread while candle's pool threads sleep, and returns what
/// it returns. The pool wakes when `wait` returns, or earlier if `wait` (or whom it
/// hands the bell) rings the bell it is given. With no pool threads (one compute
/// thread) it just runs `wait`.
pub fn wait_with_pool_asleep<T: Send>(wait: impl FnOnce(&PoolBell) -> T + Send) -> T {
    wait_with_pool_resting(Box::new(Alarm::default()), wait)
}

/// As [`wait_with_pool_asleep`], the pool's threads sleeping on `rest`.
pub fn wait_with_pool_resting<T: Send>(rest: Box<dyn Rest>, wait: impl FnOnce(&PoolBell) -> T + Send) -> T {
    let pool = candle_core::utils::barrier_pool();
    // Candle numbers its pool threads 0..n and gives the calling thread n.
    let caller = pool.n_workers();
    let bell = PoolBell(Arc::new(Bell { rest, woken: AtomicUsize::new(0) }));
    if caller == 0 {
        return wait(&bell);
    }
    let wait = Mutex::new(Some(wait));
    let result = Mutex::new(None);
    pool.execute(|thread| {
        if thread == caller {
            // A panic must not unwind through candle's pool, which would poison the
            // lock it serializes jobs with (every later operation would panic): it
            // is caught here and raised again once the job is over.
            if let Some(wait) = lock(&wait).take() {
                let run = || wait(&bell);
                *lock(&result) = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)));
            }
            bell.ring();
        } else {
            bell.0.rest.sleep();
            bell.0.woken.fetch_add(1, Ordering::Relaxed);
        }
    });
    let outcome = result.into_inner().unwrap_or_else(PoisonError::into_inner);
    match outcome.expect("the calling thread's part of the job ran the wait") {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// The default rest: a condition variable.
#[derive(Default)]
struct Alarm {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Rest for Alarm {
    fn sleep(&self) {
        let mut rung = lock(&self.rung);
        while !*rung {
            rung = self.bell.wait(rung).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn wake(&self) {
        let mut rung = lock(&self.rung);
        if !*rung {
            *rung = true;
            self.bell.notify_all();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn every_thread_runs_a_job() {
        let seen = AtomicUsize::new(0);
        candle_core::utils::barrier_pool().execute(|_| {
            seen.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(seen.into_inner(), candle_core::utils::barrier_pool().n_workers() + 1);
    }

    #[test]
    fn the_wait_runs_on_the_calling_thread_and_its_value_comes_back() {
        let me = std::thread::current().id();
        let (value, ran_on) = wait_with_pool_asleep(|_| (42, std::thread::current().id()));
        assert_eq!(value, 42);
        assert_eq!(ran_on, me);
    }

    #[test]
    fn the_pool_works_after_a_wait() {
        for _ in 0..3 {
            wait_with_pool_asleep(|_| std::thread::sleep(std::time::Duration::from_millis(1)));
            every_thread_runs_a_job();
        }
    }

    #[test]
    fn a_bell_rung_during_the_wait_wakes_the_pool_before_the_wait_returns() {
        let pool_threads = candle_core::utils::barrier_pool().n_workers();
        let all_awake = wait_with_pool_asleep(|bell| {
            let ringer = bell.clone();
            std::thread::spawn(move || ringer.ring()).join().expect("the ringer rings");
            let deadline = Instant::now() + Duration::from_secs(30);
            // `woken` counts the pool threads back from their sleep.
            while candle_pool_woken(bell) < pool_threads && Instant::now() < deadline {
                std::thread::yield_now();
            }
            candle_pool_woken(bell) == pool_threads
        });
        assert!(all_awake, "the pool slept on after the bell");
        every_thread_runs_a_job();
    }

    fn candle_pool_woken(bell: &PoolBell) -> usize {
        bell.0.woken.load(Ordering::Relaxed)
    }

    /// Counts its sleeps; sleeps on the default rest.
    #[derive(Default)]
    struct CountingRest {
        sleeps: Arc<AtomicUsize>,
        alarm: Alarm,
    }

    impl Rest for CountingRest {
        fn sleep(&self) {
            self.sleeps.fetch_add(1, Ordering::Relaxed);
            self.alarm.sleep();
        }

        fn wake(&self) {
            self.alarm.wake();
        }
    }

    #[test]
    fn the_pool_rests_on_the_rest_it_is_given() {
        let sleeps = Arc::new(AtomicUsize::new(0));
        let rest = CountingRest { sleeps: sleeps.clone(), alarm: Alarm::default() };
        let value = wait_with_pool_resting(Box::new(rest), |_| 7);
        assert_eq!(value, 7);
        assert_eq!(sleeps.load(Ordering::Relaxed), candle_core::utils::barrier_pool().n_workers(), "each pool thread slept on it");
        every_thread_runs_a_job();
    }

    #[test]
    fn a_panicking_wait_leaves_the_pool_usable() {
        let caught = std::panic::catch_unwind(|| wait_with_pool_asleep(|_| panic!("the wait failed")));
        assert!(caught.is_err());
        every_thread_runs_a_job();
    }
}
