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

/// Runs `srcs` into `dsts` as one unit.
fn migrate_unit(
    srcs: &mut [vfio_mig_tests::MockDevice],
    dsts: &mut [vfio_mig_tests::MockDevice],
    opts: &SaveOptions,
) -> vfio_mig::Result<Vec<vfio_mig::handshake::MigrateReport>> {
    use vfio_mig::engine::MigrationDevice;
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = vfio_mig::engine::session::new_header(
        &s.iter().map(|x| &**x).collect::<Vec<_>>(),
        opts.live,
        1,
    )?;
    vfio_mig::handshake::migrate_pairs(
        &mut s,
        &mut d,
        &header,
        opts,
        &mut vfio_mig::fence::MemoryFence::new(),
        &NoObserver,
        &NoObserver,
    )
}

/// Defect 2: QEMU refuses several VFIO devices in one migration unless every one supports
/// P2P ("Multiple VFIO devices migration is supported only if all of them support P2P
/// migration"): without the quiescent states one device keeps running, and may DMA into a
/// peer already stopped. Refused before any device is touched.
#[test]
fn a_unit_with_a_device_without_p2p_is_refused_by_default() {
    let units: [&[&str]; 3] = [
        &[
            "mock:v2,size=256K,seed=1,flags=0x7",
            "mock:v2,size=256K,seed=2,flags=0x5",
        ],
        &["mock:v2,size=256K,seed=1", "mock:v1,size=256K,seed=2"],
        &["mock:v1,size=256K,seed=1", "mock:v1,size=256K,seed=2"],
    ];
    for specs in units {
        for live in [false, true] {
            let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
            let opts = SaveOptions {
                live,
                ..Default::default()
            };
            let context = format!("{specs:?} live={live}");
            let err = migrate_unit(&mut srcs, &mut dsts, &opts)
                .map(|_| ())
                .expect_err(&format!("{context}: must be refused"));
            assert!(err.to_string().contains("P2P"), "{context}: {err}");
            for d in srcs.iter().chain(&dsts) {
                let st = handle(d).status();
                assert!(st.is_running(), "{context}: untouched: {st:?}");
                assert_eq!(st.data_fds + st.transactions_staged, 0, "{context}: {st:?}");
                assert!(!st.resumed_ok, "{context}: {st:?}");
            }
        }
    }
}

/// Defect 2, the opt-in: the same units migrate when the caller accepts the risk.
#[test]
fn a_unit_without_p2p_migrates_with_the_explicit_opt_in() {
    let specs = [
        "mock:v2,size=256K,seed=1,flags=0x7",
        "mock:v2,size=256K,seed=2,flags=0x5",
        "mock:v1,size=256K,seed=3",
    ];
    let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let opts = SaveOptions {
        live: true,
        allow_non_p2p_unit: true,
        ..Default::default()
    };
    migrate_unit(&mut srcs, &mut dsts, &opts).unwrap();
    for (s, d) in srcs.iter().zip(&dsts) {
        assert!(handle(d).status().resumed_ok);
        assert_eq!(handle(s).state_digest(), handle(d).state_digest());
    }
}
