// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pre-copy rules against the kernel's mtty driver (issue 10): a pause (STOP) requested in
//! PRE_COPY, a pause and resume while pre-copy runs, and the destination barrier of a unit of
//! two devices. What each test expects comes from the uAPI (vfio.h: the FSM's arcs, "the
//! data_fd ... continues" from PRE_COPY to STOP_COPY) and QEMU's hw/vfio/migration.c
//! (`vfio_vmstate_change`, `vfio_vmstate_change_prepare`), checked on the kernel's own state.

use std::os::fd::AsFd;
use std::sync::Arc;

use vfio_mig::wire::StreamHeader;
use vfio_mig::{backend::v2_state::MigState, backend::V2Device};
use vfio_mig::{DestinationOptions, Epoch, Source, SourceOptions};
use vfio_mig::{MigrationDevice, NoObserver, SaveOptions};
use vfio_mig_tests::open_device;
use vfio_mig_tests::recorder::{barrier_violation, recorder, Recorder, StateProbe, UnitLog};

use super::migration::{
    ensure_running, mig_state, ok, pair, path_str, read_state, vfio_mig, write_state,
};

/// The inode of a device's current data fd: the same inode is the same migration file.
fn data_fd_inode(dev: &dyn MigrationDevice) -> u64 {
    let fd = dev.data_fd().expect("a saving session has a data fd");
    nix::sys::stat::fstat(fd.as_fd())
        .expect("fstat the data fd")
        .st_ino
}

/// Opens an mtty device through the library (backend of this run).
fn open(path: &std::path::Path) -> Box<dyn MigrationDevice> {
    let opened = open_device(path_str(path)).expect("open the mtty device");
    Box::new(V2Device::open(opened.io.clone()).expect("mtty speaks v2"))
}

/// A VMM pausing its VM during pre-copy: the device goes PRE_COPY -> STOP_COPY on the same
/// data fd (the kernel keeps the migration file; QEMU's vfio_vmstate_change does the same),
/// and completing the migration then moves the whole serial state.
#[test]
fn a_pause_in_pre_copy_goes_to_stop_copy_on_the_same_data_fd() {
    let (a, b) = pair(0, 1);
    ensure_running(&a);
    ensure_running(&b);
    let expected = write_state(&a, 0x5c);
    write_state(&b, 0x06);
    let mut src =
        Source::start(vec![open(&a)], &SourceOptions::new(Epoch(1))).expect("start pre-copy");
    let mut stream = Vec::new();
    let round = src.round(&mut stream, None).expect("a pre-copy round");
    eprintln!("pre-copy round: {round:?}");
    let dev = src.devices().next().expect("one device").as_mut();
    assert_eq!(dev.state_name().unwrap(), "PRE_COPY");
    let before = data_fd_inode(dev);
    dev.stop().expect("pause in pre-copy");
    // The kernel's own answer, not the library's bookkeeping.
    assert_eq!(dev.state_name().unwrap(), "STOP_COPY");
    assert_eq!(
        data_fd_inode(dev),
        before,
        "the pause opened a new migration file"
    );
    src.switch_over(&mut stream)
        .expect("complete a paused migration");
    let mut dst = vec![open(&b)];
    vfio_mig::resume(&mut dst, &stream[..], &DestinationOptions::new())
        .expect("resume the destination");
    drop(src.finish());
    drop(dst);
    assert_eq!(read_state(&b), expected);
    assert_eq!(mig_state(&a), MigState::Stop);
    assert_eq!(mig_state(&b), MigState::Running);
}

