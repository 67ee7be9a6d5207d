//! Starting a child that ends with this process, and ending another process by
//! its id.

/// Starts `command` so that the child ends when this process ends, however that
/// happens (a crash included): on Linux the child gets SIGTERM when its parent dies
/// (`PR_SET_PDEATHSIG`); on Windows it joins a job object that kills its processes
/// when the last handle to it, held by this process, closes.
pub fn spawn_tied(command: &mut tokio::process::Command) -> std::io::Result<tokio::process::Child> {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = command.spawn()?;
    #[cfg(windows)]
    if let Some(handle) = child.raw_handle() {
        job::adopt(handle);
    }
    Ok(child)
}

#[cfg(windows)]
mod job {
    use std::sync::OnceLock;

    use windows_sys::Win32::System::JobObjects::{
        AssignProcessToJobObject, CreateJobObjectW, JobObjectExtendedLimitInformation, SetInformationJobObject,
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION, JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE,
    };

    /// The job this process's tied children join, as an address-sized integer (a
    /// raw handle is not `Sync`); never closed, so it closes when this process ends.
    static JOB: OnceLock<Option<usize>> = OnceLock::new();

    pub(super) fn job() -> Option<usize> {
        *JOB.get_or_init(|| {
            // SAFETY: a nameless job with default security; the limit structure is
            // zeroed, then given its one flag, and passed with its size.
            unsafe {
                let job = CreateJobObjectW(std::ptr::null(), std::ptr::null());
                if job.is_null() {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "cannot create a job object; children may outlive this process");
                    return None;
                }
                let mut limits: JOBOBJECT_EXTENDED_LIMIT_INFORMATION = std::mem::zeroed();
                limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
                let ok = SetInformationJobObject(
                    job,
                    JobObjectExtendedLimitInformation,
                    (&limits as *const JOBOBJECT_EXTENDED_LIMIT_INFORMATION).cast(),
                    std::mem::size_of::<JOBOBJECT_EXTENDED_LIMIT_INFORMATION>() as u32,
                );
                if ok == 0 {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "cannot set the job object's limits; children may outlive this process");
                }
                Some(job as usize)
            }
        })
    }

    pub fn adopt(process: std::os::windows::io::RawHandle) {
        let Some(job) = job() else { return };
        // SAFETY: both handles are live: the job is never closed, the child's is
        // held by its `Child`.
        if unsafe { AssignProcessToJobObject(job as _, process as _) } == 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot put a child in this process's job; it may outlive this process");
        }
    }
}

/// Asks the process to stop: SIGTERM on Unix (it may shut down cleanly). Windows
/// has no such request for a process without a console of its own to share, so
/// there it is ended at once, as [`kill`] does.
pub fn terminate(pid: u32) {
    #[cfg(unix)]
    signal(pid, libc::SIGTERM);
    #[cfg(windows)]
    end(pid);
}

/// Ends the process at once, as a crash or a power cut would (SIGKILL on Unix,
/// TerminateProcess on Windows). Failures (it has exited already) are ignored.
pub fn kill(pid: u32) {
    #[cfg(unix)]
    signal(pid, libc::SIGKILL);
    #[cfg(windows)]
    end(pid);
}

#[cfg(unix)]
fn signal(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) takes plain integers and touches no memory.
    unsafe {
        libc::kill(pid, signal);
    }
}

#[cfg(windows)]
fn end(pid: u32) {
    use windows_sys::Win32::Foundation::CloseHandle;
    use windows_sys::Win32::System::Threading::{OpenProcess, TerminateProcess, PROCESS_TERMINATE};
    // SAFETY: the handle is checked before use and closed once; no memory is shared.
    unsafe {
        let handle = OpenProcess(PROCESS_TERMINATE, 0, pid);
        if handle.is_null() {
            return;
        }
        TerminateProcess(handle, 1);
        CloseHandle(handle);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_terminated_child_ends_by_that_signal() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        terminate(child.id());
        let status = child.wait().expect("it ends");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        kill(child.id());
        assert_eq!(child.wait().expect("it ends").signal(), Some(libc::SIGKILL));
    }
}

#[cfg(all(test, windows))]
mod windows_tests {
    use super::*;

    /// What the test below starts: this test binary, sleeping.
    #[test]
    #[ignore = "a child process for a_tied_child_is_in_this_process_s_job"]
    fn sleeps_for_a_minute() {
        std::thread::sleep(std::time::Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_tied_child_is_in_this_process_s_job() {
        use windows_sys::Win32::System::JobObjects::IsProcessInJob;
        let mut command = tokio::process::Command::new(std::env::current_exe().expect("the test binary"));
        command.args(["--ignored", "--exact", "process::windows_tests::sleeps_for_a_minute"]);
        command.stdout(std::process::Stdio::null()).kill_on_drop(true);
        let mut child = spawn_tied(&mut command).expect("the child starts");
        let handle = child.raw_handle().expect("a running child has a handle");
        let job = job::job().expect("a job object");
        let mut inside = 0;
        // SAFETY: both handles are live; the result is a plain out-parameter.
        let ok = unsafe { IsProcessInJob(handle as _, job as _, &mut inside) };
        child.kill().await.expect("the child ends");
        assert!(ok != 0 && inside != 0, "the child is not in the job that ends it with this process");
    }
}
