//! Child processes of `strata demo` and `strata bench --workers`: started on
//! loopback ports they pick themselves, found by the lines they print, and always
//! stopped, by SIGTERM and then SIGKILL, when the guard is dropped (on success,
//! error or Ctrl-C). A child also ends if this process dies: SIGTERM on Linux, a
//! job object on Windows.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use std::sync::Arc;

use anyhow::{bail, Context};
use strata_trust::{Authority, Transport};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// A started child with its stdout lines.
pub struct Process {
    pub name: String,
    child: Child,
    lines: Option<Lines<BufReader<ChildStdout>>>,
}

impl Process {
    /// Starts `program` with stdout captured (stderr goes to ours).
    pub fn spawn(name: &str, program: &Path, args: &[String], envs: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = strata_platform::process::spawn_tied(&mut command)
            .with_context(|| format!("cannot start {}", program.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        Ok(Self { name: name.to_string(), child, lines: Some(BufReader::new(stdout).lines()) })
    }

    /// Reads lines until one starts with `prefix`, passing the others to `on_line`;
    /// fails if the child exits or `timeout` passes first.
    pub async fn wait_for_line(
        &mut self,
        prefix: &str,
        timeout: Duration,
        mut on_line: impl FnMut(&str),
    ) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let lines = self.lines.as_mut().with_context(|| format!("{}'s output is no longer read here", self.name))?;
        loop {
            let line = tokio::time::timeout_at(deadline, lines.next_line())
                .await
                .with_context(|| format!("{} printed no `{prefix}` line within {timeout:?}", self.name))??;
            match line {
                Some(line) if line.starts_with(prefix) => return Ok(line),
                Some(line) => on_line(&line),
                None => bail!("{} exited before printing `{prefix}`", self.name),
            }
        }
    }

    /// Its process id, while it has not been waited for (a test reads its memory
    /// from `/proc/<pid>/status`).
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// The value of `key=` in a line like `listening http=A grpc=B`.
    pub fn field(line: &str, key: &str) -> Option<String> {
        line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")).map(str::to_string))
    }

    /// Keeps reading the child's stdout in the background (logged at debug), so
    /// it never blocks on a full pipe.
    pub fn drain_output(&mut self) {
        if let Some(mut lines) = self.lines.take() {
            let name = self.name.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(child = %name, "{line}");
                }
            });
        }
    }

    /// SIGTERM, as `systemctl stop` would send it; does not wait. (Windows has no
    /// such request: there it ends the child at once.)
    pub fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            strata_platform::process::terminate(pid);
        }
    }

    /// SIGKILL, as a crash or a power cut would end it, without waiting (from any
    /// thread or runtime).
    pub fn kill_now(&self) {
        if let Some(pid) = self.child.id() {
            strata_platform::process::kill(pid);
        }
    }

    /// Waits up to `timeout` for it to exit; whether it did.
    pub async fn exited_within(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.child.wait()).await.is_ok()
    }

    /// SIGKILL, as a crash or a power cut would end it; waits for it to exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(mut self, grace: Duration) {
        self.terminate();
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}

/// Every child of a run; dropping it stops them all.
#[derive(Default)]
pub struct Children {
    pub processes: Vec<Process>,
    /// The cluster's CA when the workers started here join with a token; none:
    /// they run --insecure.
    pub trust: Option<LocalTrust>,
}

/// The trust of a cluster run on this machine: a CA made in a temporary folder
/// (the coordinator's state folder), and the token the workers get.
pub struct LocalTrust {
    dir: tempfile::TempDir,
    authority: Arc<Authority>,
}

