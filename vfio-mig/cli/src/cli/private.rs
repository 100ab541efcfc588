// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Private files (TLS and etcd private keys, stream keys): checked before they are read and
//! before anything is touched. A key that group or others can read, or that another user
//! owns (and so may read or replace), protects nothing: it is refused, never used silently.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vfio_mig::error::{Error, Result};

/// Refuses `path` (given as `option`) unless only this process's user owns and can read it.
/// A missing file passes: its reader reports it.
pub fn check_private(option: &str, path: &Path) -> Result<()> {
    let what = || format!("{option} {}", path.display());
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        // Whoever reads the file names what is missing, in its own order of files.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::InvalidInput(format!("{}: {e}", what()))),
    };
    // SAFETY: geteuid(2) takes nothing, touches no memory and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(Error::InvalidInput(format!(
            "{}: owned by uid {}, not by this user (uid {me}); a private key must be its \
             user's own",
            what(),
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(Error::InvalidInput(format!(
            "{}: mode {:o} lets group or others read it; chmod 600 it",
            what(),
            meta.mode() & 0o777
        )));
    }
    Ok(())
}
