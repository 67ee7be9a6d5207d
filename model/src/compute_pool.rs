//! The compute pool: the threads that share a stage's parallel operations with the
//! thread that runs the stage.
//!
//! Why our own rather than candle's: candle's pool ends an operation only once every
//! one of its threads has taken part, so the thread that runs a stage waits for a
//! pool thread that is slow to arrive. Between a stage's turns its pool thread
//! sleeps, and on a virtual machine a sleeping core takes tens of microseconds to
//! wake: three workers on a 2-core VM (2026-12-06) had each stage's thread wait
//! 23–33 µs a step for its pool thread to come back, about 80 µs a token, with
//! nothing to do meanwhile. Here an operation's pieces go to whoever is there: the
//! calling thread starts at once, a pool thread joins when it arrives, or finds the
//! operation done and does nothing. The same holds for a pool thread that the system
//! lent to another program for a moment (the owner's game on the same PC).
//!
//! Results do not depend on who takes part: an operation is cut into the same pieces
//! whoever runs them (by its item count and the pool's size), and each piece writes
//! its own part of the output.
//!
//! While its stage waits for work, the pool can rest ([`ComputePool::rest`]): its
//! threads stop spinning and sleep on what the caller gives them (the sockets the
//! next frame comes on), so they wake with the caller, not after it.

use std::any::Any;
use std::cell::{Cell, UnsafeCell};
use std::hint::spin_loop;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;

/// How many times a pool thread looks for the next operation before it sleeps.
/// Each look waits a pause instruction (10000 looks took ~125 µs on the 2-core
/// Xeon VM): a stage's operations follow each other within microseconds, so the
/// default keeps the threads awake through a step.
pub const SPIN_LIMIT_ENV: &str = "STRATA_POOL_SPIN_LIMIT";
const DEFAULT_SPIN_LIMIT: u32 = 25_000;

/// The low bit of a ticket: pool threads may still join its operation.
const OPEN: u64 = 1;

thread_local! {
    /// Set on pool threads, and on a caller while its operation runs: an operation
    /// started there runs inline (the pool is busy with the one it is part of).
    static IN_OPERATION: Cell<bool> = const { Cell::new(false) };
}

/// What a resting pool's threads sleep on, and what wakes them.
pub trait Rest: Send + Sync {
    /// Returns once [`Rest::wake`] was called, or earlier for a reason of its own
    /// (the rest will end soon). Called at most once per pool thread and rest.
    fn sleep(&self);
    /// Wakes the sleepers; a sleep that starts afterwards returns at once.
    fn wake(&self);
}

/// The process's compute pool, sized as candle sizes its own: `CANDLE_NUM_THREADS`,
/// else `RAYON_NUM_THREADS`, else the cores this process may use, counting the
/// calling thread.
pub fn compute_pool() -> &'static ComputePool {
    static POOL: OnceLock<ComputePool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(candle_core::utils::get_num_threads);
        ComputePool::new(threads.saturating_sub(1), spin_limit())
    })
}

fn spin_limit() -> u32 {
    std::env::var(SPIN_LIMIT_ENV).ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_SPIN_LIMIT)
}

/// A calling thread and `helpers` pool threads.
pub struct ComputePool {
    shared: Arc<Shared>,
    helpers: usize,
    /// One operation at a time; holds the number of the last one.
    operations: Mutex<u64>,
    threads: Vec<JoinHandle<()>>,
}

/// What an operation's threads run: a function of the thread's number over data on
/// the caller's stack.
#[derive(Clone, Copy)]
struct Task {
    run: unsafe fn(*const (), usize),
    data: *const (),
}

struct Shared {
    /// The current operation's number times two, [`OPEN`] while pool threads may
    /// join it.
    ticket: AtomicU64,
    /// Pool threads inside the current operation (or checking whether they may be).
    inside: AtomicUsize,
    /// Written by the caller only while no pool thread can read it (see `operate`).
    task: UnsafeCell<Task>,
    /// The first panic of a pool thread in the current operation.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Pool threads asleep on `wake`, or about to check before they sleep.
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    /// Bumped at each rest's start, with the rest kept in `rest` beside its number.
    rest_number: AtomicU64,
    rest: Mutex<Option<(u64, Arc<dyn Rest>)>>,
    stop: AtomicBool,
}

