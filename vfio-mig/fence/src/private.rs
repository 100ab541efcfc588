// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The directories and files of fencing state (locks, per-host records, the `dir:` store):
//! created private whatever the umask, never opened through a symbolic link, and a directory
//! another user owns or that group or others may write is refused, for whoever can write it
//! can replace what it holds.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Creates `dir` and its missing parents with mode 0700 (the mode given to mkdir is only
/// ever narrowed by the umask), and refuses it, new or not, unless this user owns it and
/// neither group nor others may write it.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid(2) takes nothing, touches no memory and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory (a symbolic link is not followed)",
        ));
    }
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "mode {:o}, owner uid {}: writable by others or owned by another user, who \
                 could replace what it holds; make it 0700 and owned by uid {me}",
                meta.mode() & 0o7777,
                meta.uid()
            ),
        ));
    }
    Ok(())
}

/// Opens `path` with `options`, created 0600 whatever the umask, never through a symbolic
/// link, and only if it is a regular file: a FIFO planted there would block a reader until a
/// writer came (the open itself does not wait: `O_NONBLOCK`, cleared again once the file is
/// known to be regular), and a device node or socket is not state.
pub(crate) fn open_private(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let file = options
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, device or socket there is refused, never read)",
        ));
    }
    let flags = OFlag::from_bits_truncate(fcntl(&file, FcntlArg::F_GETFL)?);
    fcntl(&file, FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK))?;
    Ok(file)
}
