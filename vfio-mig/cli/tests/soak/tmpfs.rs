// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A full disk: a tmpfs of a few pages mounted on a directory of the run (root only),
//! unmounted when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set to 1 (scripts/test-all.sh does as root) to make a soak that cannot mount a tmpfs fail
/// instead of leaving out its full-disk faults.
pub const REQUIRE_TMPFS: &str = "VFIO_MIG_REQUIRE_TMPFS";

/// A mounted tmpfs.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

/// Whether this process may mount (it runs as root).
pub fn available() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

impl Tmpfs {
    /// Mounts a tmpfs of `pages` 4 KiB pages (mode 0700) on `dir`, created if missing.
    pub fn mount(dir: &Path, pages: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={}k,mode=0700", pages * 4))
            .arg("vfio-mig-soak")
            .arg(dir)
            .status()
            .expect("run mount(8)");
        assert!(
            status.success(),
            "mount a tmpfs on {}: {status}",
            dir.display()
        );
        Tmpfs {
            dir: dir.to_owned(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