// SAFETY: `task` is the only field that is not Sync by itself; it is written by the
// caller before an operation opens and read by pool threads only inside it (the
// protocol of `ComputePool::operate` and `join`), and the data it points at is Sync.
unsafe impl Sync for Shared {}
// SAFETY: as above; the raw pointer in `task` is only followed inside an operation.
unsafe impl Send for Shared {}

impl ComputePool {
    /// A pool of `helpers` threads besides the caller's, which look `spin_limit`
    /// times for the next operation before they sleep.
    pub fn new(helpers: usize, spin_limit: u32) -> Self {
        let shared = Arc::new(Shared {
            ticket: AtomicU64::new(0),
            inside: AtomicUsize::new(0),
            task: UnsafeCell::new(Task { run: nothing, data: std::ptr::null() }),
            panic: Mutex::new(None),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            rest_number: AtomicU64::new(0),
            rest: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let threads = (0..helpers)
            .map(|number| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("strata-pool-{number}"))
                    .spawn(move || pool_thread(&shared, number, spin_limit))
                    .expect("the compute pool's threads start")
            })
            .collect();
        Self { shared, helpers, operations: Mutex::new(0), threads }
    }

    /// Threads that take part in an operation: the pool's and the caller.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `work` over `0..items` in ranges that the threads present take as they
    /// free up; the calling thread starts at once and the call returns once every
    /// range is done. The ranges are the same whoever takes them.
    pub fn run_chunks(&self, items: usize, work: impl Fn(Range<usize>) + Sync) {
        if items == 0 {
            return;
        }
        if self.helpers == 0 || IN_OPERATION.get() {
            work(0..items);
            return;
        }
        // About eight ranges a thread: few enough that taking one costs little, enough
        // that a thread arriving late or slowed finds its share taken by the others.
        let chunk = items.div_ceil(self.threads() * 8).max(1);
        let cursor = AtomicUsize::new(0);
        let take = |_thread: usize| loop {
            let start = cursor.fetch_add(chunk, Ordering::Relaxed);
            if start >= items {
                break;
            }
            work(start..items.min(start + chunk));
        };
        self.operate(&take, None);
    }

    /// Runs `f` once on every thread of the pool, numbered `0..threads() - 1`, and on
    /// the caller as number `threads() - 1`; returns once all have. For what each
    /// thread must do itself (pinning it to a core). A rest of the pool meanwhile
    /// ends: its threads are woken to take part.
    pub fn on_every_thread(&self, f: impl Fn(usize) + Sync) {
        if self.helpers == 0 || IN_OPERATION.get() {
            f(self.helpers);
            return;
        }
        // Threads resting would come only when the rest ends, and its holder may be
        // waiting for this pool meanwhile: the rest ends for them now.
        let resting = lock(&self.shared.rest).take();
        if let Some((_, rest)) = resting {
            rest.wake();
        }
        let ran = AtomicUsize::new(0);
        let caller = self.helpers;
        let each = |thread: usize| {
            // Counted even if `f` panics, or the caller would wait for it forever.
            let _counted = (thread != caller).then(|| Counted(&ran));
            f(thread);
        };
        self.operate(&each, Some((&ran, self.helpers)));
    }

