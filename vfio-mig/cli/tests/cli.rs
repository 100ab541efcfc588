// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vfio-mig` command, run as a separate process: the contract of DESIGN.md's command
//! line on mock devices (exit status, one error line, save and load across processes).

use std::path::Path;
use std::process::{Command, Output};

fn vfio_mig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vfio-mig")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, exactly one `error:` line, no panic or backtrace.
fn assert_clean_failure(o: &Output, expect: &str) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic escaped: {err}");
    let error_lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line expected: {err}");
    assert!(
        error_lines[0].contains(expect),
        "error should mention {expect:?}: {err}"
    );
    error_lines[0].to_string()
}

#[test]
fn live_migration_of_256_mib_between_two_mocks_succeeds() {
    let dev = "mock:v1,size=256M,seed=3";
    let o = vfio_mig(&["migrate", dev, dev, "--live"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("destination running"), "{err}");
    assert!(err.contains("pre-copy"), "{err}");
}

#[test]
fn live_migration_to_a_destination_with_another_seed_fails_cleanly() {
    let o = vfio_mig(&[
        "migrate",
        "mock:v1,size=256M,seed=3",
        "mock:v1,size=256M,seed=4",
        "--live",
    ]);
    let line = assert_clean_failure(&o, "RUNNING");
    // The line says what became of both devices.
    assert!(line.contains("seed=4 was reset"), "{line}");
    assert!(line.contains("seed=3 was returned to RUNNING"), "{line}");
}

#[test]
fn save_then_load_round_trips_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.vfiomig");
    let f = file.to_str().unwrap();
    let o = vfio_mig(&[
        "save",
        "mock:v1,size=8M,seed=7,data=trapped",
        "-o",
        f,
        "--live",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!Path::new(&format!("{f}.partial")).exists());

    let o = vfio_mig(&["inspect", f, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dev0 = &summary["devices"][0];
    assert!(
        dev0["pre_copy"]["bytes"].as_u64().unwrap() >= 8 << 20,
        "{summary}"
    );

    // A destination of a different data-section mode and the same seed loads it.
    let o = vfio_mig(&["load", "mock:v1,size=8M,seed=7,data=mmap", "-i", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("device running"));

    // The same file into a device with another seed is refused at resume.
    let o = vfio_mig(&["load", "mock:v1,size=8M,seed=8", "-i", f]);
    assert_clean_failure(&o, "RESUMING");
}

#[test]
fn truncated_and_corrupt_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    let f = file.to_str().unwrap();
    let o = vfio_mig(&["save", "mock:v1,size=1M,seed=1", "-o", f]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&file).unwrap();

    let cut = dir.path().join("cut");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let o = vfio_mig(&[
        "load",
        "mock:v1,size=1M,seed=1",
        "-i",
        cut.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "truncated");
    let o = vfio_mig(&["inspect", cut.to_str().unwrap()]);
    assert_clean_failure(&o, "truncated");

    let mut flipped = bytes.clone();
    flipped[bytes.len() / 3] ^= 1;
    let bad = dir.path().join("bad");
    std::fs::write(&bad, &flipped).unwrap();
    let o = vfio_mig(&[
        "load",
        "mock:v1,size=1M,seed=1",
        "-i",
        bad.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "CRC");
}

#[test]
fn failed_save_keeps_the_previous_file_and_names_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state");
    std::fs::write(&file, b"previous").unwrap();
    let o = vfio_mig(&[
        "save",
        "mock:v1,size=1M,seed=1,chunk=64K,fail-at=pending@5",
        "-o",
        file.to_str().unwrap(),
        // Replacing is asked for: only a complete stream would replace the file.
        "--force",
    ]);
    let line = assert_clean_failure(&o, "read pending_bytes");
    assert!(line.contains("returned to RUNNING"), "{line}");
    assert_eq!(std::fs::read(&file).unwrap(), b"previous");
}

#[test]
fn probe_reports_the_v1_region() {
    let o = vfio_mig(&["probe", "mock:v1,size=1M,data=trapped", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["protocol"], "v1 (migration region)");
    let regions = v["regions"].as_array().unwrap();
    let mig = regions
        .iter()
        .find(|r| r["region_type"] == serde_json::json!([3, 1]))
        .expect("migration region listed");
    assert_eq!(mig["index"], 10);
}

#[test]
fn bad_device_names_and_options_fail_cleanly() {
    assert_clean_failure(&vfio_mig(&["probe", "mock:v1,size=banana"]), "size");
    assert_clean_failure(
        &vfio_mig(&["probe", "/nonexistent/device"]),
        "no such device",
    );
}

#[test]
fn a_unit_past_its_point_of_no_return_exits_4_and_says_so() {
    // The second destination cannot enter RUNNING after the first one runs the state: the
    // sources must stay stopped, and the status must not be the rolled-back failure's 1.
    let o = vfio_mig(&[
        "migrate",
        "mock:v2,size=1M,seed=1",
        "mock:v2,size=1M,seed=1",
        "mock:v2,size=1M,seed=2",
        "mock:v2,size=1M,seed=2,fail-at=set-state:RUNNING@1",
    ]);
    let line = assert_clean_failure(&o, "point of no return");
    assert_eq!(o.status.code(), Some(4), "{line}");
    assert!(line.contains("not resumed"), "{line}");
}
