// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Regression tests for the protocol defects a real kernel driver would expose (issue 10):
//! what each test expects comes from the kernel's uAPI text (include/uapi/linux/vfio.h) and
//! QEMU's hw/vfio/migration.c, not from this crate's rule code.

use vfio_mig::engine::{NoObserver, SaveOptions};
use vfio_mig::handshake::migrate_local;
use vfio_mig_tests::{handle, mock};

/// Migrates `src_spec` into `dst_spec` on this host.
fn migrate(
    src_spec: &str,
    dst_spec: &str,
    opts: &SaveOptions,
) -> (
    vfio_mig_tests::MockDevice,
    vfio_mig_tests::MockDevice,
    vfio_mig::Result<vfio_mig::handshake::MigrateReport>,
) {
    let mut src = mock(src_spec);
    let mut dst = mock(dst_spec);
    let r = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        opts,
        &NoObserver,
        &NoObserver,
    );
    (src, dst, r)
}

/// Defect 1: once the destination resumed, a failing STOP_COPY -> STOP on the source must end
/// in a reset (QEMU's `vfio_migration_set_state_or_reset` with ERROR as the recovery state),
/// never in RUNNING with the state the destination now runs.
#[test]
fn a_failed_stop_after_the_handoff_resets_the_source() {
    let cases = [
        // v2 stop-and-copy: RUNNING_P2P -> STOP is the 1st arc into STOP, STOP_COPY -> STOP the 2nd.
        (
            "mock:v2,size=1M,seed=1,fail-at=set-state:STOP@2",
            "mock:v2,size=1M,seed=1",
            false,
        ),
        // v2 live: PRE_COPY_P2P -> STOP_COPY, then STOP_COPY -> STOP is the 1st arc into STOP.
        (
            "mock:v2,size=1M,seed=1,fail-at=set-state:STOP@1",
            "mock:v2,size=1M,seed=1",
            true,
        ),
        // v1: 001b -> 010b is the 1st device_state write, 010b -> 000b the 2nd.
        (
            "mock:v1,size=1M,seed=1,fail-at=state-write@2",
            "mock:v1,size=1M,seed=1",
            false,
        ),
    ];
    for (src_spec, dst_spec, live) in cases {
        let opts = SaveOptions {
            live,
            ..Default::default()
        };
        let (src, dst, result) = migrate(src_spec, dst_spec, &opts);
        let context = format!("{src_spec} live={live}");
        let report = result.unwrap_or_else(|e| panic!("{context}: the handoff completed: {e}"));
        assert!(
            handle(&dst).status().resumed_ok,
            "{context}: destination runs"
        );
        let status = handle(&src).status();
        assert_eq!(
            status.resets, 1,
            "{context}: the source must be reset, not returned to RUNNING with the migrated \
             state: {status:?}"
        );
        let said = report.save.after_handoff.unwrap_or_default();
        assert!(
            said.contains("reset"),
            "{context}: the report says so: {said:?}"
        );
        assert!(!said.contains("returned to RUNNING"), "{context}: {said}");
    }
}
