// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM scenario matrix (issue 18): {running, paused} VM x {one device, a unit of three} x
//! a single fault (the mock's `fail-at=` points) at every step of both sides, driven as a VMM
//! drives the front door: rounds in frames of a byte budget pushed to the destination as they
//! are written, the switch-over, load, run, then finish (or cancel); and the same over a
//! socket inside the session layer (a `SessionSource` paced by the test, COMMIT and its answer,
//! a `SessionDestination` on a thread).
//!
//! Whatever fails, at the end: every source device is in the state it started in, or in the
//! handed-off state (STOP, once a destination device runs), or was reset with the error
//! saying so; every destination device runs the verified state, or never ran it (reset); no
//! state is live on both sides; no device is lost; nothing panics.

use vfio_mig::error::Report;
use vfio_mig::NoObserver;
use vfio_mig::{
    Destination, DestinationOptions, Epoch, Handback, MigrationDevice, Source, SourceOptions,
    Status,
};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::MockHandle;
use vfio_mig_session::handshake::{
    open_session, Admitted, Answer, SessionDestination, SessionSource,
};
use vfio_mig_session::transport::Connection;
use vfio_mig_tests::mock;

type Device = Box<dyn MigrationDevice>;

/// Faults of the source side, one step each: entering pre-copy, its info, its data, the
/// quiesce, the stop-and-copy arc (with and without ERROR), the STOP after the handoff, the
/// estimate, a state read.
const SOURCE_FAULTS: &[&str] = &[
    "set-state:PRE_COPY@1",
    "precopy-info@1",
    "data-read@1",
    "data-read@3",
    "set-state:PRE_COPY_P2P@1",
    "set-state:RUNNING_P2P@1",
    "set-state:STOP_COPY@1",
    "set-state:STOP_COPY@1:error",
    "set-state:STOP@1",
    "data-size@1",
    "get-state@4",
];

/// Faults of the destination side: each arc of entering RESUMING, the data, the load
/// (RESUMING -> STOP), the quiesced run state and RUNNING.
const DESTINATION_FAULTS: &[&str] = &[
    "set-state:RUNNING_P2P@1",
    "set-state:STOP@1",
    "set-state:RESUMING@1",
    "data-write@1",
    "data-write@3",
    "set-state:STOP@2",
    "set-state:RUNNING_P2P@2",
    "set-state:RUNNING@1",
];

/// How the stream travels: pushed in-process, or over a socket inside the session layer
/// (a `SessionSource` the test paces, a `SessionDestination` on a thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    InProcess,
    Session,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

struct Unit {
    devices: Vec<Device>,
    handles: Vec<MockHandle>,
}

fn unit(n: usize, faulted: Option<(usize, &str)>) -> Unit {
    let (devices, handles) = (0..n)
        .map(|i| {
            let mut spec = format!("mock:v2,size=96K,seed={},chunk=16K", 40 + i);
            if let Some((at, rule)) = faulted {
                if at == i && !rule.is_empty() {
                    spec.push_str(&format!(",fail-at={rule}"));
                }
            }
            let d = mock(&spec);
            (d.opened.device, d.handle)
        })
        .unzip();
    Unit { devices, handles }
}

/// `rule` with its access number moved past the accesses of a pause (STOP) of the device.
fn after_pause(rule: &str) -> String {
    let pause_accesses = |field: &str| match field {
        "get-state" => 2,
        "set-state:RUNNING_P2P" | "set-state:STOP" => 1,
        _ => 0,
    };
    let Some((field, rest)) = rule.split_once('@') else {
        return rule.to_string();
    };
    let (at, errno) = rest.split_once(':').map_or((rest, ""), |(a, e)| (a, e));
    let at: u32 = at.parse().expect("an access number");
    let at = at + pause_accesses(field);
    match errno {
        "" => format!("{field}@{at}"),
        e => format!("{field}@{at}:{e}"),
    }
}

