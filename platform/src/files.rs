//! Questions about files whose answers differ by system.

use std::fs::File;
use std::io;
use std::path::Path;

/// Whether `path` still names the file `file` has open (it was not renamed away or
/// replaced since it was opened): the same device and inode on Unix, the same
/// volume and file index on Windows.
pub fn still_named(path: &Path, file: &File) -> io::Result<bool> {
    let at_path = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(identity(&at_path)? == identity(file)?)
}

#[cfg(unix)]
fn identity(file: &File) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

#[cfg(windows)]
fn identity(file: &File) -> io::Result<(u64, u64)> {
    use std::os::windows::io::AsRawHandle;
    use windows_sys::Win32::Storage::FileSystem::{GetFileInformationByHandle, BY_HANDLE_FILE_INFORMATION};
    // SAFETY: the handle is `file`'s, open for the call; the structure is written
    // by the call and of the right type.
    unsafe {
        let mut info: BY_HANDLE_FILE_INFORMATION = std::mem::zeroed();
        if GetFileInformationByHandle(file.as_raw_handle() as _, &mut info) == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((u64::from(info.dwVolumeSerialNumber), (u64::from(info.nFileIndexHigh) << 32) | u64::from(info.nFileIndexLow)))
    }
}

/// Bytes free for this process on the file system holding `dir`.
#[cfg(unix)]
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated path and a structure the call fills.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stat) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
    }
}

/// Bytes free for this process on the volume holding `dir`.
#[cfg(windows)]
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::windows::ffi::OsStrExt;
    use windows_sys::Win32::Storage::FileSystem::GetDiskFreeSpaceExW;
    let wide: Vec<u16> = dir.as_os_str().encode_wide().chain(std::iter::once(0)).collect();
    let mut available = 0u64;
    // SAFETY: a NUL-terminated path; the one output asked for is a u64 of ours.
    if unsafe { GetDiskFreeSpaceExW(wide.as_ptr(), &mut available, std::ptr::null_mut(), std::ptr::null_mut()) } == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(available)
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renamed_or_replaced_file_is_no_longer_named_by_its_old_path() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("strata-platform-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("a");
        std::fs::write(&path, b"one")?;
        let file = File::open(&path)?;
        assert!(still_named(&path, &file)?);
        std::fs::rename(&path, dir.join("b"))?;
        assert!(!still_named(&path, &file)?, "renamed away");
        std::fs::write(&path, b"two")?;
        assert!(!still_named(&path, &file)?, "another file under the name");
        drop(file);
        std::fs::remove_dir_all(&dir)
    }

    #[test]
    fn a_folder_has_some_free_space_and_a_missing_one_is_an_error() {
        let dir = std::env::temp_dir();
        assert!(free_space(&dir).unwrap() > 0);
        assert!(free_space(&dir.join(format!("strata-missing-{}", std::process::id()))).is_err());
    }
}
