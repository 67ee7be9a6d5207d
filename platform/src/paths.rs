//! Where strata keeps its files on each system.

use std::path::PathBuf;

/// The per-user cache folder (models, pulled shards, benchmark results):
/// `$XDG_CACHE_HOME/strata` or `~/.cache/strata` on Linux, `%LOCALAPPDATA%\strata`
/// on Windows, `~/Library/Caches/strata` on macOS. None when the system names no
/// home folder.
pub fn user_cache() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("strata"))
}

/// The per-user data folder (what must survive a cleared cache: the coordinator's
/// certificate authority): `$XDG_DATA_HOME/strata` or `~/.local/share/strata` on
/// Linux, `%APPDATA%\strata` on Windows.
pub fn user_data() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("strata"))
}

/// The machine-wide folder of a worker installed as a service, which runs as no
/// user: `%ProgramData%\strata` on Windows (its configuration, `logs\`, its cache),
/// `/var/lib/strata` elsewhere.
pub fn machine_data() -> PathBuf {
    #[cfg(windows)]
    {
        program_data().unwrap_or_else(|| PathBuf::from(r"C:\ProgramData")).join("strata")
    }
    #[cfg(not(windows))]
    {
        PathBuf::from("/var/lib/strata")
    }
}

/// The ProgramData folder, from the shell's known folders rather than the
/// environment: a service's environment need not carry `%ProgramData%`, and under
/// Wine it names another folder there than in a console.
#[cfg(windows)]
fn program_data() -> Option<PathBuf> {
    use std::os::windows::ffi::OsStringExt;
    use windows_sys::Win32::System::Com::CoTaskMemFree;
    use windows_sys::Win32::UI::Shell::{SHGetKnownFolderPath, FOLDERID_ProgramData, KF_FLAG_DEFAULT};
    // SAFETY: the out-pointer receives a NUL-terminated wide string the shell
    // allocated, read up to its NUL and freed once with CoTaskMemFree.
    unsafe {
        let mut path = std::ptr::null_mut();
        let found = SHGetKnownFolderPath(&FOLDERID_ProgramData, KF_FLAG_DEFAULT as u32, std::ptr::null_mut(), &mut path) == 0;
        let result = (found && !path.is_null()).then(|| {
            let len = (0..).take_while(|&i| *path.add(i) != 0).count();
            PathBuf::from(std::ffi::OsString::from_wide(std::slice::from_raw_parts(path, len)))
        });
        CoTaskMemFree(path as *const _);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_folders_are_strata_s_own() {
        if let Some(cache) = user_cache() {
            assert!(cache.ends_with("strata"), "{}", cache.display());
        }
        assert!(machine_data().ends_with("strata"));
    }
}