/// One scenario, its invariants checked at the end.
fn scenario(path: Path, paused: bool, n: usize, side: Side, rule: &str) {
    let ctx = format!(
        "{path:?}: {} VM, {n} device(s), {side:?} fault {rule}",
        if paused { "paused" } else { "running" }
    );
    // A paused VM's devices made the pause's accesses first (two state reads, the arcs into
    // RUNNING_P2P and STOP): the rule counts the migration's from there.
    let shifted = if paused && side == Side::Source {
        after_pause(rule)
    } else {
        rule.to_string()
    };
    let faulted = Some((n / 2, shifted.as_str()));
    let mut src = unit(n, (side == Side::Source).then_some(faulted).flatten());
    let dst = unit(n, (side == Side::Destination).then_some(faulted).flatten());
    if paused {
        for d in src.devices.iter_mut() {
            d.stop().unwrap();
        }
    }
    let start_digests: Vec<u32> = src.handles.iter().map(|h| h.state_digest()).collect();
    let start_state = if paused { "STOP" } else { "RUNNING" };
    let mut errors: Vec<String> = Vec::new();

    let (ran, src_devices) = match path {
        Path::InProcess => in_process(&mut src, dst.devices, &mut errors, &ctx),
        Path::Session => over_session(&mut src, dst.devices, &mut errors),
    };
    let text = errors.join(" | ");

    // No device lost.
    assert_eq!(src_devices.len(), n, "{ctx}: source devices lost: {text}");
    for (i, (s, d)) in src.handles.iter().zip(&dst.handles).enumerate() {
        let (ss, ds) = (s.status(), d.status());
        // No state live on both sides (a reset source runs its reset state, not this one).
        assert!(
            !(ss.is_running() && ss.resets == 0 && ds.resumed_ok && ds.is_running()),
            "{ctx}: device {i} runs on both sides: {text}"
        );
        if ran {
            // Handed off: the source stopped for good (or reset, said so).
            assert!(
                ss.state_name() == "STOP" || (ss.resets > 0 && text.contains("reset")),
                "{ctx}: source {i} in {} after the handoff: {text}",
                ss.state_name()
            );
            if ds.resumed_ok {
                assert_eq!(s.state_digest(), d.state_digest(), "{ctx}: device {i}");
            } else {
                assert!(text.contains("reset"), "{ctx}: destination {i}: {text}");
            }
        } else {
            // Back where it started, or reset with the error saying so.
            let reset = s.state_digest() != start_digests[i] || ss.resets > 0;
            assert!(
                ss.state_name() == start_state && (!reset || text.contains("reset")),
                "{ctx}: source {i} in {} (reset: {reset}): {text}",
                ss.state_name()
            );
            assert!(!ds.resumed_ok, "{ctx}: destination {i} ran: {text}");
            assert!(
                matches!(ds.state_name().as_str(), "RUNNING" | "STOP"),
                "{ctx}: destination {i} left in {}: {text}",
                ds.state_name()
            );
        }
    }
    // A fault that fired failed the migration, and the error says so.
    let fired = src
        .handles
        .iter()
        .chain(&dst.handles)
        .any(|h| h.status().fault_hits > 0);
    if fired && !ran {
        assert!(!text.is_empty(), "{ctx}: a fault fired, but no error");
    }
    // Every rule fires, except where its step does not exist in this scenario.
    let absent = step_absent(paused, side, rule);
    assert_eq!(
        fired,
        !rule.is_empty() && !absent,
        "{ctx}: fired {fired}: {text}"
    );
}

/// The front door in-process: whether a destination device runs the state, and the source
/// devices back.
fn in_process(
    src: &mut Unit,
    dst_devices: Vec<Device>,
    errors: &mut Vec<String>,
    ctx: &str,
) -> (bool, Vec<Device>) {
    let dest = match Destination::new(dst_devices, &DestinationOptions::new()) {
        Ok(d) => d,
        Err(h) => panic!("{ctx}: {}", h.error),
    };
    let source = Source::start(
        std::mem::take(&mut src.devices),
        &SourceOptions::new(Epoch(1)),
    );
    match source {
        Err(Handback { error, devices }) => {
            errors.push(Report(&*error).to_string());
            drop(dest);
            (false, devices)
        }
        Ok(mut source) => {
            let ran = drive(&mut source, dest, errors, ctx);
            if ran {
                // The point of no return: the source stops for good.
                let finished = source.finish();
                errors.extend(finished.stop_failures);
                (true, finished.devices)
            } else {
                if let Some(e) = source.cancel() {
                    errors.push(Report(&e).to_string());
                }
                (false, source.into_devices())
            }
        }
    }
}

