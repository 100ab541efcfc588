// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Regression tests for the protocol defects a real kernel driver would expose (issue 10):
//! what each test expects comes from the kernel's uAPI text (include/uapi/linux/vfio.h) and
//! QEMU's hw/vfio/migration.c, not from this crate's rule code.

use vfio_mig::wire::StreamHeader;
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::{handle, mock};

/// Migrates `src_spec` into `dst_spec` on this host.
fn migrate(
    src_spec: &str,
    dst_spec: &str,
    opts: &SaveOptions,
) -> (
    vfio_mig_tests::MockDevice,
    vfio_mig_tests::MockDevice,
    vfio_mig_session::Result<vfio_mig_session::handshake::MigrateReport>,
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
        // v1: 001b -> 000b (the VM stop, as QEMU) is the 1st device_state write, 000b ->
        // 010b the 2nd, 010b -> 000b the 3rd.
        (
            "mock:v1,size=1M,seed=1,fail-at=state-write@3",
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
) -> vfio_mig_session::Result<Vec<vfio_mig_session::handshake::MigrateReport>> {
    use vfio_mig::MigrationDevice;
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> =
        dsts.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), opts.live, 1)?;
    vfio_mig_session::handshake::migrate_pairs(
        &mut s,
        &mut d,
        &header,
        opts,
        &mut vfio_mig_fence::MemoryFence::new(),
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

/// Migrates two P2P devices into destinations wrapped in [`Recorder`]s; returns the result
/// and the unit's state snapshots. A destination RUNNING with a verified resumed state shows
/// as "RUNNING(loaded)", a fresh or reset one as plain "RUNNING".
fn barrier_run(dst_specs: [&str; 2]) -> (vfio_mig_session::Result<()>, Vec<Vec<String>>) {
    use vfio_mig::MigrationDevice;
    use vfio_mig_tests::recorder::{recorder, Recorder, UnitLog};
    let src_specs = ["mock:v2,size=256K,seed=1", "mock:v2,size=256K,seed=2"];
    let mut srcs: Vec<_> = src_specs.iter().map(|s| mock(s)).collect();
    let dsts: Vec<_> = dst_specs.iter().map(|s| mock(s)).collect();
    let handles: Vec<_> = dsts.iter().map(handle).collect();
    let log = UnitLog::new(2);
    let probe: vfio_mig_tests::recorder::StateProbe =
        std::sync::Arc::new(move |_: &mut dyn MigrationDevice, slot: usize| {
            let st = handles[slot].status();
            match st.resumed_ok && st.is_running() {
                true => "RUNNING(loaded)".to_string(),
                false => st.state_name(),
            }
        });
    let mut wrapped: Vec<Recorder> = dsts
        .into_iter()
        .enumerate()
        .map(|(slot, d)| recorder(d.opened.device, slot, log.clone(), probe.clone()))
        .collect();
    let mut s: Vec<&mut dyn MigrationDevice> =
        srcs.iter_mut().map(|d| d.device.as_mut() as _).collect();
    let mut d: Vec<&mut dyn MigrationDevice> = wrapped.iter_mut().map(|d| d as _).collect();
    let header = StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), false, 1).unwrap();
    let r = vfio_mig_session::handshake::migrate_pairs(
        &mut s,
        &mut d,
        &header,
        &SaveOptions::default(),
        &mut vfio_mig_fence::MemoryFence::new(),
        &NoObserver,
        &NoObserver,
    )
    .map(|_| ());
    let snapshots = log.lock().unwrap().snapshots.clone();
    (r, snapshots)
}

/// Defect 3: the destination barrier (QEMU's prepare step, `vfio_vmstate_change_prepare`):
/// every device has left RESUMING (its data accepted) and reached RUNNING_P2P before any
/// device runs.
#[test]
fn no_destination_device_runs_before_every_device_is_loaded_and_quiescent() {
    let (r, log) = barrier_run(["mock:v2,size=256K,seed=1", "mock:v2,size=256K,seed=2"]);
    r.unwrap();
    let bad = vfio_mig_tests::recorder::barrier_violation(&log, "RUNNING(loaded)", "RUNNING_P2P");
    assert!(
        bad.is_none(),
        "a device ran while a peer was not yet loaded and quiescent: {bad:?} in {log:?}"
    );
    assert_eq!(
        log.last().unwrap(),
        &["RUNNING(loaded)", "RUNNING(loaded)"],
        "{log:?}"
    );
}

