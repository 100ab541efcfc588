// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real v2 driver (`V2Device`, picked by `open_device` for `mock:v2`) driven by the engine
//! against the v2 mock: save and resume round trips over random sizes, live and not, devices
//! without P2P or PRE_COPY, a dirtying device, and refusals.

use proptest::prelude::*;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::{NoObserver, PreCopyPolicy, Protocol, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::StatusExt;
use vfio_mig_tests::{
    assert_destination_safe, assert_source_running, handle, load_from_slice, mock, save_to_vec,
};

fn opts(live: bool, buffer: usize) -> SaveOptions {
    SaveOptions {
        live,
        buffer,
        ..Default::default()
    }
}

fn round_trip(size: u64, page: u64, flags: u64, live: bool, buffer: usize, seed: u64) {
    let spec = format!("mock:v2,size={size},seed={seed},page={page},flags={flags:#x}");
    let mut src = mock(&spec);
    let mut dst = mock(&spec);
    assert_eq!(src.device.protocol(), Protocol::V2);
    let (stream, report) = save_to_vec(&mut src, &opts(live, buffer))
        .unwrap_or_else(|e| panic!("{spec} live={live}: save: {e}"));
    let st = handle(&src).status();
    assert_eq!(st.mig_state(), Some(MigState::Stop), "{spec}");
    assert_eq!(st.saves_completed, 1, "{spec}: {st:?}");
    let full = size.div_ceil(page) * 16 + size + 16;
    assert_eq!(st.bytes_saved, full, "{spec}");
    assert_eq!(
        report.pre_copy_bytes + report.stop_copy_bytes,
        full,
        "{spec}: {report:?}"
    );
    assert_eq!(live, report.pre_copy_bytes > 0, "{spec}: {report:?}");
    load_from_slice(&mut dst, &stream).unwrap_or_else(|e| panic!("{spec}: load: {e}"));
    let st = handle(&dst).status();
    assert!(st.resumed_ok, "{spec}: {st:?}");
    assert_eq!(st.mig_state(), Some(MigState::Running), "{spec}");
    assert_eq!(st.bytes_loaded, full, "{spec}");
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn save_then_resume_round_trips(
        size in 1u64..300_000,
        page in prop::sample::select(vec![512u64, 1000, 4096, 8192]),
        flags in prop::sample::select(vec![0x1u64, 0x3, 0x5, 0x7]),
        live in any::<bool>(),
        buffer in prop::sample::select(vec![4096usize, 6000, 65536]),
        seed in any::<u64>(),
    ) {
        // Live needs PRE_COPY (flag 4).
        let live = live && flags & 4 != 0;
        round_trip(size, page, flags, live, buffer, seed);
    }
}

#[test]
fn local_migration_live_and_not_with_every_flag_set() {
    for flags in [0x1u64, 0x3, 0x5, 0x7] {
        for live in [false, true] {
            if live && flags & 4 == 0 {
                continue;
            }
            let spec = format!("mock:v2,size=200K,seed=8,flags={flags:#x}");
            let mut src = mock(&spec);
            let mut dst = mock(&spec);
            let report = migrate_local(
                src.device.as_mut(),
                dst.device.as_mut(),
                &opts(live, 1 << 16),
                &NoObserver,
                &NoObserver,
            )
            .unwrap_or_else(|e| panic!("{spec} live={live}: {e}"));
            assert_eq!(live, report.save.pre_copy_bytes > 0, "{report:?}");
            assert_eq!(handle(&src).status().mig_state(), Some(MigState::Stop));
            assert!(handle(&dst).status().resumed_ok);
            assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
        }
    }
}

#[test]
fn live_without_pre_copy_is_stop_and_copy_only() {
    // As QEMU: a device without PRE_COPY is saved in stop-and-copy only, even with --live.
    for flags in ["0x1", "0x3"] {
        let spec = format!("mock:v2,size=64K,flags={flags}");
        let mut src = mock(&spec);
        let mut dst = mock(&spec);
        let (bytes, report) = save_to_vec(&mut src, &opts(true, 4096)).unwrap();
        assert!(
            report.stop_copy_only && report.pre_copy_bytes == 0,
            "{report:?}"
        );
        assert_eq!(report.rounds, 0);
        vfio_mig_tests::load_from_slice(&mut dst, &bytes).unwrap();
        assert!(handle(&dst).status().resumed_ok);
        assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
    }
}

#[test]
fn a_dirtying_device_needs_rounds_and_the_destination_gets_the_latest_state() {
    let spec = "mock:v2,size=1M,seed=2,dirty-rate=256M";
    let mut src = mock(spec);
    let mut dst = mock(spec);
    let opts = SaveOptions {
        live: true,
        policy: PreCopyPolicy {
            switchover_bytes: 64 << 10,
            max_rounds: 20,
            ..Default::default()
        },
        buffer: 16 << 10,
        ..Default::default()
    };
    let report = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts,
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert!(report.save.rounds >= 1, "{report:?}");
    assert!(report.save.pre_copy_bytes >= 1 << 20, "{report:?}");
    let st = handle(&src).status();
    assert!(st.dirtied_pages > 0, "{st:?}");
    assert!(handle(&dst).status().resumed_ok);
    assert_eq!(handle(&src).state_digest(), handle(&dst).state_digest());
    assert_ne!(
        handle(&mock(spec)).state_digest(),
        handle(&dst).state_digest(),
        "the destination holds the dirtied generations, not the initial ones"
    );
}

#[test]
fn a_wrong_seed_is_refused_and_the_destination_reset() {
    let mut src = mock("mock:v2,size=64K,seed=1");
    let (stream, _) = save_to_vec(&mut src, &opts(true, 4096)).unwrap();
    let mut dst = mock("mock:v2,size=64K,seed=2");
    let err = load_from_slice(&mut dst, &stream).unwrap_err();
    let text = vfio_mig::error::Report(&err).to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains("EINVAL") || text.contains("os error 22"),
        "{text}"
    );
    let st = handle(&dst).status();
    assert_destination_safe(&st, "wrong seed");
    assert_eq!(st.mig_state(), Some(MigState::Running));
    assert!(st.resets >= 1, "{st:?}");
    let why = st.last_refusal.unwrap_or_default();
    assert!(
        why.contains("does not match this device's content"),
        "{why}"
    );
}

