// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crate-root front door (`Source`, `resume`) as a VMM drives it: rounds it paces itself,
//! several devices as one unit, and rollback on failure.

use vfio_mig::error::Report;
use vfio_mig::{resume, DestinationOptions, Epoch, MigrationDevice, Source, SourceOptions};
use vfio_mig_tests::{assert_destination_safe, assert_source_running, mock, MockDevice};

/// Both protocols in one unit: a v1 device has no P2P states, so the unit opts in.
fn unit() -> SourceOptions {
    SourceOptions::new(Epoch(1)).allow_non_p2p_unit(true)
}

fn split(
    devs: Vec<MockDevice>,
) -> (
    Vec<Box<dyn MigrationDevice>>,
    Vec<vfio_mig_mock::MockHandle>,
) {
    devs.into_iter()
        .map(|d| (d.opened.device, d.handle))
        .unzip()
}

#[test]
fn a_vmm_paced_live_migration_of_two_devices() {
    let specs = [
        "mock:v2,size=2M,seed=4,dirty-rate=1M",
        "mock:v1,size=1M,seed=5,chunk=64K",
    ];
    let (srcs, src_handles) = split(specs.iter().map(|s| mock(s)).collect());
    let (mut dsts, dst_handles) = split(specs.iter().map(|s| mock(s)).collect());
    // Both protocols in one unit; a v1 device has no P2P states, so the unit opts in.
    let mut source = Source::start(srcs, &unit()).unwrap();
    let mut wire = Vec::new();
    let first = source.estimate().unwrap();
    // Both devices have pre-copy data; v1 cannot estimate its stop-and-copy size, so the
    // unit's estimate says it is unknown rather than summing part of it.
    assert!(first.pending >= (2 << 20) + (1 << 20), "{first:?}");
    assert_eq!(first.stop_copy, None);
    let mut rounds = 0;
    let mut sent = 0;
    loop {
        let round = source.round(&mut wire, None).unwrap();
        rounds += 1;
        sent += round.sent;
        if round.estimate.pending < (256 << 10) || rounds == 20 {
            break;
        }
    }
    assert!(
        sent >= (3 << 20),
        "the rounds sent the initial data ({sent} bytes)"
    );
    source.switch_over(&mut wire).unwrap();
    let stream = wire;
    resume(
        &mut dsts,
        &stream[..],
        &DestinationOptions::new().allow_non_p2p_unit(true),
    )
    .unwrap();
    for (s, d) in src_handles.iter().zip(&dst_handles) {
        assert!(d.status().resumed_ok, "{:?}", d.status());
        assert_eq!(s.state_digest(), d.state_digest());
    }
}

#[test]
fn a_v2_device_gives_its_stop_copy_estimate() {
    let (srcs, _h) = split(vec![mock("mock:v2,size=1M,seed=6")]);
    // Both protocols in one unit; a v1 device has no P2P states, so the unit opts in.
    let mut source = Source::start(srcs, &unit()).unwrap();
    let mut wire = Vec::new();
    let before = source
        .estimate()
        .unwrap()
        .stop_copy
        .expect("v2 has MIG_DATA_SIZE");
    // The mock's whole stream: 256 pages of 4 KiB with a packet header each, and END.
    assert!(before >= 1 << 20, "{before}");
    while source.round(&mut wire, None).unwrap().estimate.pending > 0 {}
    let after = source.estimate().unwrap().stop_copy.unwrap();
    assert!(
        after < before,
        "pre-copy moved data out of stop-and-copy: {before} -> {after}"
    );
    source.cancel();
}

