// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door as a VMM meets it in its first week of failures (issue 18): devices handed
//! back with every error, a paused VM's devices never run, load and run in two calls, the
//! last dirty-log read with the devices in STOP_COPY, `Drop`, a parallel switch-over, no
//! estimate where MIG_DATA_SIZE is missing, initial bytes, a non-P2P destination unit.
//!
//! What each test expects comes from the uAPI (vfio.h: the FSM, "the device must not be
//! running" outside RUNNING states, `initial_bytes`, MIG_DATA_SIZE added in Linux 6.2) and
//! QEMU's hw/vfio/migration.c (a failed save returns the device to where the VM was; the last
//! dirty log is read with the devices in STOP_COPY; a unit without P2P is refused).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use vfio_mig::Result;

use vfio_mig::error::Report;
use vfio_mig::{
    Destination, DestinationOptions, Epoch, Handback, MigrationDevice, Source, SourceOptions,
    Status,
};
use vfio_mig_mock::MockHandle;
use vfio_mig_tests::wrap::{Call, Hooks, Wrapped};
use vfio_mig_tests::{assert_destination_safe, mock};

type Device = Box<dyn MigrationDevice>;

fn open(specs: &[&str]) -> (Vec<Device>, Vec<MockHandle>) {
    specs
        .iter()
        .map(|s| {
            let d = mock(s);
            (d.opened.device, d.handle)
        })
        .unzip()
}

fn opts() -> SourceOptions {
    SourceOptions::new(Epoch(1))
}

fn state(h: &MockHandle) -> String {
    h.status().state_name()
}

/// A refused PRE_COPY hands the devices back, running, and a unit the P2P check refuses
/// hands them back untouched: the VMM keeps devices it holds no other handle to.
#[test]
fn a_failed_start_hands_every_device_back() {
    let (devs, handles) = open(&[
        "mock:v2,size=256K,seed=1",
        "mock:v2,size=256K,seed=2,fail-at=set-state:PRE_COPY@1",
    ]);
    let Handback { error, devices } = Source::start(devs, &opts()).unwrap_err();
    let text = Report(&error).to_string();
    assert_eq!(devices.len(), 2, "{text}");
    assert!(text.contains("PRE_COPY"), "{text}");
    for h in &handles {
        assert_eq!(state(h), "RUNNING", "{text}");
    }
    // The devices still work: the same two migrate now.
    let mut source = Source::start(devices, &opts()).unwrap();
    source.switch_over(&mut std::io::sink()).unwrap();
    assert_eq!(source.finish().devices.len(), 2);

    let (devs, handles) = open(&["mock:v2,size=64K,seed=3", "mock:v1,size=64K,seed=4"]);
    let Handback { error, devices } = Source::start(devs, &opts()).unwrap_err();
    assert!(error.to_string().contains("P2P"), "{error}");
    assert_eq!(devices.len(), 2);
    assert!(handles.iter().all(|h| h.status().is_running()));
}

