//! Yielding the machine to the person at it: with `--yield-to-processes`,
//! `--yield-to-gpu-users` or `--yield-to-fullscreen` the worker drains itself (as
//! `strata-worker drain` does) while a named program runs, another process keeps the
//! GPU busy or a full-screen program has the foreground, and comes back once nothing
//! watched has been seen for `--yield-idle`.
//!
//! The parts, so that the rule can be tested without processes or a GPU:
//!
//! * [`Watch`]: the rule, a state machine fed with what each poll saw and when;
//! * [`ActivitySource`]: what wants the machine now: [`ProcessWatch`] (the process
//!   list, through sysinfo), [`GpuUsers`] (NVML, loaded at run time) and
//!   [`FullscreenWatch`] (the foreground window, on Windows);
//! * [`spawn`] / [`watch_with`]: the task that polls the sources on a blocking thread
//!   and hands the decisions to the worker's [`Drain`], whose causes keep the end of
//!   a yield from undoing a drain someone asked for.
//!
//! An undrain by hand (`strata-worker undrain`, `strata undrain NODE`) while a watched
//! program runs ends the yield and is respected: the worker does not yield again until
//! what it saw has been gone for `--yield-idle` (the same measure of "gone" that ends
//! a yield), so a person can keep the worker serving through a game; the next game
//! yields again.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::config::YieldConfig;
use crate::drain::{Drain, DrainCauses};

/// The share of a GPU's SMs another process must keep busy to count as using it: a
/// desktop compositor or a video in a browser stay below it, a game does not.
const GPU_BUSY_PERCENT: u32 = 10;

/// What the watcher does after a poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Something watched appeared: drain, for this reason.
    Yield(String),
    /// Still yielding, to something else now.
    Reason(String),
    /// Nothing watched for the idle time: the yield ends.
    Return,
    /// Someone undrained the worker while something watched ran: no yield until it
    /// has been gone for the idle time.
    Overruled,
    /// What was overruled has been gone for the idle time: the next one yields.
    Rearmed,
}

