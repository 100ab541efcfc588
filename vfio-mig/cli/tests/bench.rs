// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfio-mig bench` as a user runs it: every suite, at sizes small enough for a test, must run
//! to its end and print a figure for it. No figure is judged here: speed is measured by the
//! benchmarks themselves, never asserted by a test.

use std::process::Command;

/// The tiniest configuration of every suite: one repetition, no warm-up, sizes of a few MiB.
const TINY: &[&str] = &[
    "bench",
    "--reps",
    "1",
    "--warmup",
    "0",
    "--size",
    "4M",
    "--memory-sizes",
    "4M",
    "--downtime-sizes",
    "4M",
    "--dirty-rates",
    "0",
    "--downtime-budgets",
    "300",
    "--multi-size",
    "2M",
    "--rated-size",
    "2M",
    "--channels-size",
    "2M",
    "--xe-size",
    "4M",
    "--json",
];

fn bench(extra: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(TINY)
        .args(extra)
        .env_remove("RUST_LOG")
        .output()
        .expect("run vfio-mig bench");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The ids of the figures of a JSON report.
fn figure_ids(out: &str) -> Vec<String> {
    let report: serde_json::Value = serde_json::from_str(out).expect("JSON report");
    report["figures"]
        .as_array()
        .expect("figures")
        .iter()
        .filter_map(|f| f["id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn the_multi_suite_runs_to_its_end() {
    let (ok, out, err) = bench(&["--suite", "multi"]);
    assert!(ok, "bench --suite multi failed: {err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let figures = report["figures"].as_array().expect("figures");
    assert!(
        figures.len() >= 2,
        "the multi suite measures v1 and v2 units: {out}"
    );
}

#[test]
fn the_fast_suite_measures_the_memfd_device_into_every_sink() {
    let (ok, out, err) = bench(&["--suite", "fast"]);
    assert!(ok, "bench --suite fast failed: {err}");
    let ids = figure_ids(&out);
    for sink in ["null", "file", "tcp"] {
        let id = format!("v2.memfd.{sink}.engine");
        assert!(ids.contains(&id), "no figure {id}: {ids:?}");
    }
    // The CRC on another core, beside the inline pump, where the CRC is the difference.
    let id = "v2.memfd.null.pipelined".to_owned();
    assert!(ids.contains(&id), "no figure {id}: {ids:?}");
}

#[test]
fn the_issue_22_suites_measure_the_destination_the_xe_migration_and_the_unit() {
    let (ok, out, err) = bench(&["--suite", "load,xe,unit"]);
    assert!(ok, "bench --suite load,xe,unit failed: {err}");
    let ids = figure_ids(&out);
    for id in [
        "load.memfd.tcp.engine",
        "xe.4M.downtime",
        "xe.4M.peak-rss",
        "unit.memfd.x4",
    ] {
        assert!(ids.iter().any(|i| i == id), "no figure {id}: {ids:?}");
    }
}

/// An xe size the machine cannot hold is refused before anything is built, in one line that
/// names the suite and the option (no machine has 200 TiB of `MemAvailable`, the kernel's
/// figure the suite checks).
#[test]
fn an_xe_size_beyond_the_memory_is_refused_before_anything_is_built() {
    let o = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["bench", "--suite", "xe", "--xe-size", "100T", "--reps", "1"])
        .env_remove("RUST_LOG")
        .output()
        .expect("run vfio-mig bench");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "bench xe with 100T succeeded: {err}");
    assert!(
        err.contains("bench xe: two 100T memfds need") && err.contains("--xe-size"),
        "{err}"
    );
    assert!(
        !err.contains("state file built"),
        "it built the state first: {err}"
    );
}

#[test]
fn every_suite_runs_to_its_end_when_none_is_named() {
    let (ok, out, err) = bench(&[]);
    assert!(ok, "bench with every suite failed: {err}");
    for suite in [
        "crc", "fast", "load", "xe", "unit", "v2", "v1", "memory", "downtime", "multi", "rated",
        "channels",
    ] {
        assert!(
            err.contains(&format!("bench: suite {suite}\n")),
            "suite {suite} did not run: {err}"
        );
    }
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert!(!report["figures"].as_array().expect("figures").is_empty());
}