#[test]
fn a_failed_round_returns_every_source_to_running() {
    let specs = [
        "mock:v2,size=1M,seed=7,fail-at=data-read@2",
        "mock:v1,size=1M,seed=8,chunk=64K",
    ];
    let (srcs, handles) = split(specs.iter().map(|s| mock(s)).collect());
    // Both protocols in one unit; a v1 device has no P2P states, so the unit opts in.
    let mut source = Source::start(srcs, &unit()).unwrap();
    let mut wire = Vec::new();
    let err = loop {
        match source.round(&mut wire, None) {
            Ok(r) if r.estimate.pending == 0 => break source.switch_over(&mut wire).unwrap_err(),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    let text = Report(&err).to_string();
    assert!(text.contains("returned to RUNNING"), "{text}");
    for h in &handles {
        assert_source_running(&h.status(), "front door");
    }
}

#[test]
fn a_corrupt_stream_resets_every_destination() {
    let specs = [
        "mock:v2,size=256K,seed=9",
        "mock:v1,size=256K,seed=10,chunk=64K",
    ];
    let (srcs, _s) = split(specs.iter().map(|s| mock(s)).collect());
    let (mut dsts, dst_handles) = split(specs.iter().map(|s| mock(s)).collect());
    // Both protocols in one unit; a v1 device has no P2P states, so the unit opts in.
    let mut source = Source::start(srcs, &unit()).unwrap();
    let mut wire = Vec::new();
    source.switch_over(&mut wire).unwrap();
    let mut stream = wire;
    let at = stream.len() / 2;
    stream[at] ^= 0x40;
    let err = resume(
        &mut dsts,
        &stream[..],
        &DestinationOptions::new().allow_non_p2p_unit(true),
    )
    .unwrap_err();
    assert!(
        Report(&err).to_string().contains("was reset"),
        "{}",
        Report(&err)
    );
    for h in &dst_handles {
        assert_destination_safe(&h.status(), "front door");
    }
}

/// A VMM pausing its VM during pre-copy (QEMU's vfio_vmstate_change): the device goes to
/// STOP_COPY on the same session and `complete` moves the whole state (the mtty twin of this
/// test is tests/tests/guest/precopy.rs).
#[test]
fn a_pause_during_pre_copy_then_complete_moves_the_state() {
    for profile in ["mtty", "mlx5"] {
        let spec = format!("mock:v2,size=1M,seed=21,profile={profile}");
        let (srcs, src_handles) = split(vec![mock(&spec)]);
        let (mut dsts, dst_handles) = split(vec![mock(&spec)]);
        let mut source = Source::start(srcs, &SourceOptions::new(Epoch(1))).unwrap();
        let mut wire = Vec::new();
        source.round(&mut wire, None).unwrap();
        let fds = src_handles[0].status().data_fds;
        source.devices().next().unwrap().stop().unwrap();
        assert_eq!(
            src_handles[0].status().state_name(),
            "STOP_COPY",
            "{profile}"
        );
        assert_eq!(
            src_handles[0].status().data_fds,
            fds,
            "{profile}: a new session"
        );
        source.switch_over(&mut wire).unwrap();
        let stream = wire;
        resume(
            &mut dsts,
            &stream[..],
            &DestinationOptions::new().allow_non_p2p_unit(true),
        )
        .unwrap_or_else(|e| panic!("{}", Report(&e)));
        assert!(dst_handles[0].status().resumed_ok, "{profile}");
        assert_eq!(src_handles[0].state_digest(), dst_handles[0].state_digest());
    }
}

/// A pause and resume while pre-copy runs: the device runs again, and the migration, whose
/// session the kernel ended when the device ran, fails cleanly with the source RUNNING.
#[test]
fn a_pause_and_resume_during_pre_copy_fails_the_migration_cleanly() {
    let spec = "mock:v2,size=1M,seed=22,profile=mtty";
    let (srcs, src_handles) = split(vec![mock(spec)]);
    let digest = src_handles[0].state_digest();
    let mut source = Source::start(srcs, &SourceOptions::new(Epoch(1))).unwrap();
    let mut wire = Vec::new();
    source.round(&mut wire, None).unwrap();
    let dev = source.devices().next().unwrap();
    dev.stop().unwrap();
    dev.run().unwrap();
    assert_eq!(src_handles[0].status().state_name(), "RUNNING");
    let err = source
        .switch_over(&mut wire)
        .expect_err("the session ended when the device ran");
    assert_source_running(&src_handles[0].status(), &Report(&err).to_string());
    assert_eq!(
        src_handles[0].state_digest(),
        digest,
        "the device's state changed"
    );
}

/// A VMM pacing its own rounds over a device whose pre-copy data is not ready yet (ENOMSG
/// meanwhile, as the uAPI allows): `wait_for_data` polls the data fd until it is, so the VMM
/// neither spins nor gives up; every byte then goes in pre-copy.
#[test]
fn a_vmm_waits_for_pre_copy_data_between_empty_rounds() {
    let spec = "mock:v2,size=256K,seed=23,precopy-delay=100ms";
    let (srcs, src_handles) = split(vec![mock(spec)]);
    let (mut dsts, dst_handles) = split(vec![mock(spec)]);
    let mut source = Source::start(srcs, &SourceOptions::new(Epoch(1))).unwrap();
    let mut wire = Vec::new();
    let mut sent = 0;
    let mut empty = 0;
    let mut woke = 0;
    for _ in 0..200 {
        let round = source.round(&mut wire, None).unwrap();
        sent += round.sent;
        if round.estimate.pending == 0 {
            break;
        }
        if round.sent == 0 {
            empty += 1;
            if source
                .wait_for_data(std::time::Duration::from_secs(5))
                .unwrap()
            {
                woke += 1;
            }
        }
    }
    assert!(sent >= 256 << 10, "pre-copy sent {sent} bytes");
    assert!(
        empty >= 1 && woke >= 1,
        "{empty} empty rounds, {woke} wake-ups"
    );
    // A poll that waits: a handful of ENOMSG answers, not a spin.
    assert!(
        src_handles[0].status().enomsg_reads <= 5,
        "{:?}",
        src_handles[0].status()
    );
    source.switch_over(&mut wire).unwrap();
    let stream = wire;
    resume(
        &mut dsts,
        &stream[..],
        &DestinationOptions::new().allow_non_p2p_unit(true),
    )
    .unwrap();
    assert!(dst_handles[0].status().resumed_ok);
}

/// A switch-over that fails after its quiesce (the state read of STOP_COPY's arc) must return
/// a P2P source to RUNNING, not leave it quiesced in RUNNING_P2P: the coarse run state reads
/// RUNNING_P2P as running, so "still where it started" is not enough. The uAPI's oracle: only
/// RUNNING lets the device initiate DMA again; RUNNING_P2P is not a running VM's state.
#[test]
fn a_switch_over_failing_after_the_quiesce_returns_a_p2p_source_to_running() {
    // pds: no PRE_COPY, so the switch-over is the migration's first arc (RUNNING_P2P, then
    // the read of the state on the way to STOP_COPY, which fails).
    let spec = "mock:v2,size=16K,page=4K,chunk=4K,profile=pds,fail-at=get-state@5";
    let MockDevice { opened, handle } = mock(spec);
    let mut source = match Source::start(vec![opened.device], &SourceOptions::new(Epoch(1))) {
        Ok(s) => s,
        Err(h) => panic!("start: {}", h.error),
    };
    let err = source
        .switch_over(&mut Vec::new())
        .expect_err("the state read fails");
    let st = handle.status();
    assert!(st.fault_hits > 0, "the fault fired: {st:?}");
    assert_eq!(st.state_name(), "RUNNING", "after: {}", Report(&err));
    assert_source_running(&st, "after a failed switch-over");
    assert_eq!(source.into_devices().len(), 1);
}