/// A VMM pausing and continuing its VM while pre-copy runs: the device runs again (RUNNING,
/// its serial state intact), the interrupted migration cannot complete on a migration file
/// the kernel closed and fails cleanly (the source left RUNNING), and a new migration works.
#[test]
fn a_pause_and_resume_during_pre_copy_leaves_a_running_device_and_a_clean_failure() {
    let (a, b) = pair(2, 3);
    ensure_running(&a);
    ensure_running(&b);
    let expected = write_state(&a, 0x3e);
    let mut src =
        Source::start(vec![open(&a)], &SourceOptions::new(Epoch(1))).expect("start pre-copy");
    let mut stream = Vec::new();
    src.round(&mut stream, None).expect("a pre-copy round");
    {
        let dev = src.devices().next().expect("one device");
        dev.stop().expect("pause");
        assert_eq!(dev.state_name().unwrap(), "STOP_COPY");
        dev.run().expect("continue");
        assert_eq!(dev.state_name().unwrap(), "RUNNING");
    }
    let err = src
        .switch_over(&mut stream)
        .expect_err("the kernel closed the migration file when the device ran again");
    eprintln!("interrupted migration: {}", vfio_mig::error::Report(&err));
    let mut devs = src.into_devices();
    assert_eq!(devs[0].state_name().unwrap(), "RUNNING", "{err}");
    devs.clear();
    // The device still holds its state, and migrates it when asked again.
    write_state(&b, 0x01);
    ok(&vfio_mig(&[
        "migrate",
        path_str(&a),
        path_str(&b),
        "--live",
    ]));
    assert_eq!(read_state(&b), expected);
    ensure_running(&a);
}

/// The destination barrier on two mtty destinations (QEMU's vfio_vmstate_change_prepare):
/// each leaves RESUMING for STOP (its data accepted by the driver) and reaches RUNNING_P2P
/// before either runs; the kernel's state of each device is read after each of its changes.
#[test]
fn no_mtty_destination_runs_before_both_are_loaded_and_quiescent() {
    let (a, b) = pair(0, 1);
    let (c, d) = pair(2, 3);
    for dev in [&a, &b, &c, &d] {
        ensure_running(dev);
    }
    let expected_b = write_state(&a, 0x41);
    let expected_d = write_state(&c, 0x42);
    write_state(&b, 0x10);
    write_state(&d, 0x11);
    let mut srcs = vec![open(&a), open(&c)];
    let log = UnitLog::new(2);
    let probe: StateProbe = Arc::new(|dev: &mut dyn MigrationDevice, _| {
        dev.state_name()
            .unwrap_or_else(|e| format!("unknown ({e})"))
    });
    let mut dsts: Vec<Recorder> = [open(&b), open(&d)]
        .into_iter()
        .enumerate()
        .map(|(slot, inner)| recorder(inner, slot, log.clone(), probe.clone()))
        .collect();
    {
        let mut s: Vec<&mut dyn MigrationDevice> =
            srcs.iter_mut().map(|x| x.as_mut() as _).collect();
        let mut t: Vec<&mut dyn MigrationDevice> = dsts
            .iter_mut()
            .map(|x| x as &mut dyn MigrationDevice)
            .collect();
        let header =
            StreamHeader::new(&s.iter().map(|x| &**x).collect::<Vec<_>>(), true, 1).unwrap();
        let opts = SaveOptions {
            live: true,
            ..Default::default()
        };
        vfio_mig_session::handshake::migrate_pairs(
            &mut s,
            &mut t,
            &header,
            &opts,
            &mut vfio_mig_fence::MemoryFence::new(),
            &NoObserver,
            &NoObserver,
        )
        .map_err(|e| vfio_mig::error::Report(&e).to_string())
        .expect("migrate the unit");
    }
    drop(srcs);
    drop(dsts);
    let snapshots = log.lock().unwrap().snapshots.clone();
    eprintln!("destination states: {snapshots:?}");
    assert!(
        barrier_violation(&snapshots, "RUNNING", "RUNNING_P2P").is_none(),
        "a destination ran before its peer was loaded and quiescent: {snapshots:?}"
    );
    assert!(
        snapshots
            .iter()
            .any(|s| s.iter().all(|x| x == "RUNNING_P2P")),
        "both destinations never stood in RUNNING_P2P together: {snapshots:?}"
    );
    assert!(
        snapshots.iter().any(|s| s.iter().any(|x| x == "STOP")),
        "no destination passed through STOP (RESUMING -> STOP): {snapshots:?}"
    );
    assert_eq!(snapshots.last().unwrap(), &["RUNNING", "RUNNING"]);
    assert_eq!(read_state(&b), expected_b);
    assert_eq!(read_state(&d), expected_d);
}
