//! The compute pool asleep while a stage waits for work.
//!
//! The pool's threads spin after each operation before they sleep (thousands of
//! looks, a few hundred microseconds), so that the next operation of a step finds
//! them awake. Once a stage has finished a step and waits for its next frame, that
//! spin only takes a core from whoever computes next: with three pipeline stages
//! taking turns on two cores, a scheduler trace showed each stage's pool thread
//! spinning 0.3–0.5 ms into the next stage's step, whose own pool thread waited for
//! the core meanwhile. [`wait_with_pool_asleep`] runs a blocking wait while the
//! pool's threads rest ([`crate::compute_pool::ComputePool::rest`]): they stop
//! spinning the moment the wait starts and wake when it ends.
//!
//! The wait is handed a [`PoolBell`] for whoever ends it (the waker of the channel
//! it waits on): the pool then wakes at the same moment as the calling thread, not
//! after it. A caller that waits on sockets can have the pool sleep on them too
//! ([`wait_with_pool_resting`] with a [`Rest`] of its own): the pool then wakes at
//! the write that ends the wait, without a second wake-up from the caller. Either
//! way the caller goes on the moment its wait returns: a pool thread still waking
//! joins the step's operations when it comes (see [`crate::compute_pool`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::compute_pool::compute_pool;
pub use crate::compute_pool::Rest;

/// Wakes the pool's threads from a [`wait_with_pool_asleep`] before the wait has
/// returned. Ringing it after the wait, or more than once, does nothing.
#[derive(Clone)]
pub struct PoolBell(Arc<Bell>);

struct Bell {
    rest: Box<dyn Rest>,
    /// Pool threads back from their sleep (what the tests look at).
    woken: AtomicUsize,
}

impl Rest for Bell {
    fn sleep(&self) {
        self.rest.sleep();
        self.woken.fetch_add(1, Ordering::Relaxed);
    }

    fn wake(&self) {
        self.rest.wake();
    }
}

/// A bell on the default rest (a condition variable), for waits that have none.
impl Default for PoolBell {
    fn default() -> Self {
        Self::on(Box::new(Alarm::default()))
    }
}

impl PoolBell {
    fn on(rest: Box<dyn Rest>) -> Self {
        Self(Arc::new(Bell { rest, woken: AtomicUsize::new(0) }))
    }

    pub fn ring(&self) {
        self.0.rest.wake();
    }
}

/// Runs `wait` on this thread while the compute pool's threads sleep, and returns
/// what it returns. The pool wakes when `wait` returns, or earlier if `wait` (or
/// whom it hands the bell) rings the bell it is given. With no pool threads (one
/// compute thread) it just runs `wait`.
pub fn wait_with_pool_asleep<T>(wait: impl FnOnce(&PoolBell) -> T) -> T {
    wait_with_pool_resting(Box::new(Alarm::default()), wait)
}

/// As [`wait_with_pool_asleep`], the pool's threads sleeping on `rest`.
pub fn wait_with_pool_resting<T>(rest: Box<dyn Rest>, wait: impl FnOnce(&PoolBell) -> T) -> T {
    let bell = PoolBell::on(rest);
    let pool = compute_pool();
    if pool.threads() == 1 {
        return wait(&bell);
    }
    // Ends (and rings the bell) when the wait returns or panics.
    let _resting = pool.rest(bell.0.clone());
    wait(&bell)
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

    use crate::compute_pool::one_test_at_a_time as one_at_a_time;

    fn pool_threads() -> usize {
        compute_pool().threads() - 1
    }

    fn every_thread_runs_a_job() {
        let seen = AtomicUsize::new(0);
        compute_pool().on_every_thread(|_| {
            seen.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(seen.into_inner(), compute_pool().threads());
    }

    fn within_30_seconds(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !what() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        what()
    }

    #[test]
    fn the_wait_runs_on_the_calling_thread_and_its_value_comes_back() {
        let _turn = one_at_a_time();
        let me = std::thread::current().id();
        let (value, ran_on) = wait_with_pool_asleep(|_| (42, std::thread::current().id()));
        assert_eq!(value, 42);
        assert_eq!(ran_on, me);
    }

    #[test]
    fn the_pool_works_after_a_wait() {
        let _turn = one_at_a_time();
        for _ in 0..3 {
            wait_with_pool_asleep(|_| std::thread::sleep(std::time::Duration::from_millis(1)));
            every_thread_runs_a_job();
        }
    }

    #[test]
    fn a_bell_rung_during_the_wait_wakes_the_pool_before_the_wait_returns() {
        let _turn = one_at_a_time();
        let all_awake = wait_with_pool_asleep(|bell| {
            let ringer = bell.clone();
            std::thread::spawn(move || ringer.ring()).join().expect("the ringer rings");
            // `woken` counts the pool threads back from their sleep.
            within_30_seconds(|| pool_woken(bell) == pool_threads())
        });
        assert!(all_awake, "the pool slept on after the bell");
        every_thread_runs_a_job();
    }

    fn pool_woken(bell: &PoolBell) -> usize {
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
    fn the_pool_rests_on_the_rest_it_is_given_and_the_caller_computes_meanwhile() {
        let _turn = one_at_a_time();
        let sleeps = Arc::new(AtomicUsize::new(0));
        let rest = CountingRest { sleeps: sleeps.clone(), alarm: Alarm::default() };
        let value = wait_with_pool_resting(Box::new(rest), |_| {
            let all_resting = within_30_seconds(|| sleeps.load(Ordering::Relaxed) == pool_threads());
            // An operation during the rest is done by the caller alone.
            let sum = AtomicUsize::new(0);
            compute_pool().run_chunks(64, |range| {
                sum.fetch_add(range.len(), Ordering::Relaxed);
            });
            (all_resting, sum.into_inner())
        });
        assert_eq!(value, (true, 64), "each pool thread slept on the rest");
        every_thread_runs_a_job();
    }

    #[test]
    fn a_panicking_wait_leaves_the_pool_usable() {
        let _turn = one_at_a_time();
        let caught = std::panic::catch_unwind(|| wait_with_pool_asleep(|_| panic!("the wait failed")));
        assert!(caught.is_err());
        every_thread_runs_a_job();
    }
}