impl Decision {
    /// Applies the decision to the drain causes. A new reason only replaces the old
    /// one: were the yield ended by hand since the poll, it must not start again.
    pub fn apply(&self, causes: &mut DrainCauses) {
        match self {
            Decision::Yield(reason) => causes.yielding = Some(reason.clone()),
            Decision::Reason(reason) => {
                if causes.yielding.is_some() {
                    causes.yielding = Some(reason.clone());
                }
            }
            Decision::Return => causes.yielding = None,
            Decision::Nothing | Decision::Overruled | Decision::Rearmed => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Nothing watched runs, or it has been gone for the idle time.
    Clear,
    /// The watcher drained the worker; something watched last ran at `last_seen`.
    Yielded { last_seen: Instant, reason: String },
    /// The yield was ended by hand; something watched last ran at `last_seen`.
    Overruled { last_seen: Instant },
}

/// The rule: yield at once when something watched appears, come back after the
/// idle time without it, and leave a person's undrain alone until it is gone.
#[derive(Debug, Clone)]
pub struct Watch {
    idle: Duration,
    phase: Phase,
}

impl Watch {
    pub fn new(idle: Duration) -> Self {
        Self { idle, phase: Phase::Clear }
    }

    /// One poll at `now`: `seen` describes what wants the machine (empty: nothing),
    /// `held` is whether the worker still yields (false once someone undrained it).
    pub fn step(&mut self, now: Instant, seen: &[String], held: bool) -> Decision {
        let active = !seen.is_empty();
        let idle = self.idle;
        let gone_long_enough = |last_seen: Instant| now.saturating_duration_since(last_seen) >= idle;
        match &mut self.phase {
            Phase::Clear if active => {
                let reason = describe(seen);
                self.phase = Phase::Yielded { last_seen: now, reason: reason.clone() };
                Decision::Yield(reason)
            }
            Phase::Clear => Decision::Nothing,
            Phase::Yielded { last_seen, .. } if !held => {
                let last_seen = if active { now } else { *last_seen };
                self.phase = Phase::Overruled { last_seen };
                Decision::Overruled
            }
            Phase::Yielded { last_seen, reason } if active => {
                *last_seen = now;
                let now_reason = describe(seen);
                if now_reason == *reason {
                    Decision::Nothing
                } else {
                    *reason = now_reason.clone();
                    Decision::Reason(now_reason)
                }
            }
            Phase::Yielded { last_seen, .. } if gone_long_enough(*last_seen) => {
                self.phase = Phase::Clear;
                Decision::Return
            }
            Phase::Yielded { .. } => Decision::Nothing,
            Phase::Overruled { last_seen } if active => {
                *last_seen = now;
                Decision::Nothing
            }
            Phase::Overruled { last_seen } if gone_long_enough(*last_seen) => {
                self.phase = Phase::Clear;
                Decision::Rearmed
            }
            Phase::Overruled { .. } => Decision::Nothing,
        }
    }
}

/// `game.exe (pid 4), steam.exe (pid 9) and 2 more`.
fn describe(seen: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = seen.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if seen.len() > SHOWN {
        text.push_str(&format!(" and {} more", seen.len() - SHOWN));
    }
    text
}

/// Something that can tell what wants the machine now.
pub trait ActivitySource: Send {
    /// One description per thing seen (`game.exe (pid 4)`), in a stable order; empty
    /// when nothing is. May block: it runs on a blocking thread.
    fn poll(&mut self) -> Vec<String>;
}

/// `Steam.EXE` → `steam`: how names are compared.
fn normalize(name: &str) -> String {
    let lower = name.trim().to_lowercase();
    match lower.strip_suffix(".exe") {
        Some(stem) => stem.to_string(),
        None => lower,
    }
}

/// Linux keeps only the first 15 bytes of a process's name (`TASK_COMM_LEN`).
const LINUX_NAME_BYTES: usize = 15;

/// Whether a process with `name` (and executable file name `exe`, where readable)
/// is one of `wanted` (normalized).
fn is_watched(wanted: &[String], name: &str, exe: Option<&str>) -> bool {
    let name = normalize(name);
    let exe = exe.map(normalize);
    wanted.iter().any(|w| {
        *w == name
            || exe.as_ref() == Some(w)
            // The executable of another user's process cannot be read: a long name
            // is then known only by its cut-off start.
            || (cfg!(target_os = "linux") && name.len() == LINUX_NAME_BYTES && w.starts_with(&name))
    })
}

/// The processes whose names are watched, from the process list.
pub struct ProcessWatch {
    wanted: Vec<String>,
    system: sysinfo::System,
    own: sysinfo::Pid,
}

impl ProcessWatch {
    pub fn new(names: &[String]) -> Self {
        // sysinfo otherwise keeps a /proc file open per process, up to half the
        // descriptor limit, which the gRPC server needs more.
        sysinfo::set_open_files_limit(0);
        Self {
            wanted: names.iter().map(|n| normalize(n)).filter(|n| !n.is_empty()).collect(),
            system: sysinfo::System::new(),
            own: sysinfo::Pid::from_u32(std::process::id()),
        }
    }
}

impl ActivitySource for ProcessWatch {
    fn poll(&mut self) -> Vec<String> {
        use sysinfo::{ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, UpdateKind};
        // Names come with every refresh; the executable's path is read once per
        // process; threads are not listed.
        let refresh = ProcessRefreshKind::nothing().without_tasks().with_exe(UpdateKind::OnlyIfNotSet);
        self.system.refresh_processes_specifics(ProcessesToUpdate::All, true, refresh);
        let mut seen: Vec<(u32, String)> = self
            .system
            .processes()
            .iter()
            .filter(|(pid, p)| **pid != self.own && !matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead))
            .filter_map(|(pid, p)| {
                let name = p.name().to_string_lossy();
                let exe = p.exe().and_then(|e| e.file_name()).map(OsStr::to_string_lossy);
                is_watched(&self.wanted, &name, exe.as_deref())
                    .then(|| (pid.as_u32(), format!("{} (pid {pid})", exe.as_deref().unwrap_or(&name))))
            })
            .collect();
        seen.sort();
        seen.into_iter().map(|(_, text)| text).collect()
    }
}

/// NVML's library, by the names the driver installs it under.
const NVML_LIBRARIES: &[&str] = strata_platform::nvidia::NVML;

/// Processes other than this worker that keep a GPU busy, through NVML.
///
/// NVML is loaded when the watch starts; without it (no NVIDIA driver) there is no
/// watch, never a failed start. Every call runs inside `catch_unwind`, as the CUDA
/// calls in [`crate::devices`] do.
pub struct GpuUsers {
    nvml: nvml_wrapper::Nvml,
    /// NVML indices of the GPUs watched.
    devices: Vec<u32>,
    own: u32,
    /// Per GPU: the newest utilization sample read, so a poll reads only newer ones.
    since: Vec<Option<u64>>,
    /// Per GPU: utilization samples are not supported, so any process in the compute
    /// list counts (graphics-only users are then not seen).
    listed_only: Vec<bool>,
    warned: bool,
}

impl GpuUsers {
    /// NVML and the GPUs to watch: the worker's (`--device cuda:N`), else every GPU
    /// (a CPU worker yields when the person at the machine uses any); or why there is
    /// nothing to watch.
    pub fn open(device: &str) -> Result<Self, String> {
        catch_unwind(AssertUnwindSafe(|| Self::open_inner(device)))
            .unwrap_or_else(|_| Err("NVML could not be used (see the panic above)".into()))
    }

