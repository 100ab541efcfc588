// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault injection at every step of a v1 migration: for each field of the migration region
//! and every access count until the migration no longer reaches the fault, the migration must
//! fail cleanly, the source must run again and the destination must never run with loaded
//! state.

use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::sweep::Sweep;
use vfio_mig_tests::{fault_test_options, handle, mock};

const BASE: &str = "size=48K,seed=11,chunk=4K,page=4K";

/// Runs migrations with `fail-at=FIELD@N[suffix]` on one side for N = 1, 2, ... until one
/// succeeds; returns how many failed. A fault on region-info fires while the device is opened:
/// it is never driven at all.
fn sweep(field: &str, suffix: &str, on_source: bool, data: &str, live: bool) -> u32 {
    let opts = if live {
        fault_test_options(true)
    } else {
        SaveOptions {
            buffer: 4096,
            ..Default::default()
        }
    };
    Sweep {
        spec: format!("mock:v1,{BASE},data={data}"),
        field,
        suffix,
        on_source,
        opts,
        max: 400,
    }
    .run(|_| field == "region-info")
}

#[test]
fn source_faults_roll_back_at_every_access() {
    for data in ["trapped", "mmap"] {
        for live in [false, true] {
            for field in [
                "state-read",
                "state-write",
                "pending",
                "data-offset",
                "data-size-read",
            ] {
                let failures = sweep(field, "", true, data, live);
                assert!(
                    failures > 0,
                    "{field} ({data}, live={live}): the fault never fired"
                );
            }
        }
    }
}

#[test]
fn source_data_read_faults_roll_back_when_trapped() {
    for live in [false, true] {
        let failures = sweep("data-read", "", true, "trapped", live);
        assert!(failures > 0, "data-read never fired");
    }
}

#[test]
fn source_dropping_into_error_state_is_reset() {
    for field in [
        "state-write",
        "pending",
        "data-offset",
        "data-size-read",
        "state-read",
    ] {
        let failures = sweep(field, ":error", true, "trapped", true);
        assert!(failures > 0, "{field}:error never fired");
    }
}

#[test]
fn destination_faults_reset_the_destination() {
    for data in ["trapped", "mmap"] {
        for field in [
            "state-read",
            "state-write",
            "data-offset",
            "data-size-write",
        ] {
            let failures = sweep(field, "", false, data, true);
            assert!(failures > 0, "{field} ({data}): the fault never fired");
        }
    }
    let failures = sweep("data-write", "", false, "trapped", false);
    assert!(failures > 0, "data-write never fired");
}

#[test]
fn destination_dropping_into_error_state_is_reset() {
    for field in ["state-write", "data-offset", "data-size-write"] {
        let failures = sweep(field, ":error", false, "trapped", false);
        assert!(failures > 0, "{field}:error never fired");
    }
}

#[test]
fn region_info_fault_fails_the_open_without_touching_the_device() {
    let failures = sweep("region-info", "", true, "trapped", false);
    assert!(failures > 0);
    let failures = sweep("region-info", "", false, "trapped", false);
    assert!(failures > 0);
}

#[test]
fn failed_mmap_falls_back_to_pread_and_pwrite() {
    let mut src = mock(&format!("mock:v1,{BASE},data=mmap,fail-at=mmap@1"));
    let mut dst = mock(&format!("mock:v1,{BASE},data=mmap,fail-at=mmap@1"));
    let opts = fault_test_options(true);
    migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    )
    .expect("migration through pread/pwrite after a failed mmap");
    assert!(handle(&dst).status().resumed_ok);
    let details = src.device.details().unwrap();
    let section = details.iter().find(|(k, _)| k == "data section").unwrap();
    assert!(section.1.contains("not mapped"), "{section:?}");
}