#[test]
fn a_v1_stream_is_refused_before_the_v2_device_is_touched() {
    let mut src = mock("mock:v1,size=16K");
    let (stream, _) = save_to_vec(&mut src, &opts(false, 4096)).unwrap();
    let mut dst = mock("mock:v2,size=16K");
    let err = load_from_slice(&mut dst, &stream).unwrap_err();
    assert!(
        vfio_mig::error::Report(&err).to_string().contains("v1"),
        "{err}"
    );
    let st = handle(&dst).status();
    assert_eq!((st.data_fds, st.resets), (0, 0), "{st:?}");
}

#[test]
fn open_picks_the_v2_driver_and_probe_details_come_from_the_mock() {
    let mut dev = mock("mock:v2,size=64K,flags=0x5");
    assert_eq!(dev.device.protocol(), Protocol::V2);
    let caps = dev.device.capabilities();
    assert!(caps.pre_copy && !caps.p2p);
    assert_eq!(caps.migration_flags, 5);
    let details = dev.device.details().unwrap();
    let get = |k: &str| details.iter().find(|(n, _)| n == k).unwrap().1.clone();
    assert_eq!(get("device state"), "RUNNING (2)");
    assert_eq!(
        get("stop-copy data size"),
        format!("{} bytes", 16 * 16 + 65536 + 16)
    );
    assert_eq!(get("dma logging"), "supported");
    assert_eq!(get("pre-copy info"), "v2 (REINIT reported)");
    let dev = mock("mock:v2,size=64K,dma=off");
    let mut d = dev;
    let details = d.device.details().unwrap();
    let dma = &details.iter().find(|(n, _)| n == "dma logging").unwrap().1;
    assert!(dma.starts_with("not supported"), "{dma}");
}

#[test]
fn a_failed_source_runs_again_and_its_state_can_still_be_saved() {
    // The arc into STOP_COPY fails; the driver takes the source back to RUNNING.
    let spec = "mock:v2,size=64K,seed=4";
    let mut src = mock(&format!("{spec},fail-at=set-state:STOP_COPY@1"));
    let mut dst = mock(spec);
    let err = migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts(true, 4096),
        &NoObserver,
        &NoObserver,
    )
    .unwrap_err();
    assert!(
        vfio_mig::error::Report(&err)
            .to_string()
            .contains("STOP_COPY"),
        "{err}"
    );
    assert_source_running(&handle(&src).status(), "failed arc");
    assert_destination_safe(&handle(&dst).status(), "failed arc");
    assert_eq!(handle(&src).status().resets, 0, "walked back, not reset");
    // The same devices migrate fine afterwards.
    migrate_local(
        src.device.as_mut(),
        dst.device.as_mut(),
        &opts(true, 4096),
        &NoObserver,
        &NoObserver,
    )
    .unwrap();
    assert!(handle(&dst).status().resumed_ok);
}
