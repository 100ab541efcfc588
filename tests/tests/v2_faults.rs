// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault injection at every step of a v2 migration: for each fault field of the v2 mock and
//! every access count until the migration no longer reaches the fault, the migration must
//! fail cleanly (one line), the source must run again and the destination must never run
//! with loaded state.

use vfio_mig::NoObserver;
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::sweep::Sweep;
use vfio_mig_tests::{
    assert_destination_safe, assert_source_running, fault_test_options, handle, mock,
};

/// 48 KiB in 4 KiB fault blocks: about a dozen blocks per stream.
const BASE: &str = "size=48K,seed=11,page=4K,chunk=4K";

/// Runs migrations with `fail-at=FIELD@N[suffix]` on one side for N = 1, 2, ... until one
/// succeeds; returns how many failed. A fault on the MIGRATION GET, or on the first state GET,
/// fires while the driver opens the device: it is never driven.
fn sweep(field: &str, suffix: &str, on_source: bool, live: bool, extra: &str) -> u32 {
    Sweep {
        spec: format!("mock:v2,{BASE}{extra}"),
        field,
        suffix,
        on_source,
        opts: fault_test_options(live),
        max: 200,
    }
    .run(|n| field == "migration" || (field == "get-state" && n == 1))
}

#[test]
fn source_faults_roll_back_at_every_access() {
    for live in [false, true] {
        for field in ["get-state", "set-state", "data-read"] {
            let failures = sweep(field, "", true, live, "");
            assert!(failures > 0, "{field} live={live}: the fault never fired");
        }
    }
    let failures = sweep("precopy-info", "", true, true, "");
    assert!(failures > 0, "precopy-info never fired");
}

#[test]
fn source_faults_roll_back_without_p2p_or_with_a_dirtying_device() {
    for extra in [",flags=0x5", ",dirty-rate=64M"] {
        for field in ["set-state", "data-read", "precopy-info"] {
            let failures = sweep(field, "", true, true, extra);
            assert!(failures > 0, "{field}{extra}: the fault never fired");
        }
    }
}

#[test]
fn source_dropping_into_error_state_is_reset() {
    for (field, live) in [
        ("get-state", true),
        ("set-state", true),
        ("set-state", false),
        ("data-read", false),
        ("data-read", true),
        ("precopy-info", true),
    ] {
        let failures = sweep(field, ":error", true, live, "");
        assert!(failures > 0, "{field}:error never fired");
    }
}

#[test]
fn destination_faults_reset_the_destination() {
    for field in ["get-state", "set-state", "data-write"] {
        for suffix in ["", ":error", ":ENOSPC"] {
            let failures = sweep(field, suffix, false, true, "");
            assert!(failures > 0, "{field}{suffix}: the fault never fired");
        }
    }
    let failures = sweep("set-state", "", false, false, ",flags=0x1");
    assert!(failures > 0);
}

#[test]
fn a_migration_fault_fails_the_open_without_touching_the_device() {
    assert!(sweep("migration", "", true, false, "") > 0);
    assert!(sweep("migration", "", false, false, "") > 0);
}

#[test]
fn faults_the_engine_never_reaches_let_the_migration_succeed() {
    // A failed MIG_DATA_SIZE in pre-copy is not fatal either: the engine assumes QEMU's
    // 100 MiB stop-copy size and goes on.
    for field in ["data-size", "dma-logging", "reset", "data-write"] {
        assert_eq!(sweep(field, "", true, true, ""), 0, "{field} on the source");
    }
    for field in [
        "data-size",
        "dma-logging",
        "reset",
        "data-read",
        "precopy-info",
    ] {
        assert_eq!(
            sweep(field, "", false, true, ""),
            0,
            "{field} on the destination"
        );
    }
}

#[test]
fn a_failed_reset_during_recovery_is_reported() {
    // The arc into STOP_COPY drops the source into ERROR, and its reset fails too.
    let spec = format!("mock:v2,{BASE}");
    let mut src = mock(&format!(
        "{spec},fail-at=set-state:STOP_COPY@1:error,fail-at=reset@1:ENODEV"
    ));
    let mut dst = mock(&spec);
    let err = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &fault_test_options(false),
        &NoObserver,
        &NoObserver,
    )
    .unwrap_err();
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(text.contains("VFIO_DEVICE_RESET"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    assert_destination_safe(&handle(&dst).status(), "failed source reset");
    // A second reset works.
    src.io.reset().unwrap();
    assert_source_running(&handle(&src).status(), "after a working reset");
}
