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

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// Runs `wait` on this thread while candle's pool threads sleep, and returns what
/// it returns. With no pool threads (one compute thread) it just runs `wait`.
pub fn wait_with_pool_asleep<T: Send>(wait: impl FnOnce() -> T + Send) -> T {
    let pool = candle_core::utils::barrier_pool();
    // Candle numbers its pool threads 0..n and gives the calling thread n.
    let caller = pool.n_workers();
    if caller == 0 {
        return wait();
    }
    let wait = Mutex::new(Some(wait));
    let result = Mutex::new(None);
    let alarm = Alarm::default();
    pool.execute(|thread| {
        if thread == caller {
            // A panic must not unwind through candle's pool, which would poison the
            // lock it serializes jobs with (every later operation would panic): it
            // is caught here and raised again once the job is over.
            if let Some(wait) = lock(&wait).take() {
                *lock(&result) = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(wait)));
            }
            alarm.ring();
        } else {
            alarm.sleep_until_rung();
        }
    });
    let outcome = result.into_inner().unwrap_or_else(PoisonError::into_inner);
    match outcome.expect("the calling thread's part of the job ran the wait") {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[derive(Default)]
struct Alarm {
    rung: Mutex<bool>,
    bell: Condvar,
}

impl Alarm {
    fn sleep_until_rung(&self) {
        let mut rung = lock(&self.rung);
        while !*rung {
            rung = self.bell.wait(rung).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn ring(&self) {
        *lock(&self.rung) = true;
        self.bell.notify_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

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
        let (value, ran_on) = wait_with_pool_asleep(|| (42, std::thread::current().id()));
        assert_eq!(value, 42);
        assert_eq!(ran_on, me);
    }

    #[test]
    fn the_pool_works_after_a_wait() {
        for _ in 0..3 {
            wait_with_pool_asleep(|| std::thread::sleep(std::time::Duration::from_millis(1)));
            every_thread_runs_a_job();
        }
    }

    #[test]
    fn a_panicking_wait_leaves_the_pool_usable() {
        let caught = std::panic::catch_unwind(|| wait_with_pool_asleep(|| panic!("the wait failed")));
        assert!(caught.is_err());
        every_thread_runs_a_job();
    }
}
