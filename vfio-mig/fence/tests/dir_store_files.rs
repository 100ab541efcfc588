// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `dir:` store's files under a hostile umask and directory (issue 21, defect 8): run
//! as root with umask 000, so that nothing but the store's own modes keeps its files
//! private. One test in its own binary: the umask is the process's.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use vfio_mig_fence::{Condition, DirStore, FenceStore, Write};

fn mode(path: &std::path::Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn put(key: &str) -> Write {
    Write::Put {
        key: key.into(),
        value: b"v".to_vec(),
        lease: None,
    }
}

#[test]
fn the_dir_store_is_private_follows_no_planted_link_and_never_wraps() {
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let top = tempfile::tempdir().unwrap();

    // Created private whatever the umask.
    let dir = top.path().join("store");
    let store = DirStore::new(&dir);
    store.commit(&[], &[put("a")]).unwrap().unwrap();
    assert_eq!(mode(&dir), 0o700, "the store directory");
    assert_eq!(mode(&dir.join("store")), 0o600, "the store file");
    assert_eq!(mode(&dir.join(".lock")), 0o600, "the lock file");

    // A temporary name planted as a link to a file elsewhere: the file stays as it was.
    let victim = top.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    symlink(
        &victim,
        dir.join(format!(".store.tmp.{}", std::process::id())),
    )
    .unwrap();
    store.commit(&[], &[put("b")]).unwrap().unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(store.get("b").unwrap().is_some());

    // A directory others may write is not trusted: they could replace the store.
    let open = top.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = DirStore::new(&open).get("a").unwrap_err().to_string();
    assert!(e.contains("writable by others"), "{e}");

    // The revision counter ends with an error, never wraps to a revision already used.
    let full = top.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::set_permissions(&full, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(
        full.join("store"),
        format!("vfio-mig-store 1\nrevision {}\n", u64::MAX - 1),
    )
    .unwrap();
    let last = DirStore::new(&full);
    assert_eq!(last.commit(&[], &[put("x")]).unwrap(), Some(u64::MAX));
    let cond = [Condition {
        key: "x".into(),
        revision: u64::MAX,
    }];
    let e = last.commit(&cond, &[put("x")]).unwrap_err().to_string();
    assert!(e.contains("revision"), "{e}");
    assert_eq!(last.get("x").unwrap().unwrap().revision, u64::MAX);
}