impl LocalTrust {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let authority = Arc::new(Authority::open_or_create(&dir.path().join("coordinator"))?);
        Ok(Self { dir, authority })
    }

    /// The cluster's CA.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// `--state-dir` for a `strata serve` child.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("coordinator")
    }

    /// Makes this process the coordinator of the cluster (one run in-process).
    pub fn install_here(&self) -> anyhow::Result<()> {
        strata_trust::install(Transport::coordinator(self.authority.clone())?)?;
        Ok(())
    }

    /// A transport with the coordinator's rights in this cluster, not installed:
    /// for tests that call the workers themselves.
    pub fn coordinator_transport(&self) -> anyhow::Result<Transport> {
        Ok(Transport::coordinator(self.authority.clone())?)
    }

    /// The join token, for workers started elsewhere.
    pub fn token(&self) -> String {
        self.authority.token().to_string()
    }

    pub fn identity_dir(&self, worker: &str) -> PathBuf {
        self.dir.path().join("workers").join(worker)
    }
}

impl Children {
    /// Children whose workers join with a token of a CA made now.
    pub fn secured() -> anyhow::Result<Self> {
        Ok(Self { processes: Vec::new(), trust: Some(LocalTrust::new()?) })
    }

    /// [`Children::secured`], with this process as their coordinator (mutual TLS
    /// from here to the workers); plain TCP with `insecure`.
    pub fn with_coordinator_here(insecure: bool) -> anyhow::Result<Self> {
        if insecure {
            strata_trust::install(Transport::Insecure)?;
            return Ok(Self::default());
        }
        let children = Self::secured()?;
        if let Some(trust) = &children.trust {
            trust.install_here()?;
        }
        Ok(children)
    }

    /// Stops every child cleanly, the last started first.
    pub async fn stop_all(&mut self) {
        let processes: Vec<Process> = self.processes.drain(..).rev().collect();
        for p in processes {
            p.stop(Duration::from_secs(5)).await;
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        // Not stopped cleanly (an error or Ctrl-C): asked to stop now;
        // `kill_on_drop` then kills whatever is left as the handles drop.
        for p in &self.processes {
            p.terminate();
        }
    }
}

/// A binary that sits next to this one (`target/debug/strata-worker`), else on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Starts a `strata-worker` on a loopback port it picks, holding `model` locally, and
/// returns its gRPC address once it is listening. Workers sharing `compute_lock` take
/// turns computing instead of fighting over the same cores. They stay off mDNS: they
/// are named to the coordinator, and mDNS would join multicast groups on every
/// interface of this machine.
pub async fn start_local_worker(
    children: &mut Children,
    name: &str,
    model: &Path,
    threads: usize,
    compute_lock: Option<&Path>,
) -> anyhow::Result<String> {
    start_local_worker_on(children, name, model, threads, compute_lock, "cpu").await
}

/// [`start_local_worker`] computing on `device` (`cpu`, `cuda:N`).
pub async fn start_local_worker_on(
    children: &mut Children,
    name: &str,
    model: &Path,
    threads: usize,
    compute_lock: Option<&Path>,
    device: &str,
) -> anyhow::Result<String> {
    let mut args: Vec<String> = vec![
        "--device".into(),
        device.to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--model".into(),
        model.display().to_string(),
        "--threads".into(),
        threads.to_string(),
        "--name".into(),
        name.to_string(),
        "--no-mdns".into(),
    ];
    if let Some(lock) = compute_lock {
        args.extend(["--compute-lock".into(), lock.display().to_string()]);
    }
    let log = std::env::var("STRATA_LOG").unwrap_or_else(|_| "warn".into());
    let mut env = vec![("STRATA_LOG", log)];
    match &children.trust {
        Some(trust) => {
            // In the environment: the token stays out of the process list.
            env.push(("STRATA_TOKEN", trust.token()));
            args.extend(["--identity-dir".into(), trust.identity_dir(name).display().to_string()]);
        }
        None => args.push("--insecure".into()),
    }
    let mut p = Process::spawn(name, &sibling_binary("strata-worker"), &args, &env)?;
    let line = p.wait_for_line("worker listening", std::time::Duration::from_secs(120), |_| {}).await?;
    let address = Process::field(&line, "grpc").context("no grpc= in the worker's line")?;
    p.drain_output();
    children.processes.push(p);
    Ok(address)
}
