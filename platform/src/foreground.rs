//! Whether a full-screen program has the foreground: how most games look, so a
//! worker can yield while one does (`--yield-to-fullscreen`).
//!
//! Only Windows can tell here. A process in session 0 (a Windows service) sees no
//! user's desktop, so there the watch is refused with a reason rather than left
//! reporting "nothing" for ever.

/// A window's or a monitor's rectangle, in screen pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub left: i32,
    pub top: i32,
    pub right: i32,
    pub bottom: i32,
}

impl Rect {
    /// Whether this (a window) covers all of `monitor`: what a full-screen or
    /// borderless full-screen game's window does, and a maximized window, which
    /// leaves the task bar, does not.
    pub fn covers(&self, monitor: &Rect) -> bool {
        self.left <= monitor.left
            && self.top <= monitor.top
            && self.right >= monitor.right
            && self.bottom >= monitor.bottom
            && monitor.right > monitor.left
            && monitor.bottom > monitor.top
    }
}

/// Whether this process can see the foreground window; why not, if it cannot.
pub fn watchable() -> Result<(), String> {
    imp::watchable()
}

/// The program with a full-screen window in the foreground (`game.exe`), if any.
pub fn fullscreen_program() -> Option<String> {
    imp::fullscreen_program()
}

#[cfg(windows)]
mod imp {
    use windows_sys::Win32::Foundation::{CloseHandle, RECT};
    use windows_sys::Win32::Graphics::Gdi::{GetMonitorInfoW, MonitorFromWindow, MONITORINFO, MONITOR_DEFAULTTONEAREST};
    use windows_sys::Win32::System::RemoteDesktop::ProcessIdToSessionId;
    use windows_sys::Win32::System::Threading::{
        GetCurrentProcessId, OpenProcess, QueryFullProcessImageNameW, PROCESS_NAME_WIN32,
        PROCESS_QUERY_LIMITED_INFORMATION,
    };
    use windows_sys::Win32::UI::Shell::{SHQueryUserNotificationState, QUNS_RUNNING_D3D_FULL_SCREEN};
    use windows_sys::Win32::UI::WindowsAndMessaging::{
        GetDesktopWindow, GetForegroundWindow, GetShellWindow, GetWindowRect, GetWindowThreadProcessId,
    };

    use super::Rect;

    pub fn watchable() -> Result<(), String> {
        let mut session = 0u32;
        // SAFETY: plain out-parameter of the right type.
        let ok = unsafe { ProcessIdToSessionId(GetCurrentProcessId(), &mut session) } != 0;
        if ok && session == 0 {
            return Err("this worker runs as a service (session 0), which sees no user's desktop; \
                        use --yield-to-processes or --yield-to-gpu-users"
                .into());
        }
        Ok(())
    }

    fn rect(r: &RECT) -> Rect {
        Rect { left: r.left, top: r.top, right: r.right, bottom: r.bottom }
    }

    pub fn fullscreen_program() -> Option<String> {
        // SAFETY: every call takes plain values or out-parameters of the right type
        // and size; the process handle is checked and closed once.
        unsafe {
            let window = GetForegroundWindow();
            let desktop = window.is_null() || window == GetDesktopWindow() || window == GetShellWindow();
            if !desktop {
                let mut bounds: RECT = std::mem::zeroed();
                let mut monitor: MONITORINFO = std::mem::zeroed();
                monitor.cbSize = std::mem::size_of::<MONITORINFO>() as u32;
                let on = MonitorFromWindow(window, MONITOR_DEFAULTTONEAREST);
                if GetWindowRect(window, &mut bounds) != 0
                    && !on.is_null()
                    && GetMonitorInfoW(on, &mut monitor) != 0
                    && rect(&bounds).covers(&rect(&monitor.rcMonitor))
                {
                    let mut pid = 0u32;
                    GetWindowThreadProcessId(window, &mut pid);
                    return Some(program_name(pid).unwrap_or_else(|| format!("a program (pid {pid})")));
                }
            }
            // An exclusive full-screen Direct3D program may own the screen without
            // being the foreground window the desktop reports.
            let mut state = 0;
            if SHQueryUserNotificationState(&mut state) == 0 && state == QUNS_RUNNING_D3D_FULL_SCREEN {
                return Some("a full-screen Direct3D program".into());
            }
            None
        }
    }

    /// `game.exe`, from the process's image path.
    fn program_name(pid: u32) -> Option<String> {
        // SAFETY: the handle is checked before use and closed once; the buffer's
        // length is passed with it.
        unsafe {
            let process = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
            if process.is_null() {
                return None;
            }
            let mut buffer = [0u16; 1024];
            let mut len = buffer.len() as u32;
            let ok = QueryFullProcessImageNameW(process, PROCESS_NAME_WIN32, buffer.as_mut_ptr(), &mut len) != 0;
            CloseHandle(process);
            let path = String::from_utf16_lossy(buffer.get(..len as usize)?);
            ok.then(|| path.rsplit(['\\', '/']).next().unwrap_or(&path).to_string())
        }
    }
}

#[cfg(not(windows))]
mod imp {
    pub fn watchable() -> Result<(), String> {
        Err("only Windows tells which program is full screen; use --yield-to-processes \
             or --yield-to-gpu-users"
            .into())
    }

    pub fn fullscreen_program() -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_full_screen_when_it_covers_its_monitor() {
        let monitor = Rect { left: 1920, top: 0, right: 3840, bottom: 1080 };
        assert!(Rect { left: 1920, top: 0, right: 3840, bottom: 1080 }.covers(&monitor));
        assert!(Rect { left: 1912, top: -8, right: 3848, bottom: 1088 }.covers(&monitor), "borders off screen");
        let maximized = Rect { left: 1920, top: 0, right: 3840, bottom: 1040 };
        assert!(!maximized.covers(&monitor), "a maximized window leaves the task bar");
        assert!(!Rect { left: 0, top: 0, right: 1920, bottom: 1080 }.covers(&monitor), "the other monitor");
        let empty = Rect { left: 0, top: 0, right: 0, bottom: 0 };
        assert!(!monitor.covers(&empty));
    }

    #[cfg(not(windows))]
    #[test]
    fn elsewhere_the_watch_says_why_it_cannot_work() {
        assert!(watchable().unwrap_err().contains("only Windows"));
        assert_eq!(fullscreen_program(), None);
    }
}
