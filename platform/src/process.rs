//! Ending another process by its id.

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