    /// Has the pool threads sleep on `rest` instead of looking for work, until the
    /// returned guard goes (which wakes them through `rest`), or until the rest
    /// itself lets them go (a lane's write): they then look for work as usual.
    /// Operations while they sleep run on their callers alone.
    pub fn rest(&self, rest: Arc<dyn Rest>) -> Resting<'_> {
        let number = {
            let mut current = lock(&self.shared.rest);
            let number = self.shared.rest_number.load(Ordering::SeqCst) + 1;
            *current = Some((number, rest.clone()));
            // Published after the rest, so a thread that sees the number finds it.
            self.shared.rest_number.store(number, Ordering::SeqCst);
            number
        };
        // Threads asleep for want of work rest on it instead.
        self.wake_sleepers();
        Resting { shared: &self.shared, number, rest }
    }

    /// Opens an operation running `f` (through its trampoline) on every pool thread
    /// that comes while it lasts, runs it on this thread, and returns once no pool
    /// thread is inside it any more — after `all` pool threads ran it, where given.
    fn operate<F: Fn(usize) + Sync>(&self, f: &F, all: Option<(&AtomicUsize, usize)>) {
        let mut operations = lock(&self.operations);
        *operations += 1;
        let ticket = *operations << 1;
        // SAFETY: the previous operation is closed and no pool thread is inside it
        // (its `Close` waited for that, under the lock held here), and a thread that
        // comes late reads the task only after seeing this operation's ticket open.
        unsafe {
            *self.shared.task.get() = Task { run: trampoline::<F>, data: (f as *const F).cast() };
        }
        let _close = Close { shared: &self.shared, ticket, all };
        self.shared.ticket.store(ticket | OPEN, Ordering::SeqCst);
        self.wake_sleepers();
        let _inside = InOperation::enter();
        f(self.helpers);
    }

    fn wake_sleepers(&self) {
        if self.shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _sleep = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
    }
}

impl Drop for ComputePool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _sleep = lock(&self.shared.sleep);
            self.shared.wake.notify_all();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A rest of the pool ([`ComputePool::rest`]); dropping it ends the rest.
#[must_use = "the rest ends when this is dropped"]
pub struct Resting<'a> {
    shared: &'a Shared,
    number: u64,
    rest: Arc<dyn Rest>,
}

impl Drop for Resting<'_> {
    fn drop(&mut self) {
        {
            let mut current = lock(&self.shared.rest);
            if current.as_ref().is_some_and(|(number, _)| *number == self.number) {
                *current = None;
            }
        }
        self.rest.wake();
    }
}

/// Closes an operation when its caller is done with its share (or panicked in it):
/// no pool thread joins it any more, and it ends once those inside have left.
struct Close<'a> {
    shared: &'a Shared,
    ticket: u64,
    all: Option<(&'a AtomicUsize, usize)>,
}

