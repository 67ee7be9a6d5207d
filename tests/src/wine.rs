//! The Windows worker under Wine, beside Linux processes on loopback: finding the
//! `.exe` and the prepared prefix that `scripts/windows-check` leaves in the cache
//! folder, and launching Windows programs in it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How a worker process is started when it is not the Linux `strata-worker`.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// What runs (`wine`).
    pub program: PathBuf,
    /// Its arguments before the worker's own (the `.exe`).
    pub leading_args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
}

/// The Windows build and a Wine prefix it runs in.
#[derive(Debug, Clone)]
pub struct Wine {
    pub prefix: PathBuf,
    /// `strata-worker.exe`.
    pub worker: PathBuf,
}

/// `$XDG_CACHE_HOME/strata`, else `~/.cache/strata`: where the script leaves them.
fn cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("strata")
}

/// The newest modification time of a source file of the crates the worker is built
/// from, to tell a stale `.exe`.
fn newest_source(root: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut folders: Vec<PathBuf> = ["worker", "platform", "proto", "model", "discovery"]
        .iter()
        .map(|c| root.join(c).join("src"))
        .collect();
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).ok()?.flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if let Ok(modified) = entry.metadata().and_then(|m| m.modified()) {
                newest = newest.max(Some(modified));
            }
        }
    }
    newest
}

impl Wine {
    /// The `.exe` and the prefix, or why the Wine tests cannot run (they then say
    /// SKIPPED): no Wine, no Windows build, or one older than the sources.
    pub fn find() -> Result<Self, String> {
        let run_script = "run scripts/windows-check first (it builds the .exe and prepares Wine)";
        if Command::new("wine").arg("--version").output().is_err() {
            return Err(format!("wine is not installed; {run_script}"));
        }
        let target = std::env::var_os("STRATA_WINDOWS_TARGET_DIR").map_or_else(|| cache().join("target-windows"), PathBuf::from);
        let worker = target.join("x86_64-pc-windows-gnu").join("release").join("strata-worker.exe");
        let prefix = std::env::var_os("STRATA_WINE_PREFIX").map_or_else(|| cache().join("wine"), PathBuf::from);
        let built = std::fs::metadata(&worker).and_then(|m| m.modified()).map_err(|_| {
            format!("{} is missing; {run_script}", worker.display())
        })?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("."));
        if newest_source(root).is_some_and(|newest| newest > built) {
            return Err(format!("{} is older than the sources; {run_script}", worker.display()));
        }
        if !prefix.join("drive_c/windows/system32/bcryptprimitives.dll").is_file() {
            return Err(format!("the Wine prefix {} is not prepared; {run_script}", prefix.display()));
        }
        Ok(Self { prefix, worker })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![("WINEPREFIX", self.prefix.display().to_string()), ("WINEDEBUG", "-all".into())]
    }

    /// Starts `strata-worker.exe` in place of the Linux worker.
    pub fn worker_launcher(&self) -> Launcher {
        Launcher { program: "wine".into(), leading_args: vec![self.worker.display().to_string()], env: self.env() }
    }

    /// A command running the Windows program `exe` with `args`.
    pub fn command(&self, exe: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("wine");
        command.arg(exe).args(args).envs(self.env());
        command
    }

    /// Runs the Windows worker with `args` to completion.
    pub fn run_worker(&self, args: &[&str]) -> std::io::Result<Output> {
        self.command(&self.worker, args).output()
    }

    /// Builds a stand-in "game" (a program that only sleeps) as `dir/name`, with
    /// mingw, which the Windows build needs anyway.
    pub fn build_sleeper(&self, dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
        let source = dir.join("sleeper.c");
        std::fs::write(&source, "#include <windows.h>\nint main(void) { Sleep(600000); return 0; }\n")?;
        let exe = dir.join(name);
        let status = Command::new("x86_64-w64-mingw32-gcc").arg("-o").arg(&exe).arg(&source).status()?;
        anyhow::ensure!(status.success(), "mingw could not build the stand-in game: {status}");
        Ok(exe)
    }

    /// Ends every Windows process of the prefix and its server.
    pub fn shut_down(&self) {
        let _ = Command::new("wineserver").arg("-k").envs(self.env()).status();
    }
}