/// Defect 3: a device whose data is refused fails the unit before any device ran. The second
/// destination holds another seed, so its state does not verify.
#[test]
fn a_refused_destination_device_fails_the_unit_before_any_device_runs() {
    let (r, log) = barrier_run(["mock:v2,size=256K,seed=1", "mock:v2,size=256K,seed=99"]);
    let err = r.expect_err("the second destination refuses the state");
    assert!(
        !log.iter().flatten().any(|s| s == "RUNNING(loaded)"),
        "{err}: a device ran before the unit was loaded: {log:?}"
    );
}

/// Defect 4: the v2 downtime is what stop-and-copy will carry, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE
/// (QEMU's `vfio_state_pending_exact`), which the uAPI says need not relate to PRECOPY_INFO's
/// initial and dirty bytes. A device whose pre-copy data is drained but whose stop-copy
/// estimate is huge (64 GiB here: seconds at any bandwidth) cannot meet a 300 ms budget.
#[test]
fn strict_downtime_counts_the_stop_copy_size() {
    let spec = "mock:v2,size=1M,seed=1,data-size-min=64G";
    let strict = SaveOptions {
        live: true,
        policy: vfio_mig::PreCopyPolicy {
            strict: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let (src, dst, result) = migrate(spec, spec, &strict);
    let err = result
        .map(|_| ())
        .expect_err("64 GiB cannot cross in 300 ms");
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(text.contains("pre-copy"), "{text}");
    assert!(handle(&src).status().is_running(), "{text}");
    assert!(!handle(&dst).status().resumed_ok, "{err}");

    // Without --strict-downtime the migration switches over, saying why and what it expects.
    let lax = SaveOptions {
        live: true,
        ..Default::default()
    };
    let (_src, dst, result) = migrate(spec, spec, &lax);
    let report = result.unwrap().save;
    assert!(handle(&dst).status().resumed_ok);
    let reason = report.switch_reason.unwrap();
    assert!(!reason.within_budget(), "{report:?}");
    let estimate = report.estimated_downtime.expect("an estimate");
    assert!(
        estimate > std::time::Duration::from_millis(300),
        "{report:?}"
    );
}

/// Defect 6: saving a paused v1 device. QEMU 5.2-7.0's `vfio_save_setup` sets SAVING over the
/// current bits, so a VM paused before the save (`savevm`, a migration of a stopped guest)
/// writes STOP (000b) -> stop-and-copy (010b); the uAPI lets the user go to any valid state
/// reachable from the current one.
#[test]
fn a_paused_v1_device_is_saved_and_loaded() {
    let spec = "mock:v1,size=256K,seed=4";
    let mut src = mock(spec);
    let mut dst = mock(spec);
    src.device.stop().unwrap();
    let (bytes, _) = vfio_mig_tests::save_to_vec(&mut src, &SaveOptions::default())
        .unwrap_or_else(|e| panic!("save of a paused device: {e}"));
    vfio_mig_tests::load_from_slice(&mut dst, &bytes).unwrap();
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
}

/// Defect 6: the whole v1 table against the uAPI's state diagram (Linux 5.8-5.17 vfio.h) and
/// the arcs QEMU 5.2-7.2 writes: every arc listed here is allowed, every other pair of
/// requestable states refused.
#[test]
fn the_v1_arcs_are_the_uapi_table_and_qemus_writes() {
    use vfio_mig::{backend::v1_state::is_arc, backend::v1_state::V1State::*};
    let allowed = [
        // The uAPI diagram: shutdown, save/suspend, live migration, resuming, resumed.
        (Running, Stop),
        (Running, StopCopy),
        (StopCopy, Stop),
        (Running, PreCopy),
        (PreCopy, StopCopy),
        (Running, Resuming),
        (Resuming, Running),
        // QEMU: vfio_save_setup ORs SAVING into a paused device's 000b.
        (Stop, StopCopy),
        // QEMU: a VM stop during pre-copy clears RUNNING; a cancelled save clears SAVING
        // and sets RUNNING (from any saving state); a resume of a paused VM sets RUNNING.
        (PreCopy, Running),
        (StopCopy, Running),
        (Stop, Running),
        // QEMU: vfio_load_setup sets RESUMING over a stopped device.
        (Stop, Resuming),
        // Reachable from pre-copy through stop-and-copy: a pause-and-abandon in one write.
        (PreCopy, Stop),
    ];
    let states = [Stop, Running, PreCopy, StopCopy, Resuming];
    for from in states {
        for to in states {
            let expected = from == to || allowed.contains(&(from, to));
            assert_eq!(is_arc(from, to), expected, "{from} -> {to}");
        }
    }
}

/// Defect 7: `--live` with a v2 device without VFIO_MIGRATION_PRE_COPY (mlx5 before Linux
/// 6.2, older hisi_acc): QEMU migrates such a device in stop-and-copy only (its
/// `vfio_save_setup` skips PRE_COPY), alone or next to devices that do pre-copy.
#[test]
fn live_migration_of_a_device_without_pre_copy_is_stop_and_copy_only() {
    let live = SaveOptions {
        live: true,
        ..Default::default()
    };
    let spec = "mock:v2,size=256K,seed=5,flags=0x1";
    let (src, dst, result) = migrate(spec, spec, &live);
    let report = result.unwrap_or_else(|e| panic!("{spec}: {e}"));
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
    assert_eq!(report.save.pre_copy_bytes, 0, "{report:?}");
    assert!(report.save.stop_copy_only, "the report says so: {report:?}");

    let specs = [
        "mock:v2,size=256K,seed=6,flags=0x7",
        "mock:v2,size=256K,seed=7,flags=0x3",
    ];
    let mut srcs: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let mut dsts: Vec<_> = specs.iter().map(|s| mock(s)).collect();
    let reports = migrate_unit(&mut srcs, &mut dsts, &live).unwrap();
    assert!(reports[0].save.pre_copy_bytes > 0, "{reports:?}");
    assert_eq!(reports[1].save.pre_copy_bytes, 0, "{reports:?}");
    assert!(reports[1].save.stop_copy_only && !reports[0].save.stop_copy_only);
    for (s, d) in srcs.iter().zip(&dsts) {
        assert!(handle(d).status().resumed_ok);
        assert_eq!(handle(s).state_digest(), handle(d).state_digest());
    }
}

/// Defect 5: a VMM pausing its VM during pre-copy. QEMU's `vfio_vmstate_change` moves a
/// device in PRE_COPY that is asked to stop to STOP_COPY, keeping the data fd and the save,
/// never through RUNNING; and `vfio_save_setup` only enters PRE_COPY from RUNNING (a stopped
/// device stays stopped until stop-and-copy).
#[test]
fn a_pause_during_pre_copy_goes_to_stop_copy_and_pre_copy_never_runs_a_paused_device() {
    for flags in ["0x7", "0x5"] {
        let spec = format!("mock:v2,size=256K,seed=8,flags={flags}");
        let mut src = mock(&spec);
        src.device.start_pre_copy().unwrap();
        let fds = handle(&src).status().data_fds;
        src.device.stop().unwrap();
        let st = handle(&src).status();
        assert_eq!(st.state_name(), "STOP_COPY", "{flags}: {st:?}");
        assert_eq!(st.data_fds, fds, "{flags}: the same session goes on");

        let mut paused = mock(&spec);
        paused.device.stop().unwrap();
        let r = paused.device.start_pre_copy();
        let st = handle(&paused).status();
        assert_eq!(st.state_name(), "STOP", "{flags}: {r:?}: {st:?}");
    }
    // v1: clearing RUNNING in pre-copy (011b) leaves stop-and-copy (010b).
    let mut v1 = mock("mock:v1,size=256K,seed=8");
    v1.device.start_pre_copy().unwrap();
    v1.device.stop().unwrap();
    assert_eq!(handle(&v1).status().state_name(), "STOP-AND-COPY (010b)");
}

/// Defect 9: a v1 driver whose `pending_bytes` over-reports (an estimate) stages an empty
/// chunk (`data_size` 0) once its data is out. QEMU 5.2-7.2's v1 code took that as the end of
/// the stop-and-copy data (`vfio_save_complete_precopy` leaves its loop on `data_size == 0`)
/// and, in pre-copy, as the end of the round (`vfio_save_iterate` returns). Both live and
/// stop-and-copy migrations must complete with every byte delivered.
#[test]
fn an_empty_v1_chunk_ends_the_phase_or_the_round() {
    for live in [false, true] {
        let spec = "mock:v1,size=256K,seed=9,chunk=16K,pending-slack=4K";
        let opts = SaveOptions {
            live,
            ..Default::default()
        };
        let (src, dst, r) = migrate(spec, spec, &opts);
        let report = r.unwrap_or_else(|e| {
            panic!(
                "live={live}: an empty chunk after the data: {}",
                vfio_mig::error::Report(&e)
            )
        });
        let (s, d) = (handle(&src).status(), handle(&dst).status());
        assert!(d.resumed_ok, "live={live}: destination not resumed: {d:?}");
        assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
        assert_eq!(s.saves_completed, 1, "live={live}: {s:?}");
        // Every staged chunk with data reached the destination, none twice.
        assert_eq!(s.transactions_saved, d.transactions_loaded, "live={live}");
        if live {
            assert!(
                report.save.pre_copy_bytes > 0,
                "live={live}: {:?}",
                report.save
            );
        }
    }
}

/// Defect 10: the uAPI (vfio.h, VFIO_MIG_GET_PRECOPY_INFO): at pre-copy's temporary end "the
/// kernel driver should return ENOMSG from read(). Userspace can wait for more data (which may
/// never come) by using poll." A device whose first pre-copy data lands 150 ms after PRE_COPY
/// (reads answer ENOMSG meanwhile, PRECOPY_INFO already counts the bytes) must be waited for:
/// the pre-copy data goes in pre-copy, the switch-over is the policy's (converged), and the
/// waiting polls the fd instead of spinning on ENOMSG.
#[test]
fn enomsg_in_pre_copy_is_waited_for_with_poll_not_spun_on() {
    let spec = "mock:v2,size=512K,seed=10,precopy-delay=150ms";
    let opts = SaveOptions {
        live: true,
        ..Default::default()
    };
    let (src, dst, r) = migrate(spec, spec, &opts);
    let report = r.unwrap_or_else(|e| panic!("{}", vfio_mig::error::Report(&e)));
    let s = handle(&src).status();
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(
        report.save.switch_reason,
        Some(vfio_mig::SwitchReason::Converged),
        "{:?}",
        report.save
    );
    // All the device's state was pending when pre-copy began; it must have gone in pre-copy.
    assert!(
        report.save.pre_copy_bytes >= 512 << 10,
        "pre-copy carried {} bytes: {:?}",
        report.save.pre_copy_bytes,
        report.save
    );
    // 150 ms of waiting: a spin makes thousands of ENOMSG reads, a poll a handful.
    assert!(
        s.enomsg_reads >= 1 && s.enomsg_reads <= 20,
        "{} ENOMSG reads while the data was not ready",
        s.enomsg_reads
    );
}

/// The v1 data section as real v1-era drivers laid it out: the uAPI (Linux 5.8 vfio.h) says
/// the user must read `data_offset` for every chunk, since the vendor driver may "partition"
/// the data section, and that the section may be trapped, mmapped, or both (several sparse
/// areas). A moving `data_offset` over several sparse areas, chunks straddling their
/// boundaries, migrates every byte, stop-and-copy and live.
#[test]
fn a_moving_data_offset_over_several_sparse_areas_migrates_every_byte() {
    let layouts = [
        "chunk=12K,section=64K,data-offset=moving",
        "chunk=12K,section=64K,areas=4",
        "chunk=12K,section=64K,areas=4,data-offset=moving",
        "chunk=5000,section=32K,areas=2,data-offset=moving,data=mmap",
    ];
    for layout in layouts {
        for live in [false, true] {
            let spec = format!("mock:v1,size=300K,seed=12,dirty-rate=1M,{layout}");
            let opts = SaveOptions {
                live,
                ..Default::default()
            };
            let (src, dst, r) = migrate(&spec, &spec, &opts);
            if let Err(e) = r {
                panic!("{spec} live={live}: {}", vfio_mig::error::Report(&e));
            }
            let (s, d) = (handle(&src).status(), handle(&dst).status());
            assert!(d.resumed_ok, "{spec}: {d:?}");
            assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
            assert_eq!(s.transactions_saved, d.transactions_loaded, "{spec}");
            assert!(s.transactions_saved >= 25, "{spec}: {s:?}");
        }
    }
}