/// A paused VM (devices in STOP) migrates by stop-and-copy alone, the path snapshots take,
/// and a failure returns its devices to STOP, never RUNNING (v1 and v2).
#[test]
fn a_paused_vm_migrates_by_stop_and_copy_and_stays_stopped_on_failure() {
    for spec in [
        "mock:v2,size=512K,seed=5",
        "mock:v1,size=512K,seed=5,chunk=64K",
    ] {
        let (mut devs, src) = open(&[spec]);
        devs[0].stop().unwrap();
        let (dsts, dst) = open(&[spec]);
        let mut source = Source::start(devs, &opts()).unwrap();
        assert_eq!(source.start_states(), [vfio_mig::RunState::Stopped]);
        assert_eq!(state(&src[0]).split(' ').next(), Some("STOP"), "{spec}");
        let mut wire = Vec::new();
        let round = source.round(&mut wire, None).unwrap();
        assert_eq!(round.sent, 0, "{spec}: no pre-copy on a paused device");
        source.switch_over(&mut wire).unwrap();
        let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
        assert_eq!(dest.push(&wire).unwrap(), Status::Loaded);
        dest.run().unwrap();
        source.finish();
        assert!(dst[0].status().resumed_ok, "{spec}");
        assert_eq!(src[0].state_digest(), dst[0].state_digest(), "{spec}");
    }
    for (spec, stop) in [
        (
            "mock:v2,size=512K,seed=6,fail-at=set-state:STOP_COPY@1",
            "STOP",
        ),
        // ERROR: reset, then stopped again.
        (
            "mock:v2,size=512K,seed=6,fail-at=set-state:STOP_COPY@1:error",
            "STOP",
        ),
        (
            "mock:v1,size=512K,seed=6,chunk=64K,fail-at=data-offset@2",
            "STOP (000b)",
        ),
    ] {
        let (mut devs, src) = open(&[spec]);
        devs[0].stop().unwrap();
        let mut source = Source::start(devs, &opts()).unwrap();
        let err = source
            .switch_over(&mut std::io::sink())
            .err()
            .unwrap_or_else(|| panic!("{spec}: the fault did not fail the switch-over"));
        let text = Report(&err).to_string();
        assert_eq!(state(&src[0]), stop, "{spec}: {text}");
        assert!(
            text.contains("returned to STOP")
                || text.contains("is stopped")
                || text.contains("was reset"),
            "{spec}: {text}"
        );
        assert_eq!(source.into_devices().len(), 1);
        assert_eq!(state(&src[0]), stop, "{spec}");
    }
}

/// The destination loads, says so with no device running, and runs them only when asked
/// (after the VMM's own restore steps), P2P unit first to RUNNING_P2P.
#[test]
fn the_destination_loads_then_runs_in_a_separate_call() {
    let specs = ["mock:v2,size=256K,seed=7", "mock:v2,size=128K,seed=8"];
    let (srcs, src) = open(&specs);
    let (dsts, dst) = open(&specs);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let mut wire = Vec::new();
    source.round(&mut wire, None).unwrap();
    source.switch_over(&mut wire).unwrap();
    let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    // Any split: one byte at a time for the header, then odd pieces.
    let mut status = Status::NeedMore;
    let (head, rest) = wire.split_at(64);
    for b in head.chunks(1).chain(rest.chunks(4093)) {
        assert_eq!(status, Status::NeedMore);
        status = dest.push(b).unwrap();
    }
    assert_eq!(status, Status::Loaded);
    for h in &dst {
        assert_eq!(state(h), "STOP", "loaded, not running");
        assert!(!h.status().resumed_ok);
    }
    let devices = dest.run().unwrap();
    assert_eq!(devices.len(), 2);
    source.finish();
    for (s, d) in src.iter().zip(&dst) {
        assert!(d.status().resumed_ok);
        assert_eq!(state(d), "RUNNING");
        assert_eq!(s.state_digest(), d.state_digest());
    }
}

/// Dropping a loaded destination before `run` resets its devices: none runs the state.
#[test]
fn a_destination_dropped_before_run_resets_its_devices() {
    let spec = "mock:v2,size=128K,seed=9";
    let (srcs, _src) = open(&[spec]);
    let (dsts, dst) = open(&[spec]);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let mut wire = Vec::new();
    source.switch_over(&mut wire).unwrap();
    let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    dest.push(&wire[..wire.len() / 2]).unwrap();
    drop(dest);
    assert_destination_safe(&dst[0].status(), "half a stream, dropped");
    assert_eq!(dst[0].status().resets, 1);
    let (dsts, dst) = open(&[spec]);
    let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    assert_eq!(dest.push(&wire).unwrap(), Status::Loaded);
    let devices = dest.into_devices();
    assert_eq!(devices.len(), 1);
    assert_destination_safe(&dst[0].status(), "loaded, given up");
    assert_eq!(dst[0].status().resets, 1);
}

