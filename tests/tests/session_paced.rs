// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The session layer around a VMM-paced source (issue 18 item 3): the VMM runs its own rounds
//! with its own byte budgets and its own switch-over; the session adds HELLO/ACCEPT,
//! SWITCHOVER_ACK and the two-phase end (LOADED, COMMIT, RESUMED | PARTLY_RESUMED | FAILED)
//! over a real socket, with the session crate's destination (`receive`, or a
//! `SessionDestination` paced by the test: load, its own restore steps, run) on the other end.
//!
//! The oracles: the mock's own verification of every byte it loads (it refuses RUNNING on a
//! difference), the uAPI's states (a source stays in STOP_COPY until the handoff ends, a
//! paused VM's device is never run), and the point of no return of engine/run.rs: once a
//! destination device runs the state, the source never runs it again.

use std::sync::Mutex;

use vfio_mig::wire::StreamHeader;
use vfio_mig::Event;

use vfio_mig::MigrationDevice;

use vfio_mig::NoObserver;

use vfio_mig::error::Report;
use vfio_mig::wire::Phase;
use vfio_mig::SaveOptions;
use vfio_mig::{Epoch, Handback, Source, SourceOptions};
use vfio_mig_fence::{Admission, Fence, MemoryFence};
use vfio_mig_mock::MockHandle;
use vfio_mig_session::handshake::{
    open_session, receive, send, Admitted, Answer, RecvOutcome, SessionDestination, SessionSource,
};
use vfio_mig_session::transport::Connection;
use vfio_mig_tests::{handle, mock, MockDevice};

/// The byte budget of the VMM's rounds.
const BUDGET: u64 = 40 << 10;
/// A round ends at a chunk boundary within one read (a page at least) and its record header
/// of its budget.
const OVERSHOOT: u64 = 4096 + 64;

/// How the VMM-paced handoff ended.
struct Paced {
    /// The source's outcome: `Ok` once RESUMED came back.
    committed: Result<(), String>,
    /// The source devices, back in the VMM's hands.
    devices: Vec<Box<dyn MigrationDevice>>,
    /// The destination's outcome.
    received: vfio_mig_session::Result<RecvOutcome>,
    /// The stream's header.
    header: vfio_mig::wire::StreamHeader,
    /// Rounds the VMM ran.
    rounds: u32,
}

/// Migrates `src` into `dst` as a VMM paces it: its own rounds of at most [`BUDGET`] stream
/// bytes (checked), its own switch-over (the devices then checked in STOP_COPY, where the VMM
/// reads its last dirty pages), then COMMIT over a real socket; the destination is the
/// session crate's `SessionDestination`, which loads, lets the test check that nothing runs
/// (the VMM's restore steps), then runs.
fn paced(src: Vec<MockDevice>, dst: &mut [MockDevice], fence: &mut MemoryFence) -> Paced {
    let (devs, handles): (Vec<Box<dyn MigrationDevice>>, Vec<MockHandle>) =
        src.into_iter().map(|d| (d.opened.device, d.handle)).unzip();
    let source = match Source::prepare(devs, &SourceOptions::new(Epoch(1))) {
        Ok(s) => s,
        Err(h) => panic!("prepare: {}", h.error),
    };
    let header = source.header().clone();
    let (a, b) = Connection::pair().unwrap();
    std::thread::scope(|s| {
        let dst_handles: Vec<MockHandle> = dst.iter().map(handle).collect();
        let loader = s.spawn(move || {
            let d: Vec<&mut dyn MigrationDevice> =
                dst.iter_mut().map(|d| d.device.as_mut() as _).collect();
            let opening = open_session(b, None)?;
            let mut session = match SessionDestination::accept(opening, d, fence) {
                Ok(Admitted::Accepted(session)) => session,
                Ok(Admitted::AlreadyCompleted { .. }) => panic!("a new session completed"),
                Err(h) => return Err(vfio_mig_session::Error::from(*h.error)),
            };
            session.load(&NoObserver)?;
            // The VMM's restore steps: every device loaded and committed, none running.
            for h in &dst_handles {
                let st = h.status();
                assert!(!st.is_running() && !st.resumed_ok, "{st:?}");
            }
            session
                .run()
                .map(|(_, outcome)| outcome)
                .map_err(|h| vfio_mig_session::Error::from(*h.error))
        });
        let mut session = match SessionSource::open(source, a) {
            Ok(Answer::Accepted(s)) => s,
            Ok(Answer::AlreadyCompleted(_)) => panic!("a new session was already completed"),
            Err(h) => panic!("open: {}", h.error),
        };
        // Untouched until ACCEPT, in pre-copy after it.
        for h in &handles {
            assert_eq!(h.status().state_name(), "PRE_COPY");
        }
        let mut rounds = 0;
        loop {
            let round = session.round(Some(BUDGET)).expect("a round");
            rounds += 1;
            assert!(
                round.written <= BUDGET + OVERSHOOT,
                "round {rounds} wrote {} bytes over a budget of {BUDGET}",
                round.written
            );
            // The VMM's own policy: switch over once the devices hold nothing more.
            if round.estimate.pending == 0 {
                break;
            }
            assert!(rounds < 1000, "pre-copy does not end: {round:?}");
        }
        session.switch_over().expect("the switch-over");
        // The devices wait in STOP_COPY while the VMM reads its last dirty pages.
        for h in &handles {
            assert_eq!(h.status().state_name(), "STOP_COPY");
        }
        let (committed, devices) = match session.commit() {
            Ok(finished) => {
                assert!(
                    finished.stop_failures.is_empty(),
                    "{:?}",
                    finished.stop_failures
                );
                (Ok(()), finished.devices)
            }
            Err(Handback { error, devices }) => (Err(Report(&*error).to_string()), devices),
        };
        Paced {
            committed,
            devices,
            received: loader.join().unwrap(),
            header,
            rounds,
        }
    })
}