/// The session layer over a socketpair: the test paces the source's rounds (16 KiB budget)
/// and switch-over, a thread runs the destination (accept, load, run). Whether a
/// destination device runs the state, and the source devices back.
fn over_session(
    src: &mut Unit,
    dst_devices: Vec<Device>,
    errors: &mut Vec<String>,
) -> (bool, Vec<Device>) {
    let (a, b) = Connection::pair().unwrap();
    let mut fence = MemoryFence::new();
    let source = match Source::prepare(
        std::mem::take(&mut src.devices),
        &SourceOptions::new(Epoch(1)),
    ) {
        Ok(s) => s,
        Err(Handback { error, devices }) => {
            errors.push(Report(&*error).to_string());
            return (false, devices);
        }
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| -> Result<bool, String> {
            let text = |e: vfio_mig::Error| Report(&e).to_string();
            let opening = open_session(b, None).map_err(|e| text(e.into_core()))?;
            let mut session = match SessionDestination::accept(opening, dst_devices, &mut fence) {
                Ok(Admitted::Accepted(session)) => session,
                Ok(Admitted::AlreadyCompleted { .. }) => return Err("already completed".into()),
                Err(h) => return Err(text(*h.error)),
            };
            session.load(&NoObserver).map_err(|e| text(e.into_core()))?;
            match session.run() {
                Ok(_) => Ok(true),
                Err(Handback { error, .. }) => {
                    let past = matches!(*error, vfio_mig::Error::PastNoReturn { .. });
                    Err(format!(
                        "{}{}",
                        if past { "past: " } else { "" },
                        text(*error)
                    ))
                }
            }
        });
        let devices = match SessionSource::open(source, a) {
            Err(Handback { error, devices }) => {
                errors.push(Report(&*error).to_string());
                devices
            }
            Ok(Answer::AlreadyCompleted(devices)) => devices,
            Ok(Answer::Accepted(mut session)) => {
                let paced = (|| -> vfio_mig_session::Result<()> {
                    for _ in 0..20 {
                        if session.round(Some(16 << 10))?.estimate.pending == 0 {
                            break;
                        }
                    }
                    session.switch_over()
                })();
                match paced {
                    Err(e) => {
                        errors.push(Report(&e.into_core()).to_string());
                        session.into_devices()
                    }
                    Ok(()) => match session.commit() {
                        Ok(finished) => {
                            errors.extend(finished.stop_failures);
                            finished.devices
                        }
                        Err(Handback { error, devices }) => {
                            errors.push(Report(&*error).to_string());
                            devices
                        }
                    },
                }
            }
        };
        let ran = match dest.join().unwrap() {
            Ok(ran) => ran,
            Err(e) => {
                let past = e.starts_with("past: ");
                errors.push(e);
                past
            }
        };
        (ran, devices)
    })
}

/// Steps a scenario does not take: a paused VM has no pre-copy (the same path as a
/// snapshot), and a device in pre-copy is quiesced to PRE_COPY_P2P, not RUNNING_P2P.
fn step_absent(paused: bool, side: Side, rule: &str) -> bool {
    side == Side::Source
        && match paused {
            true => [
                "set-state:PRE_COPY@1",
                "precopy-info@1",
                "set-state:PRE_COPY_P2P@1",
                "set-state:RUNNING_P2P@1",
            ]
            .contains(&rule),
            false => rule == "set-state:RUNNING_P2P@1",
        }
}

/// Rounds in budgeted frames pushed as written, the switch-over, the load and the run:
/// whether any destination device runs the state. A failed destination resets its devices
/// (on failure, or when dropped here before it ran).
fn drive(
    source: &mut Source<Device>,
    mut dest: Destination<Device>,
    errors: &mut Vec<String>,
    ctx: &str,
) -> bool {
    let mut failed = |e: vfio_mig::Error| errors.push(Report(&e).to_string());
    for _ in 0..20 {
        let mut frame = Vec::new();
        match source.round(&mut frame, Some(16 << 10)) {
            Ok(round) => {
                if let Err(e) = dest.push(&frame) {
                    failed(e);
                    return false;
                }
                if round.estimate.pending == 0 {
                    break;
                }
            }
            Err(e) => {
                failed(e);
                return false;
            }
        }
    }
    let mut frame = Vec::new();
    if let Err(e) = source.switch_over(&mut frame) {
        failed(e);
        return false;
    }
    match dest.push(&frame) {
        Ok(Status::Loaded) => {}
        Ok(status) => panic!("{ctx}: the whole stream pushed, yet {status:?}"),
        Err(e) => {
            failed(e);
            return false;
        }
    }
    match dest.run() {
        Ok(devices) => devices.len() == source.start_states().len(),
        Err(Handback { error, devices }) => {
            let text = Report(&*error).to_string();
            assert_eq!(devices.len(), source.start_states().len(), "{ctx}: {text}");
            errors.push(text.clone());
            // Past the first RUNNING some devices run: the source must not run again.
            matches!(*error, vfio_mig::Error::PastNoReturn { .. })
        }
    }
}

#[test]
fn every_single_fault_of_both_sides_keeps_every_device() {
    let mut scenarios = 0;
    for path in [Path::InProcess, Path::Session] {
        for paused in [false, true] {
            for n in [1, 3] {
                scenario(path, paused, n, Side::Source, "");
                scenarios += 1;
                for rule in SOURCE_FAULTS {
                    scenario(path, paused, n, Side::Source, rule);
                    scenarios += 1;
                }
                for rule in DESTINATION_FAULTS {
                    scenario(path, paused, n, Side::Destination, rule);
                    scenarios += 1;
                }
            }
        }
    }
    assert_eq!(
        scenarios,
        2 * 4 * (1 + SOURCE_FAULTS.len() + DESTINATION_FAULTS.len())
    );
}
