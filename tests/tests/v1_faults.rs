// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault injection at every step of a v1 migration: for each field of the migration region
//! and every access count until the migration no longer reaches the fault, the migration must
//! fail cleanly, the source must run again and the destination must never run with loaded
//! state.

use vfio_mig::engine::{migrate_local, NoObserver, PreCopyPolicy, SaveOptions};
use vfio_mig_tests::{assert_destination_safe, assert_source_running, handle, mock};

const BASE: &str = "size=48K,seed=11,chunk=4K,page=4K";

fn live_opts() -> SaveOptions {
    SaveOptions {
        live: true,
        policy: PreCopyPolicy {
            switchover_bytes: 0,
            max_rounds: 4,
            ..Default::default()
        },
        buffer: 4096,
    }
}

/// Runs migrations with `fail-at=FIELD@N[suffix]` on one side for N = 1, 2, ... until one
/// succeeds (the fault lies past the field's last access), checking the invariants of every
/// failure. Returns how many failed.
fn sweep(field: &str, suffix: &str, on_source: bool, data: &str, live: bool) -> u32 {
    let mut failures = 0;
    for n in 1..=400 {
        let fault = format!("fail-at={field}@{n}{suffix}");
        let (src_spec, dst_spec) = if on_source {
            (
                format!("mock:v1,{BASE},data={data},{fault}"),
                format!("mock:v1,{BASE},data={data}"),
            )
        } else {
            (
                format!("mock:v1,{BASE},data={data}"),
                format!("mock:v1,{BASE},data={data},{fault}"),
            )
        };
        let context = format!(
            "{} {fault} data={data} live={live}",
            if on_source { "source" } else { "destination" }
        );
        // A fault on region-info fires while opening: the device is never driven at all.
        let mut src = match vfio_mig::open::open_device(&src_spec) {
            Ok(d) => d,
            Err(e) => {
                assert!(
                    on_source && field == "region-info",
                    "{context}: open failed: {e}"
                );
                failures += 1;
                continue;
            }
        };
        let mut dst = match vfio_mig::open::open_device(&dst_spec) {
            Ok(d) => d,
            Err(e) => {
                assert!(
                    !on_source && field == "region-info",
                    "{context}: open failed: {e}"
                );
                failures += 1;
                continue;
            }
        };
        let opts = if live {
            live_opts()
        } else {
            SaveOptions {
                buffer: 4096,
                ..Default::default()
            }
        };
        let result = migrate_local(
            src.device.as_mut(),
            dst.device.as_mut(),
            &opts,
            &NoObserver,
            &NoObserver,
        );
        let src_status = handle(&src).status();
        let dst_status = handle(&dst).status();
        match result {
            Ok(_) => {
                assert!(
                    dst_status.resumed_ok,
                    "{context}: success without a verified resume"
                );
                return failures;
            }
            Err(e) => {
                failures += 1;
                let text = e.to_string();
                assert!(
                    !text.contains('\n'),
                    "{context}: error must be one line: {text}"
                );
                assert_source_running(&src_status, &context);
                assert_destination_safe(&dst_status, &context);
            }
        }
    }
    panic!("{field}: the fault never stopped firing within 400 accesses");
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
    let opts = live_opts();
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
