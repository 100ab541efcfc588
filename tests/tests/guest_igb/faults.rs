// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bad streams into an igb VF with `vfio-mig load`: blobs the device itself refuses (bad magic,
//! version, size, a VF number it does not have: igb_core_vf_load_state), and streams vfio-mig
//! must refuse before the device's RESUMING -> STOP arc (corrupt, cut, foreign), which on this
//! driver "succeeds" with nothing written. Each leaves the destination with its own state, one
//! error line, and the VF usable for a good load afterwards; `recover` on a VF left stopped.

use std::path::Path;

use vfio_mig::{backend::v2_state::MigState, backend::V2Device};
use vfio_mig_tests::{open_device, rewrite_stream};

use super::migration::loaded_lines;
use super::vf::{
    a0_b0, clean_failure, kernel_lines, ok, read_rings, s, vfio_mig, write_rings, BLOB_SIZE,
};

/// The driver's "RESUMING => STOP" debug lines for `vf` (the arc that loads the blob).
fn resume_to_stop_arcs(vf: &Path) -> usize {
    kernel_lines(vf)
        .iter()
        .filter(|l| l.contains("VFIO_DEVICE_STATE_RESUMING => VFIO_DEVICE_STATE_STOP"))
        .count()
}

/// A good stream of A's state (A's rings written from `seed`), and A's rings.
fn saved_stream(a: &Path, seed: u32) -> (Vec<u8>, Vec<u32>) {
    let rings = write_rings(a, seed);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.mig");
    ok(&vfio_mig(&["save", s(a), "-o", s(&file)]));
    (std::fs::read(&file).unwrap(), rings)
}

/// Loads `bytes` into `b`; returns the error line and the whole stderr, after checking that
/// `b` kept its own state and loaded nothing.
fn load_refused(b: &Path, bytes: &[u8], expect: &[&str]) -> (String, String) {
    let own = write_rings(b, 0xbeef);
    let loads = loaded_lines(b);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.mig");
    std::fs::write(&file, bytes).unwrap();
    let out = vfio_mig(&["load", s(b), "-i", s(&file)]);
    let line = clean_failure(&out, expect);
    assert_eq!(
        loaded_lines(b),
        loads,
        "the device loaded something: {line}"
    );
    assert_eq!(read_rings(b), own, "the destination lost its state: {line}");
    (line, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A change to the device's blob inside a stream.
type BlobEdit = fn(&mut Vec<u8>);

/// The device's own checks (igb_core_vf_load_state), each with the error code the driver logs.
#[test]
fn blobs_the_device_refuses_leave_the_destination_with_its_own_state() {
    let (a, b) = a0_b0();
    let (good, rings) = saved_stream(&a, 0x0102);
    let cases: [(&str, u32, BlobEdit); 4] = [
        ("bad magic", 6, |d| d[0] ^= 0xff),
        ("bad version", 7, |d| d[4] = 2),
        // A VF number the PF does not have (the port's check: >= 8 is BAD_SIZE).
        ("VF number 9", 5, |d| d[8] = 9),
        ("16-byte blob", 5, |d| d.truncate(16)),
    ];
    for (what, code, edit) in cases {
        let bad = rewrite_stream(&good, None, edit);
        let needle = format!("DVSEC cmd 0x3 failed (error {code})");
        let count = || {
            kernel_lines(&b)
                .iter()
                .filter(|l| l.contains(&needle))
                .count()
        };
        let before = count();
        let (line, stderr) = load_refused(&b, &bad, &["RESUMING"]);
        eprintln!("{what}: {line}");
        // VFIO_DEVICE_RESET leaves igb-vfio-pci in RESUMING: the command must not stop at a
        // reset it verified as failed, but reopen the VF (the driver's open starts RUNNING).
        assert!(
            stderr.contains("reopened it, now RUNNING"),
            "{what}: the VF was left in RESUMING: {stderr}"
        );
        assert_eq!(
            count(),
            before + 1,
            "{what}: the device's error {code} not logged"
        );
    }
    // The VF takes a good stream afterwards.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("good.mig");
    std::fs::write(&file, &good).unwrap();
    ok(&vfio_mig(&["load", s(&b), "-i", s(&file)]));
    assert_eq!(read_rings(&b), rings);
}

/// Streams refused before the device loads anything: the RESUMING -> STOP arc (which would
/// "succeed" on an empty or partial write here) is never taken.
#[test]
fn corrupt_cut_and_foreign_streams_never_reach_resuming_to_stop() {
    let (a, b) = a0_b0();
    let (good, _) = saved_stream(&a, 0x0304);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let foreign = rewrite_stream(&good, Some("mdev:mtty-2"), |_| {});
    let cases: Vec<(String, Vec<u8>)> = vec![
        ("a flipped byte".into(), flipped),
        (
            "no trailer".into(),
            good[..good.len() - (24 + 8 + 24)].to_vec(),
        ),
        (
            "cut inside the blob".into(),
            good[..good.len() - BLOB_SIZE / 2].to_vec(),
        ),
        ("header only".into(), good[..64.min(good.len())].to_vec()),
        ("empty".into(), Vec::new()),
        ("a stream of another device model".into(), foreign),
    ];
    for (what, bytes) in cases {
        let arcs = resume_to_stop_arcs(&b);
        let (line, _) = load_refused(&b, &bytes, &[]);
        eprintln!("{what}: {line}");
        assert_eq!(
            resume_to_stop_arcs(&b),
            arcs,
            "{what}: RESUMING -> STOP was taken"
        );
    }
}

/// A VF left stopped by a process that ended: igb-vfio-pci's open starts in RUNNING, so
/// `recover` finds it running (and says so) and it can migrate again.
#[test]
fn recover_on_a_vf_left_stopped() {
    let (a, _) = a0_b0();
    let rings = write_rings(&a, 0x0506);
    {
        let opened = open_device(s(&a)).unwrap();
        let mut v2 = V2Device::open(opened.io.clone()).unwrap();
        v2.set_state(MigState::Stop).unwrap();
        assert_eq!(v2.state().unwrap(), MigState::Stop);
    }
    let out = vfio_mig(&["recover", s(&a)]);
    ok(&out);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("RUNNING"), "{text}");
    assert_eq!(read_rings(&a), rings, "recover changed the VF's state");
}