/// A unit of two migrates as its VMM paces it, over the session: several rounds within the
/// budget, the devices in STOP_COPY after the switch-over, COMMIT and RESUMED, the
/// destination running the verified state and the sources stopped for good.
#[test]
fn a_vmm_paced_unit_migrates_over_the_session() {
    let src = devices(2, 11, None);
    let handles: Vec<MockHandle> = src.iter().map(handle).collect();
    let mut dst = devices(2, 11, None);
    let mut fence = MemoryFence::new();
    let out = paced(src, &mut dst, &mut fence);
    assert_eq!(out.committed, Ok(()));
    assert!(
        matches!(
            out.received,
            Ok(RecvOutcome::Resumed {
                confirmed: true,
                ..
            })
        ),
        "{:?}",
        out.received
    );
    assert_eq!(out.devices.len(), 2, "no device lost");
    assert!(out.rounds > 1, "the budget split pre-copy into rounds");
    for (s, d) in handles.iter().zip(&dst) {
        let ds = handle(d).status();
        assert!(ds.resumed_ok && ds.is_running(), "{ds:?}");
        assert_eq!(s.state_digest(), handle(d).state_digest());
        assert_eq!(s.status().state_name(), "STOP");
    }
    assert_eq!(
        fence.admit(&out.header).unwrap(),
        Admission::AlreadyCompleted
    );
}

/// A destination device that cannot enter RUNNING, after COMMIT. When it is the first of the
/// unit, no device ran: the destination answers FAILED and the VMM's devices run again. When
/// a peer ran before it, the state runs there (PARTLY_RESUMED): the sources stay stopped,
/// never to run it again, the destination keeps its completion record, and the error says so.
#[test]
fn a_fault_after_commit_obeys_the_point_of_no_return() {
    for failing in [0, 1] {
        let ctx = format!("destination {failing} fails to run");
        let src = devices(2, 21, None);
        let handles: Vec<MockHandle> = src.iter().map(handle).collect();
        let mut dst = devices(2, 21, Some((failing, "set-state:RUNNING@1")));
        let mut fence = MemoryFence::new();
        let out = paced(src, &mut dst, &mut fence);
        let text = out.committed.expect_err(&ctx);
        assert!(!text.contains('\n'), "{ctx}: one line: {text}");
        assert!(out.received.is_err(), "{ctx}");
        assert_eq!(out.devices.len(), 2, "{ctx}: no device lost: {text}");
        let admitted = fence.admit(&out.header).unwrap();
        if failing == 0 {
            assert!(!text.contains("point of no return"), "{ctx}: {text}");
            for (i, h) in handles.iter().enumerate() {
                assert!(
                    h.status().is_running(),
                    "{ctx}: source {i} runs again: {text}"
                );
                assert!(
                    !handle(&dst[i]).status().resumed_ok,
                    "{ctx}: destination {i} ran"
                );
            }
            assert_ne!(admitted, Admission::AlreadyCompleted, "{ctx}");
        } else {
            assert!(text.contains("point of no return"), "{ctx}: {text}");
            for (i, h) in handles.iter().enumerate() {
                let st = h.status();
                assert!(
                    !st.is_running() && st.state_name() != "PRE_COPY",
                    "{ctx}: source {i} runs the state destination 0 runs: {st:?}; {text}"
                );
            }
            assert!(handle(&dst[0]).status().resumed_ok, "{ctx}");
            assert_eq!(handles[0].state_digest(), handle(&dst[0]).state_digest());
            assert_eq!(
                admitted,
                Admission::AlreadyCompleted,
                "{ctx}: a retry must not run it"
            );
        }
    }
}

