// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM in the middle of a migration of an igb VF: the source goes back to RUNNING with its
//! state; the destination never loads (no RESUMING -> STOP) and says what became of it.

use vfio_mig_tests::cli::{one_error_line, sigterm_during_recv, sigterm_during_send};

use super::migration::loaded_lines;
use super::vf::{a0_b0, ok, read_rings, s, vfio_mig, vfio_mig_bin, write_rings};

#[test]
fn sigterm_during_send_returns_the_igb_source_to_running() {
    let (a, _) = a0_b0();
    let rings = write_rings(&a, 0x0a0b);
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = sigterm_during_send(&vfio_mig_bin(), s(&a), dir.path());
    assert_eq!(code, Some(143), "{err}");
    one_error_line(&err, &["interrupted by SIGTERM", "returned to RUNNING"]);
    assert_eq!(read_rings(&a), rings);
}

/// The blob is in the driver's buffer, but the arc that loads it is never taken.
#[test]
fn sigterm_during_recv_leaves_the_igb_destination_unloaded() {
    let (a, b) = a0_b0();
    write_rings(&a, 0x0c0d);
    let own = write_rings(&b, 0x0e0f);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.mig");
    ok(&vfio_mig(&["save", s(&a), "-o", s(&file)]));
    let stream = std::fs::read(&file).unwrap();
    let loads = loaded_lines(&b);
    let (code, err) = sigterm_during_recv(&vfio_mig_bin(), s(&b), &stream, dir.path());
    assert_eq!(code, Some(143), "{err}");
    let line = one_error_line(&err, &["interrupted by SIGTERM"]);
    eprintln!("recv: {line}");
    assert_eq!(
        loaded_lines(&b),
        loads,
        "the destination loaded a stream without its trailer"
    );
    assert_eq!(read_rings(&b), own);
}