impl Drop for Close<'_> {
    fn drop(&mut self) {
        if let Some((ran, threads)) = self.all {
            wait_until(|| ran.load(Ordering::Acquire) >= threads);
        }
        self.shared.ticket.store(self.ticket, Ordering::SeqCst);
        // After the close, a thread that had not yet checked in finds the ticket
        // changed and leaves without touching the task.
        wait_until(|| self.shared.inside.load(Ordering::SeqCst) == 0);
        let panic = lock(&self.shared.panic).take();
        if let Some(panic) = panic {
            if !std::thread::panicking() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

/// Spins until `done`, then yields between looks: a pool thread that the system
/// took off its core in the middle of a piece of work may be gone for a whole time
/// slice, and the core is better left to it meanwhile.
fn wait_until(done: impl Fn() -> bool) {
    let mut looks = 0u32;
    while !done() {
        looks = looks.saturating_add(1);
        if looks < 10_000 {
            spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Counts a pool thread's run of [`ComputePool::on_every_thread`] when it ends.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Marks this thread as inside an operation for as long as it lives.
struct InOperation;

impl InOperation {
    fn enter() -> Self {
        IN_OPERATION.set(true);
        Self
    }
}

impl Drop for InOperation {
    fn drop(&mut self) {
        IN_OPERATION.set(false);
    }
}

/// A pool thread: joins each operation it finds open, rests when told, sleeps when
/// there has been nothing to do for `spin_limit` looks.
fn pool_thread(shared: &Shared, number: usize, spin_limit: u32) {
    IN_OPERATION.set(true);
    // What the pool started with: an operation or rest begun before this thread
    // ran is still one to take part in.
    let mut seen_ticket = 0;
    let mut seen_rest = 0;
    let mut spins = 0u32;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let ticket = shared.ticket.load(Ordering::Acquire);
        if ticket >> 1 != seen_ticket >> 1 {
            seen_ticket = ticket;
            if ticket & OPEN != 0 {
                join(shared, ticket, number);
            }
            spins = 0;
            continue;
        }
        let rest_number = shared.rest_number.load(Ordering::Acquire);
        if rest_number != seen_rest {
            seen_rest = rest_number;
            let rest = lock(&shared.rest).as_ref().filter(|(n, _)| *n == rest_number).map(|(_, rest)| rest.clone());
            if let Some(rest) = rest {
                // A rest that panics must not take the thread with it: callers that
                // wait for every pool thread would wait for ever.
                let sleep = std::panic::AssertUnwindSafe(|| rest.sleep());
                let _ = std::panic::catch_unwind(sleep);
            }
            spins = 0;
            continue;
        }
        if spins < spin_limit {
            spins += 1;
            spin_loop();
            continue;
        }
        shared.sleepers.fetch_add(1, Ordering::SeqCst);
        {
            let mut sleep = lock(&shared.sleep);
            while !shared.stop.load(Ordering::SeqCst)
                && shared.ticket.load(Ordering::SeqCst) >> 1 == seen_ticket >> 1
                && shared.rest_number.load(Ordering::SeqCst) == seen_rest
            {
                sleep = shared.wake.wait(sleep).unwrap_or_else(PoisonError::into_inner);
            }
        }
        shared.sleepers.fetch_sub(1, Ordering::SeqCst);
        spins = 0;
    }
}

/// Takes part in the operation of `ticket` if it is still open once this thread has
/// checked in (the caller's close then waits for it).
fn join(shared: &Shared, ticket: u64, number: usize) {
    shared.inside.fetch_add(1, Ordering::SeqCst);
    if shared.ticket.load(Ordering::SeqCst) == ticket {
        // SAFETY: the operation is open and this thread is counted inside it, so the
        // caller's close has not finished: the task and the data it points at live.
        let task = unsafe { *shared.task.get() };
        // SAFETY: `task.run` is the trampoline written for `task.data`'s type.
        let run = || unsafe { (task.run)(task.data, number) };
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            lock(&shared.panic).get_or_insert(panic);
        }
    }
    shared.inside.fetch_sub(1, Ordering::SeqCst);
}

/// Calls the `F` at `data` with the thread's number.
///
/// # Safety
/// `data` must point at a live `F`.
unsafe fn trampoline<F: Fn(usize)>(data: *const (), thread: usize) {
    // SAFETY: the caller's contract.
    unsafe { (*data.cast::<F>())(thread) }
}

/// The task before the first operation (never run: no ticket is open).
unsafe fn nothing(_: *const (), _: usize) {}

fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Held by the tests that rest the process's pool or need every one of its
/// threads: one at a time, or one's rest would take the threads from another.
#[cfg(test)]
pub(crate) fn one_test_at_a_time() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    lock(&TURN)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A rest that sleeps until woken, counting the sleeps.
    #[derive(Default)]
    struct Alarm {
        rung: Mutex<bool>,
        bell: Condvar,
        sleeps: AtomicUsize,
    }

    impl Rest for Alarm {
        fn sleep(&self) {
            self.sleeps.fetch_add(1, Ordering::SeqCst);
            let mut rung = lock(&self.rung);
            while !*rung {
                rung = self.bell.wait(rung).unwrap_or_else(PoisonError::into_inner);
            }
        }

        fn wake(&self) {
            *lock(&self.rung) = true;
            self.bell.notify_all();
        }
    }

    fn wait_until(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !what() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::yield_now();
        }
        true
    }

    #[test]
    fn every_range_is_done_once_whatever_the_pool_size() {
        for helpers in [0, 1, 3] {
            let pool = ComputePool::new(helpers, 100);
            for items in [1, 7, 64, 1000] {
                let done: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
                pool.run_chunks(items, |range| {
                    for i in range {
                        done[i].fetch_add(1, Ordering::Relaxed);
                    }
                });
                assert!(done.iter().all(|d| d.load(Ordering::Relaxed) == 1), "{helpers} helpers, {items} items");
            }
        }
    }

    #[test]
    fn the_caller_does_all_the_work_when_the_pool_threads_are_away() {
        let pool = ComputePool::new(2, 100);
        let alarm = Arc::new(Alarm::default());
        let resting = rested(&pool, &alarm);
        let me = std::thread::current().id();
        let others = AtomicUsize::new(0);
        // Returns although no pool thread can take part.
        pool.run_chunks(100, |_| {
            if std::thread::current().id() != me {
                others.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert_eq!(others.load(Ordering::Relaxed), 0);
        drop(resting);
        // Back from the rest, the pool threads take part again.
        assert_eq!(threads_that_come(&pool), [0, 1, 2]);
    }

    /// `pool` resting on `alarm`, once every one of its threads sleeps on it.
    fn rested<'a>(pool: &'a ComputePool, alarm: &Arc<Alarm>) -> Resting<'a> {
        let resting = pool.rest(alarm.clone());
        let helpers = pool.threads() - 1;
        assert!(wait_until(|| alarm.sleeps.load(Ordering::SeqCst) == helpers), "the pool threads went to rest");
        resting
    }

    /// The numbers of the threads that run an [`ComputePool::on_every_thread`].
    fn threads_that_come(pool: &ComputePool) -> Vec<usize> {
        let seen = Mutex::new(Vec::new());
        pool.on_every_thread(|thread| lock(&seen).push(thread));
        let mut seen = seen.into_inner().unwrap();
        seen.sort_unstable();
        seen
    }

    #[test]
    fn every_thread_comes_even_while_the_pool_rests_for_another_caller() {
        let pool = ComputePool::new(2, 100);
        let alarm = Arc::new(Alarm::default());
        let _resting = rested(&pool, &alarm);
        // Ends the rest rather than wait for it.
        assert_eq!(threads_that_come(&pool), [0, 1, 2]);
    }

    /// A rest whose sleep fails.
    #[derive(Default)]
    struct FailingRest {
        tried: AtomicBool,
    }

    impl Rest for FailingRest {
        fn sleep(&self) {
            self.tried.store(true, Ordering::SeqCst);
            panic!("the rest failed (as a test means it to)");
        }

        fn wake(&self) {}
    }

    #[test]
    fn a_rest_that_panics_leaves_its_threads_at_work() {
        let pool = ComputePool::new(1, 100);
        let rest = Arc::new(FailingRest::default());
        let resting = pool.rest(rest.clone());
        assert!(wait_until(|| rest.tried.load(Ordering::SeqCst)), "the pool thread went to rest");
        drop(resting);
        assert_eq!(threads_that_come(&pool), [0, 1]);
    }

    #[test]
    fn pool_threads_take_part_and_sleep_between_operations() {
        // A spin of one look: the threads sleep after each operation and are woken
        // for the next.
        let pool = ComputePool::new(2, 1);
        for _ in 0..200 {
            assert_eq!(threads_that_come(&pool), [0, 1, 2]);
        }
    }

    #[test]
    fn a_panic_on_a_pool_thread_reaches_the_caller_and_the_pool_goes_on() {
        let pool = ComputePool::new(1, 100);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.on_every_thread(|thread| {
                if thread == 0 {
                    panic!("a pool thread failed");
                }
            })
        }));
        assert!(caught.is_err());
        assert_eq!(items_done(&pool, 10), 10);
    }

    /// How many of `items` a [`ComputePool::run_chunks`] over them handed out.
    fn items_done(pool: &ComputePool, items: usize) -> usize {
        let done = AtomicUsize::new(0);
        pool.run_chunks(items, |range| {
            done.fetch_add(range.len(), Ordering::Relaxed);
        });
        done.into_inner()
    }

    #[test]
    fn an_operation_inside_an_operation_runs_inline() {
        let pool = ComputePool::new(1, 100);
        let inner = AtomicUsize::new(0);
        pool.run_chunks(4, |range| {
            for _ in range {
                pool.run_chunks(3, |r| {
                    inner.fetch_add(r.len(), Ordering::Relaxed);
                });
            }
        });
        assert_eq!(inner.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn many_callers_share_the_pool() {
        let pool = ComputePool::new(2, 1000);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..200 {
                        assert_eq!(items_done(&pool, 50), 50);
                    }
                });
            }
        });
    }
}