/// mtty's flags (STOP_COPY | P2P | PRE_COPY), small chunks so rounds have several records.
const SPEC: &str = "mock:v2,size=256K,chunk=16K";

fn devices(n: usize, seed: u64, fault: Option<(usize, &str)>) -> Vec<MockDevice> {
    (0..n)
        .map(|i| {
            let mut spec = format!("{SPEC},seed={}", seed + i as u64);
            if let Some((at, rule)) = fault {
                if at == i {
                    spec.push_str(&format!(",fail-at={rule}"));
                }
            }
            mock(&spec)
        })
        .collect()
}

/// Starting from a paused VM works through the session layer as through the front door: a
/// live `send` (the command line's `send --live`) of a paused VM's device migrates it in
/// stop-and-copy only (QEMU's save of a stopped VM), the destination running the verified
/// state and the source left stopped. Before the session layer was built on the front door,
/// `send` put every device into pre-copy, which the uAPI refuses from STOP, and failed.
#[test]
fn a_live_send_of_a_paused_vm_moves_its_device_in_stop_and_copy() {
    let mut src = devices(2, 5, None);
    let mut dst = devices(2, 5, None);
    for d in src.iter_mut() {
        d.device.stop().expect("pause the device");
    }
    let opts = SaveOptions {
        live: true,
        ..SaveOptions::default()
    };
    let descs: Vec<&dyn MigrationDevice> = src.iter().map(|d| d.device.as_ref()).collect();
    let header = StreamHeader::new(&descs, true, 1).unwrap();
    let (a, b) = Connection::pair().unwrap();
    let mut fence = MemoryFence::new();
    let events = Mutex::new(Vec::new());
    let record = |e: &Event| events.lock().unwrap().push(e.clone());
    let (sent, received) = std::thread::scope(|s| {
        let loader = s.spawn(|| {
            let mut d: Vec<&mut dyn MigrationDevice> =
                dst.iter_mut().map(|d| d.device.as_mut() as _).collect();
            receive(&mut d, b, &mut fence, &record)
        });
        let mut v: Vec<&mut dyn MigrationDevice> =
            src.iter_mut().map(|d| d.device.as_mut() as _).collect();
        let sent = send(&mut v, a, &header, &opts, &NoObserver);
        (sent, loader.join().unwrap())
    });
    let sent = sent.map_err(|e| Report(&e.into_core()).to_string());
    assert!(sent.is_ok(), "a paused VM migrates: {sent:?}");
    let Ok(RecvOutcome::Resumed { reports, .. }) = received else {
        panic!("{received:?}");
    };
    // The destination's progress: each device's last event (its progress, or the end of
    // its phase) is what it loaded.
    let events = events.into_inner().unwrap();
    for (i, report) in reports.iter().enumerate() {
        let last = events.iter().rev().find_map(|e| match e {
            Event::Progress {
                device,
                phase,
                bytes,
            }
            | Event::PhaseEnded {
                device,
                phase,
                bytes,
                ..
            } if usize::from(*device) == i => Some((*phase, *bytes)),
            _ => None,
        });
        assert!(report.stop_copy_bytes > 0, "{report:?}");
        assert_eq!(last, Some((Phase::StopCopy, report.stop_copy_bytes)));
    }
    for (s, d) in src.iter().zip(&dst) {
        let (ss, ds) = (handle(s).status(), handle(d).status());
        assert!(ds.resumed_ok && ds.is_running(), "{ds:?}");
        assert_eq!(handle(s).state_digest(), handle(d).state_digest());
        assert_eq!(ss.state_name(), "STOP", "{ss:?}");
    }
}
