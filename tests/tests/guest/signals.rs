// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGTERM in the middle of a session, on real mtty devices (which keep their migration state
//! across close): the source is back in RUNNING, the destination reset, exit status 143.

use vfio_mig::backend::v2_state::MigState;
use vfio_mig_tests::cli::{one_error_line, sigterm_during_recv, sigterm_during_send};

use super::migration::{ensure_running, mig_state, ok, pair, path_str, vfio_mig, write_state};
use super::mtty::vfio_mig_bin;

/// The source: a destination that accepts, reads the whole stream and then never answers
/// LOADED, so `send` waits with its device stopped (STOP_COPY done); SIGTERM then.
#[test]
fn sigterm_during_send_leaves_the_mtty_source_running() {
    let (a, _) = pair(0, 1);
    ensure_running(&a);
    write_state(&a, 0x31);
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = sigterm_during_send(&vfio_mig_bin(), path_str(&a), dir.path());
    assert_eq!(code, Some(143), "{err}");
    one_error_line(&err, &["interrupted by SIGTERM", "returned to RUNNING"]);
    assert_eq!(mig_state(&a), MigState::Running);
}

/// The destination: a source that opens a session and sends all records but the trailer,
/// then waits; SIGTERM to `recv` resets the device (it never runs partial state).
#[test]
fn sigterm_during_recv_resets_the_mtty_destination() {
    let (a, b) = pair(2, 3);
    ensure_running(&a);
    ensure_running(&b);
    write_state(&a, 0x42);
    let file = tempfile::NamedTempFile::new().unwrap();
    ok(&vfio_mig(&[
        "save",
        path_str(&a),
        "-o",
        path_str(file.path()),
        // The temporary file exists already.
        "--force",
    ]));
    ensure_running(&a);
    let stream = std::fs::read(file.path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = sigterm_during_recv(&vfio_mig_bin(), path_str(&b), &stream, dir.path());
    assert_eq!(code, Some(143), "{err}");
    one_error_line(&err, &["interrupted by SIGTERM", "was reset"]);
    assert_eq!(mig_state(&b), MigState::Running);
}