/// The switch-over leaves the devices in STOP_COPY for the VMM's last dirty-log read, which
/// on pds (DMA logging ends at STOP_COPY -> STOP) must come before `finish`.
#[test]
fn the_last_dirty_read_happens_with_the_devices_in_stop_copy() {
    let spec = "mock:v2,size=256K,seed=10,profile=pds,dma-dirty=8";
    let opened = mock(spec);
    let (io, src) = (opened.opened.io.clone(), [opened.handle]);
    let srcs = vec![opened.opened.device];
    let (dsts, _dst) = open(&[spec]);
    let range = vfio_mig::backend::DmaLoggingRange {
        iova: 0,
        length: 1 << 20,
    };
    io.dma_logging_start(&[range], 4096).unwrap();
    let mut source = Source::start(srcs, &opts()).unwrap();
    let mut wire = Vec::new();
    source.round(&mut wire, None).unwrap();
    source.switch_over(&mut wire).unwrap();
    assert_eq!(state(&src[0]), "STOP_COPY");
    let mut bitmap = [0u64; 4];
    io.dma_logging_report(0, 1 << 20, 4096, &mut bitmap)
        .expect("the DMA log is still readable in STOP_COPY");
    let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    dest.push(&wire).unwrap();
    dest.run().unwrap();
    let finished = source.finish();
    assert!(finished.stop_failures.is_empty());
    assert_eq!(state(&src[0]), "STOP");
}

/// Dropping a source in pre-copy (a VMM's `?` on its own error) rolls every device back; a
/// panic inside the switch-over (here: in the VMM's writer) leaves no device orphaned.
#[test]
fn dropping_or_panicking_rolls_the_source_back() {
    let specs = ["mock:v2,size=256K,seed=11", "mock:v2,size=256K,seed=12"];
    let (srcs, src) = open(&specs);
    let mut source = Source::start(srcs, &opts()).unwrap();
    source.round(&mut Vec::new(), Some(4096)).unwrap();
    assert_eq!(state(&src[0]), "PRE_COPY");
    drop(source);
    for h in &src {
        assert_eq!(state(h), "RUNNING");
    }

    struct Panicking(usize);
    impl std::io::Write for Panicking {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            assert!(self.0 < 200_000, "the VMM's writer panics");
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (srcs, src) = open(&specs);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _ = source.switch_over(&mut Panicking(0));
    }));
    assert!(outcome.is_err(), "the writer panicked");
    for h in &src {
        assert_eq!(state(h), "RUNNING", "rolled back by Drop while unwinding");
    }
}

/// Linux 5.18 to 6.1 have no MIG_DATA_SIZE (ENOTTY): a round reports the stop-and-copy size
/// as unknown instead of failing and rolling back.
#[test]
fn no_mig_data_size_is_an_unknown_estimate_not_a_failure() {
    let rules: String = (1..=8)
        .map(|n| format!(",fail-at=data-size@{n}:ENOTTY"))
        .collect();
    let (srcs, src) = open(&[&format!("mock:v2,size=256K,seed=13{rules}")]);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let round = source
        .round(&mut Vec::new(), None)
        .unwrap_or_else(|e| panic!("{}", Report(&e)));
    assert_eq!(round.estimate.stop_copy, None);
    assert_eq!(round.estimate.switch_over_bytes(), None);
    assert_eq!(state(&src[0]), "PRE_COPY");
    source.cancel();
}

/// `initial_bytes` is carried: positive before the first round, 0 once pre-copy sent them.
#[test]
fn the_estimate_carries_initial_bytes() {
    let (srcs, _src) = open(&["mock:v2,size=256K,seed=14"]);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let first = source.estimate().unwrap();
    assert!(first.initial_bytes > 0, "{first:?}");
    assert!(first.initial_bytes <= first.pending, "{first:?}");
    let mut wire = Vec::new();
    let mut last = first;
    for _ in 0..50 {
        last = source.round(&mut wire, None).unwrap().estimate;
        if last.initial_bytes == 0 {
            break;
        }
    }
    assert_eq!(last.initial_bytes, 0, "{last:?}");
    source.cancel();
}

