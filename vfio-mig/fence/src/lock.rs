// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The exclusive per-device lock: `flock(2)` on a lock file, held for a whole command.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use super::private::{open_private, private_dir};
use super::DeviceKey;
use crate::error::{Error, Result};

/// An exclusive lock on a device, released when dropped (or when the process dies: the
/// kernel drops `flock` locks with the last descriptor, so a crashed command never leaves a
/// device locked).
///
/// The lock file is `<lock dir>/<key stem>.lock` and holds the owner's pid, for the "in use"
/// message. It is never deleted: deleting a lock file while another process waits on it would
/// let two processes hold "the" lock on two different files.
pub struct DeviceLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl std::fmt::Debug for DeviceLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLock")
            .field("path", &self.path)
            .finish()
    }
}

impl DeviceLock {
    /// Takes the lock of `key` in `dir` (created if missing), without waiting: if another
    /// process holds it, fails at once with [`Error::Busy`] naming that process. `device` is
    /// the device's name for messages.
    pub fn acquire(dir: &Path, key: &DeviceKey, device: &str) -> Result<Self> {
        private_dir(dir).map_err(|e| {
            Error::device(
                format!(
                    "create the lock directory {} (set --lock-dir or VFIO_MIG_LOCK_DIR)",
                    dir.display()
                ),
                e,
            )
        })?;
        let path = dir.join(format!("{}.lock", key.file_stem()));
        let step = || format!("lock {device} ({})", path.display());
        // Private whatever the umask, and never through a symlink planted at the path.
        let file = open_private(
            &path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )
        .map_err(|e| Error::device(step(), e))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((mut file, Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text
                    .trim()
                    .parse::<u32>()
                    .map(|p| p.to_string())
                    .unwrap_or_else(|_| "unknown".into());
                return Err(Error::Busy {
                    device: device.to_owned(),
                    pid,
                    lock: path,
                });
            }
            Err((_, errno)) => return Err(Error::device(step(), errno.into())),
        };
        // Record the owner; the lock, not this text, is what excludes others.
        let pid = format!("{}\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(pid.as_bytes()))
            .map_err(|e| Error::device(step(), e))?;
        log::debug!("locked {device} ({})", path.display());
        Ok(Self { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_with_the_holders_pid_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::from_text("mock:a");
        let held = DeviceLock::acquire(dir.path(), &key, "mock:v1,id=a").unwrap();
        // A second open file description conflicts even in the same process.
        let e = DeviceLock::acquire(dir.path(), &key, "mock:v1,id=a").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "mock:v1,id=a is in use by another vfio-mig (pid {};",
                std::process::id()
            )),
            "{text}"
        );
        // Another key is independent.
        DeviceLock::acquire(dir.path(), &DeviceKey::from_text("mock:b"), "b").unwrap();
        drop(held);
        DeviceLock::acquire(dir.path(), &key, "mock:v1,id=a").unwrap();
    }

    #[test]
    fn lock_dir_is_created_and_errors_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("a/b");
        let l = DeviceLock::acquire(&sub, &DeviceKey::from_text("k"), "k").unwrap();
        assert!(l.path().starts_with(&sub));
        std::fs::write(dir.path().join("file"), b"").unwrap();
        let e = DeviceLock::acquire(&dir.path().join("file/x"), &DeviceKey::from_text("k"), "k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("create the lock directory"), "{e}");
    }
}