    fn open_inner(device: &str) -> Result<Self, String> {
        let nvml = load_nvml()?;
        let count = nvml.device_count().map_err(|e| format!("NVML cannot count the GPUs: {e}"))?;
        if count == 0 {
            return Err("NVML sees no GPU".into());
        }
        let devices = match crate::devices::cuda_ordinal(device) {
            None => (0..count).collect(),
            Some(ordinal) => {
                let index = crate::devices::cuda_uuid(ordinal)
                    .and_then(|uuid| nvml.device_by_uuid(uuid).ok())
                    .and_then(|d| d.index().ok());
                match index {
                    Some(index) => vec![index],
                    None => {
                        tracing::warn!(device, "cannot find this GPU in NVML; watching every GPU");
                        (0..count).collect()
                    }
                }
            }
        };
        Ok(Self {
            since: vec![None; devices.len()],
            listed_only: vec![false; devices.len()],
            devices,
            nvml,
            own: std::process::id(),
            warned: false,
        })
    }

    fn users(&mut self) -> Result<Vec<String>, nvml_wrapper::error::NvmlError> {
        use nvml_wrapper::error::NvmlError;
        let mut pids = BTreeSet::new();
        for (slot, &index) in self.devices.iter().enumerate() {
            let device = self.nvml.device_by_index(index)?;
            if !self.listed_only[slot] {
                match device.process_utilization_stats(self.since[slot]) {
                    Ok(samples) => {
                        if let Some(newest) = samples.iter().map(|s| s.timestamp).max() {
                            self.since[slot] = Some(newest);
                        }
                        pids.extend(samples.iter().filter(|s| s.sm_util >= GPU_BUSY_PERCENT).map(|s| s.pid));
                        continue;
                    }
                    // No sample since the last poll: nothing ran.
                    Err(NvmlError::NotFound) => continue,
                    Err(NvmlError::NotSupported) => {
                        tracing::info!(index, "this GPU has no per-process utilization; any compute process counts");
                        self.listed_only[slot] = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            pids.extend(device.running_compute_processes()?.into_iter().map(|p| p.pid));
        }
        pids.remove(&self.own);
        Ok(pids
            .into_iter()
            .map(|pid| {
                let name = self.nvml.sys_process_name(pid, 256).unwrap_or_else(|_| "a process".into());
                format!("{name} (pid {pid}) on the GPU")
            })
            .collect())
    }
}

impl ActivitySource for GpuUsers {
    fn poll(&mut self) -> Vec<String> {
        match catch_unwind(AssertUnwindSafe(|| self.users())) {
            Ok(Ok(users)) => users,
            failed => {
                // Once: a driver that fails keeps failing, every second.
                if !self.warned {
                    let error = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => "a panic (see above)".into(),
                    };
                    tracing::warn!(%error, "cannot read the GPU's processes; GPU users are not seen");
                    self.warned = true;
                }
                Vec::new()
            }
        }
    }
}

fn load_nvml() -> Result<nvml_wrapper::Nvml, String> {
    let mut errors = Vec::new();
    for library in NVML_LIBRARIES {
        match nvml_wrapper::Nvml::builder().lib_path(OsStr::new(library)).init() {
            Ok(nvml) => return Ok(nvml),
            // dlopen's own message names the file and why.
            Err(nvml_wrapper::error::NvmlError::LibloadingError(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(format!("{library}: {e}")),
        }
    }
    Err(format!("no NVML, so no NVIDIA driver here ({})", errors.join("; ")))
}

/// A full-screen program in the foreground, on Windows: how most games look.
pub struct FullscreenWatch;

impl FullscreenWatch {
    /// The watch, or why it cannot work here (another system; a service, which sees
    /// no desktop).
    pub fn open() -> Result<Self, String> {
        strata_platform::foreground::watchable().map(|()| Self)
    }
}

impl ActivitySource for FullscreenWatch {
    fn poll(&mut self) -> Vec<String> {
        strata_platform::foreground::fullscreen_program()
            .map(|program| format!("{program} (full screen)"))
            .into_iter()
            .collect()
    }
}

/// The sources `config` asks for; one that cannot work is left out with a warning.
fn open_sources(config: &YieldConfig, device: &str) -> Vec<Box<dyn ActivitySource>> {
    let mut sources: Vec<Box<dyn ActivitySource>> = Vec::new();
    if !config.processes.is_empty() {
        tracing::info!(processes = ?config.processes, idle = ?config.idle, "yielding while these programs run");
        sources.push(Box::new(ProcessWatch::new(&config.processes)));
    }
    if config.gpu_users {
        match GpuUsers::open(device) {
            Ok(gpu) => {
                tracing::info!(nvml_gpus = ?gpu.devices, idle = ?config.idle, "yielding while another process uses the GPU");
                sources.push(Box::new(gpu));
            }
            Err(why) => tracing::warn!(%why, "--yield-to-gpu-users does nothing on this machine"),
        }
    }
    if config.fullscreen {
        match FullscreenWatch::open() {
            Ok(watch) => {
                tracing::info!(idle = ?config.idle, "yielding while a full-screen program has the foreground");
                sources.push(Box::new(watch));
            }
            Err(why) => tracing::warn!(%why, "--yield-to-fullscreen does nothing here"),
        }
    }
    sources
}

/// Starts the watcher when `config` asks for one; it drains `drain` while something
/// watched runs, until `stop`. `device` is the worker's (`cuda:N` picks the GPU NVML
/// watches).
pub fn spawn(drain: Drain, config: &YieldConfig, device: &str, stop: watch::Receiver<bool>) -> Option<JoinHandle<()>> {
    if !config.is_on() {
        return None;
    }
    let yielding = config.clone();
    let device = device.to_string();
    Some(tokio::spawn(async move {
        let opening = yielding.clone();
        // Loading NVML blocks: it opens a library and calls into the driver.
        let sources = match tokio::task::spawn_blocking(move || open_sources(&opening, &device)).await {
            Ok(sources) if sources.is_empty() => return,
            Ok(sources) => sources,
            Err(e) => {
                tracing::warn!(error = %e, "the yield watcher could not start; the worker does not yield");
                return;
            }
        };
        watch_with(drain, sources, yielding, stop).await;
    }))
}

/// Polls `sources` every `config.poll` and drains or undrains `drain`, until `stop`.
pub async fn watch_with(
    drain: Drain,
    mut sources: Vec<Box<dyn ActivitySource>>,
    config: YieldConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut watch = Watch::new(config.idle);
    let mut ticks = tokio::time::interval(config.poll);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            // A dropped sender means the worker is gone too.
            _ = stop.wait_for(|s| *s) => return,
        }
        // sysinfo reads /proc and NVML calls the driver: both block.
        let polled = tokio::task::spawn_blocking(move || {
            let seen: Vec<String> = sources.iter_mut().flat_map(|s| s.poll()).collect();
            (sources, seen)
        })
        .await;
        let seen;
        (sources, seen) = match polled {
            Ok(polled) => polled,
            Err(e) => {
                tracing::warn!(error = %e, "the yield watcher failed; the worker no longer yields");
                drain.change(|c| c.yielding = None);
                return;
            }
        };
        let held = drain.causes().yielding.is_some();
        let decision = watch.step(Instant::now(), &seen, held);
        if decision == Decision::Nothing {
            continue;
        }
        drain.change(|c| decision.apply(c));
        log(&decision, &drain.causes(), config.idle);
    }
}

fn log(decision: &Decision, causes: &DrainCauses, idle: Duration) {
    match decision {
        Decision::Nothing => {}
        Decision::Yield(reason) => {
            tracing::info!(%reason, ?idle, "yielding the machine: draining until nothing watched has run for the idle time")
        }
        Decision::Reason(reason) => tracing::debug!(%reason, "still yielding"),
        Decision::Return if causes.asked => {
            tracing::info!(
                ?idle,
                "nothing watched has run for the idle time; the worker stays drained, as it was asked"
            )
        }
        Decision::Return => tracing::info!(?idle, "nothing watched has run for the idle time; back in service"),
        Decision::Overruled => tracing::info!(
            ?idle,
            "undrained by hand while yielding; no yield until what runs has been gone for the idle time"
        ),
        Decision::Rearmed => tracing::info!("what ran through the undrain by hand is gone; the next one yields again"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// The watch and the worker's drain causes, on a clock the test moves.
    struct Machine {
        watch: Watch,
        causes: DrainCauses,
        start: Instant,
    }

    impl Machine {
        fn new(idle: Duration) -> Self {
            Self { watch: Watch::new(idle), causes: DrainCauses::default(), start: Instant::now() }
        }

        /// A poll `at` seconds in, seeing `seen`, applied as the watcher applies it.
        fn poll(&mut self, at: u64, seen: &[&str]) -> Decision {
            let seen: Vec<String> = seen.iter().map(|s| s.to_string()).collect();
            let held = self.causes.yielding.is_some();
            let decision = self.watch.step(self.start + secs(at), &seen, held);
            decision.apply(&mut self.causes);
            decision
        }
    }

    const GAME: &str = "game.exe (pid 4)";

    #[test]
    fn a_watched_program_drains_at_once_and_the_worker_returns_after_the_idle_time() {
        let mut m = Machine::new(secs(60));
        assert_eq!(m.poll(0, &[]), Decision::Nothing);
        assert_eq!(m.poll(1, &[GAME]), Decision::Yield(GAME.into()));
        assert!(m.causes.draining());
        assert_eq!(m.causes.reason(), "yielding to game.exe (pid 4)");
        assert_eq!(m.poll(2, &[GAME]), Decision::Nothing);
        // Gone at 3 s, last seen at 2 s: back at 62 s, not before.
        for at in [3, 30, 61] {
            assert_eq!(m.poll(at, &[]), Decision::Nothing, "at {at}s");
            assert!(m.causes.draining(), "at {at}s");
        }
        assert_eq!(m.poll(62, &[]), Decision::Return);
        assert!(!m.causes.draining());
        assert_eq!(m.causes.reason(), "");
        assert_eq!(m.poll(63, &[GAME]), Decision::Yield(GAME.into()), "the next game yields again");
    }

    #[test]
    fn a_gap_shorter_than_the_idle_time_does_not_end_the_yield() {
        let mut m = Machine::new(secs(10));
        m.poll(0, &[GAME]);
        m.poll(9, &[]);
        assert_eq!(m.poll(9, &[GAME]), Decision::Nothing, "back within the idle time");
        assert_eq!(m.poll(18, &[]), Decision::Nothing, "the idle time counts from the last sighting");
        assert_eq!(m.poll(19, &[]), Decision::Return);
    }

    #[test]
    fn the_reason_follows_what_runs() {
        let mut m = Machine::new(secs(10));
        m.poll(0, &[GAME]);
        let both = ["game.exe (pid 4)", "steam.exe (pid 9)"];
        assert_eq!(m.poll(1, &both), Decision::Reason("game.exe (pid 4), steam.exe (pid 9)".into()));
        assert_eq!(m.poll(2, &["steam.exe (pid 9)"]), Decision::Reason("steam.exe (pid 9)".into()));
        assert_eq!(m.causes.yielding.as_deref(), Some("steam.exe (pid 9)"));
        let many = ["a (pid 1)", "b (pid 2)", "c (pid 3)", "d (pid 4)", "e (pid 5)"];
        assert_eq!(m.poll(3, &many), Decision::Reason("a (pid 1), b (pid 2), c (pid 3) and 2 more".into()));
    }

    #[test]
    fn the_end_of_a_yield_does_not_undo_a_drain_someone_asked_for() {
        // Asked before the game started.
        let mut m = Machine::new(secs(5));
        m.causes.ask(true);
        assert_eq!(m.poll(0, &[GAME]), Decision::Yield(GAME.into()));
        assert_eq!(m.poll(10, &[]), Decision::Return);
        assert!(m.causes.draining() && m.causes.asked && m.causes.yielding.is_none());
        // Asked while yielding.
        let mut m = Machine::new(secs(5));
        m.poll(0, &[GAME]);
        m.causes.ask(true);
        assert_eq!(m.poll(1, &[GAME]), Decision::Nothing);
        assert_eq!(m.poll(10, &[]), Decision::Return);
        assert!(m.causes.draining());
        // Only the person's undrain brings it back.
        m.causes.ask(false);
        assert!(!m.causes.draining());
    }

    #[test]
    fn an_undrain_by_hand_during_a_game_holds_until_the_game_has_gone() {
        let mut m = Machine::new(secs(5));
        m.poll(0, &[GAME]);
        m.causes.ask(false);
        assert!(!m.causes.draining(), "the undrain ends the yield at once");
        assert_eq!(m.poll(1, &[GAME]), Decision::Overruled);
        assert!(!m.causes.draining(), "no drain again while the game runs");
        assert_eq!(m.poll(2, &[GAME]), Decision::Nothing);
        // A short gap (the game restarting) is the same game.
        assert_eq!(m.poll(4, &[]), Decision::Nothing);
        assert_eq!(m.poll(5, &["game.exe (pid 7)"]), Decision::Nothing);
        assert!(!m.causes.draining());
        assert_eq!(m.poll(9, &[]), Decision::Nothing);
        assert_eq!(m.poll(10, &[]), Decision::Rearmed);
        assert!(!m.causes.draining());
        assert_eq!(m.poll(11, &[GAME]), Decision::Yield(GAME.into()), "the next game yields again");
        assert!(m.causes.draining());
    }

    #[test]
    fn an_undrain_between_a_poll_and_its_new_reason_is_not_undone() {
        let mut causes = DrainCauses::default();
        Decision::Yield(GAME.into()).apply(&mut causes);
        causes.ask(false);
        Decision::Reason("steam.exe (pid 9)".into()).apply(&mut causes);
        assert!(!causes.draining());
    }

    #[test]
    fn names_match_without_case_or_exe() {
        let wanted: Vec<String> = ["game.exe", "Steam", "strata-fake-game"].iter().map(|n| normalize(n)).collect();
        assert!(is_watched(&wanted, "Game.EXE", None));
        assert!(is_watched(&wanted, "game", None));
        assert!(is_watched(&wanted, "steam.exe", None));
        assert!(is_watched(&wanted, "sleep", Some("STEAM.exe")), "by the executable's name");
        assert!(!is_watched(&wanted, "steamwebhelper", None));
        assert!(!is_watched(&wanted, "gam", None));
        assert!(!is_watched(&wanted, "game.exe.bak", None));
        assert_eq!(is_watched(&wanted, "strata-fake-gam", None), cfg!(target_os = "linux"), "Linux cuts names");
        assert!(!is_watched(&wanted, "strata-fake", None), "only a full-length cut name");
    }

    /// A copy of `sleep` under a watched name is seen while it runs, and not once it
    /// has exited.
    #[cfg(unix)]
    #[test]
    fn the_process_list_sees_a_watched_program_come_and_go() {
        let dir = tempfile::tempdir().unwrap();
        let game = dir.path().join("strata-yield-unit-game");
        std::fs::copy("/bin/sleep", &game).unwrap();
        let mut watch = ProcessWatch::new(&["STRATA-YIELD-UNIT-GAME.exe".to_string()]);
        assert_eq!(watch.poll(), Vec::<String>::new());
        let mut child = std::process::Command::new(&game).arg("600").spawn().unwrap();
        let seen = watch.poll();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(seen, vec![format!("strata-yield-unit-game (pid {})", child.id())]);
        assert_eq!(watch.poll(), Vec::<String>::new());
    }

    /// Without NVML (this build machine) the GPU watch explains itself and is left
    /// out; with it, it opens.
    #[test]
    fn no_nvml_means_no_gpu_watch_and_a_reason() {
        match GpuUsers::open("cpu") {
            Ok(mut gpu) => {
                let _ = gpu.poll();
            }
            Err(why) => assert!(why.contains("NVML"), "{why}"),
        }
        let config = YieldConfig { gpu_users: true, ..YieldConfig::default() };
        let sources = open_sources(&config, "cuda:0");
        assert!(sources.len() <= 1);
    }

    /// What the fake source shows, and how many polls have read it.
    #[derive(Clone, Default)]
    struct Fake {
        seen: Arc<Mutex<Vec<String>>>,
        polls: Arc<AtomicUsize>,
    }

    impl ActivitySource for Fake {
        fn poll(&mut self) -> Vec<String> {
            let seen = self.seen.lock().unwrap().clone();
            self.polls.fetch_add(1, Ordering::SeqCst);
            seen
        }
    }

    impl Fake {
        fn show(&self, seen: &[&str]) {
            *self.seen.lock().unwrap() = seen.iter().map(|s| s.to_string()).collect();
        }

        /// Waits until a few polls have run after now.
        async fn polled(&self) {
            let target = self.polls.load(Ordering::SeqCst) + 3;
            wait_until("three more polls", || self.polls.load(Ordering::SeqCst) >= target).await;
        }
    }

    async fn wait_until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The watcher task drives the worker's drain state: it drains and comes back,
    /// leaves a requested drain alone, and respects an undrain by hand.
    #[tokio::test]
    async fn the_watcher_drains_and_undrains_the_service() {
        let (stop_tx, stop) = watch::channel(false);
        let drain = Drain::default();
        let fake = Fake::default();
        let config =
            YieldConfig { idle: Duration::from_millis(100), poll: Duration::from_millis(10), ..YieldConfig::default() };
        let task = tokio::spawn(watch_with(drain.clone(), vec![Box::new(fake.clone())], config, stop));

        fake.show(&[GAME]);
        wait_until("the yield", || drain.is_draining()).await;
        assert_eq!(drain.causes().reason(), "yielding to game.exe (pid 4)");
        fake.show(&[]);
        wait_until("the return", || !drain.is_draining()).await;
        assert_eq!(drain.causes().reason(), "");

        // A drain asked for outlives the yield.
        assert!(drain.ask(true));
        fake.show(&[GAME]);
        wait_until("the yield", || drain.causes().yielding.is_some()).await;
        fake.show(&[]);
        wait_until("the end of the yield", || drain.causes().yielding.is_none()).await;
        fake.polled().await;
        assert!(drain.is_draining(), "the watcher undid a requested drain");
        assert!(drain.ask(false));

        // An undrain by hand during the game holds until the game has gone.
        fake.show(&[GAME]);
        wait_until("the yield", || drain.is_draining()).await;
        assert!(drain.ask(false));
        fake.polled().await;
        assert!(!drain.is_draining(), "the watcher drained again while the game ran");
        fake.show(&[]);
        fake.polled().await;
        fake.show(&[GAME]);
        fake.polled().await;
        assert!(!drain.is_draining(), "a short gap is the same game");
        // (That the next game yields again, once this one has been gone for the idle
        // time, the rule's own tests show.)
        let _ = stop_tx.send(true);
        task.await.unwrap();
    }
}