/// A round's byte budget bounds what it writes (up to one read's overshoot), and the rounds'
/// pieces concatenate into one stream a destination loads.
#[test]
fn rounds_respect_a_byte_budget_and_concatenate() {
    let spec = "mock:v2,size=1M,seed=15";
    let (srcs, src) = open(&[spec]);
    let (dsts, dst) = open(&[spec]);
    let mut source = Source::start(srcs, &opts()).unwrap();
    let mut dest = Destination::new(dsts, &DestinationOptions::new()).unwrap();
    let budget = 100_000;
    for _ in 0..100 {
        let mut frame = Vec::new();
        let round = source.round(&mut frame, Some(budget)).unwrap();
        assert_eq!(round.written, frame.len() as u64);
        assert!(frame.len() < budget as usize + 8192, "{}", frame.len());
        assert_eq!(dest.push(&frame).unwrap(), Status::NeedMore);
        if round.estimate.pending == 0 {
            break;
        }
    }
    let mut frame = Vec::new();
    source.switch_over(&mut frame).unwrap();
    assert_eq!(dest.push(&frame).unwrap(), Status::Loaded);
    dest.run().unwrap();
    source.finish();
    assert_eq!(src[0].state_digest(), dst[0].state_digest());
}

/// A destination unit without P2P is refused (its devices handed back untouched) unless the
/// destination itself opts in.
#[test]
fn a_non_p2p_destination_unit_is_refused_unless_opted_in() {
    let specs = [
        "mock:v2,size=64K,seed=16",
        "mock:v2,size=64K,seed=17,flags=5",
    ];
    let (dsts, dst) = open(&specs);
    let Handback { error, devices } =
        Destination::new(dsts, &DestinationOptions::new()).unwrap_err();
    assert!(error.to_string().contains("P2P"), "{error}");
    assert_eq!(devices.len(), 2);
    assert!(dst.iter().all(|h| h.status().resets == 0));
    let dest = Destination::new(devices, &DestinationOptions::new().allow_non_p2p_unit(true));
    assert!(dest.is_ok());
}

/// Hooks of devices that meet: each waits in `start_stop_copy` until all of the unit are there. A
/// serial switch-over never gets them all there (the first waits alone and gives up).
struct Meeting {
    room: Arc<(Mutex<usize>, Condvar)>,
    unit: usize,
}

impl Meeting {
    fn meet(&self) -> Result<()> {
        let (count, cv) = &*self.room;
        let mut n = count.lock().unwrap();
        *n += 1;
        cv.notify_all();
        let (n, timeout) = cv
            .wait_timeout_while(n, Duration::from_secs(10), |n| *n < self.unit)
            .unwrap();
        if timeout.timed_out() {
            return Err(vfio_mig::Error::InvalidInput(format!(
                "only {} of {} devices entered STOP_COPY together",
                *n, self.unit
            )));
        }
        Ok(())
    }
}

impl Hooks for Meeting {
    fn before(&mut self, _dev: &mut dyn MigrationDevice, call: Call) -> Result<()> {
        match call {
            Call::StartStopCopy => self.meet(),
            _ => Ok(()),
        }
    }
}

/// The switch-over moves the devices of a unit in parallel (downtime: one device's, not the
/// sum), as the engine's own unit path does.
#[test]
fn the_switch_over_moves_a_unit_in_parallel() {
    let specs = [
        "mock:v2,size=128K,seed=18",
        "mock:v2,size=128K,seed=19",
        "mock:v2,size=128K,seed=20",
    ];
    let (devs, src) = open(&specs);
    let room = Arc::new((Mutex::new(0), Condvar::new()));
    let devs: Vec<Wrapped<Meeting>> = devs
        .into_iter()
        .map(|inner| {
            let room = room.clone();
            Wrapped::new(inner, Meeting { room, unit: 3 })
        })
        .collect();
    let mut source = Source::start(devs, &opts()).unwrap();
    source
        .switch_over(&mut std::io::sink())
        .unwrap_or_else(|e| panic!("{}", Report(&e)));
    source.finish();
    assert!(src.iter().all(|h| state(h) == "STOP"));
}
