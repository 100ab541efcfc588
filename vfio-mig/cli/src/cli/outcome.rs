// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What became of the devices, said the same way whatever ended the command: the exit status
//! (one table, docs/cli.md "Exit status and errors"), the one error line, and with `--json`
//! an outcome on stdout for failures, doubt and signals (a command prints its own report on
//! success).
//!
//! The command records what it drives ([`begin`]) and the session once it has one
//! ([`session`]); [`finish`] turns its result into the status, and [`abandon`] does it for
//! a second signal, which ends the process at once.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vfio_mig::error::{Recovery, Report};
use vfio_mig_session::Error;

use super::signals;

/// Success (also a session the destination had already completed, and a signal that came
/// after completion).
pub const COMPLETED: u8 = 0;
/// A failure: every device is untouched, back in RUNNING, or reset.
pub const FAILED: u8 = 1;
/// The outcome is in doubt after COMMIT: the source devices are left stopped.
pub const IN_DOUBT: u8 = 3;
/// Past a unit's point of no return: a destination device runs the state, another failed
/// to run and was reset; the source devices are stopped, never resumed.
pub const PAST_NO_RETURN: u8 = 4;
/// A second signal ended the command at once, without rollback: the devices' states are
/// unknown (run `vfio-mig recover`).
pub const ABANDONED: u8 = 5;

/// Which side of a handoff a device is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Its state leaves (save, send, migrate's SRC).
    Source,
    /// It receives a state (load, recv, migrate's DST).
    Destination,
}

/// What the running command drives.
struct Context {
    command: &'static str,
    json: bool,
    devices: Vec<(String, Side)>,
    session: Option<(String, u64)>,
}

fn context() -> MutexGuard<'static, Option<Context>> {
    static CONTEXT: Mutex<Option<Context>> = Mutex::new(None);
    CONTEXT.lock().unwrap_or_else(|e| e.into_inner())
}

/// The exit status once decided: by [`finish`] (the command ended) or by [`abandon`] (a
/// second signal), whichever comes first; the other then defers to it.
fn decided() -> MutexGuard<'static, Option<u8>> {
    static DECIDED: Mutex<Option<u8>> = Mutex::new(None);
    DECIDED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records the command: its name, whether it prints JSON, its devices and their sides.
pub fn begin(command: &'static str, json: bool, devices: Vec<(String, Side)>) {
    *context() = Some(Context {
        command,
        json,
        devices,
        session: None,
    });
}

/// Records the command's session (the latest, for a `recv` that serves several).
pub fn session(hex: &str, epoch: u64) {
    if let Some(c) = context().as_mut() {
        c.session = Some((hex.to_owned(), epoch));
    }
}

/// One device's fate.
#[derive(Debug, serde::Serialize)]
struct Fate {
    device: String,
    fate: &'static str,
}

/// The outcome of a command that did not complete.
#[derive(Debug, serde::Serialize)]
struct Outcome {
    outcome: &'static str,
    command: &'static str,
    session: Option<String>,
    epoch: Option<u64>,
    devices: Vec<Fate>,
    error: String,
    signal: Option<&'static str>,
    exit_status: u8,
}

fn recovery_fate(r: &Recovery) -> &'static str {
    match r {
        Recovery::AlreadyRunning => "running",
        Recovery::Resumed => "returned-to-running",
        // A device that was stopped when the command began (a paused VM) is returned there.
        Recovery::AlreadyStopped => "stopped",
        Recovery::Stopped => "returned-to-stop",
        Recovery::Reset => "reset",
        _ => "unrecovered",
    }
}

/// The devices an error names with what became of them (the engine wraps every failure that
/// touched a device in a rollback), searched along its causes. The walk starts at the core's
/// error itself: the session's `Error::Core` is transparent, so its `source()` would skip it.
fn named_fates(e: &Error) -> Vec<(String, &'static str)> {
    use vfio_mig::Error as Core;
    let mut named = Vec::new();
    let mut cause: Option<&(dyn std::error::Error + 'static)> = match e.as_core() {
        Some(core) => Some(core),
        None => Some(e),
    };
    while let Some(c) = cause {
        // A cause held in a `Box<Error>` is seen as the box.
        let error = c
            .downcast_ref::<Core>()
            .or_else(|| c.downcast_ref::<Box<Core>>().map(|b| &**b));
        match error {
            Some(Core::RolledBack {
                device, recovery, ..
            }) => named.push((device.clone(), recovery_fate(recovery))),
            Some(Core::RolledBackAll { outcomes, .. }) => {
                named.extend(outcomes.iter().map(|(d, r)| (d.clone(), recovery_fate(r))))
            }
            _ => {}
        }
        cause = c.source();
    }
    named
}

/// The spelling errors name a device by: a mock's specification with its options in their
/// canonical order (the user may give them in any), any other name as given.
fn canonical(name: &str) -> String {
    name.parse::<vfio_mig_mock::MockSpec>()
        .map_or_else(|_| name.to_owned(), |spec| spec.to_string())
}

/// Every device of `c` with its fate: as the error names it, else by the outcome (in doubt:
/// sources stopped, destinations may run; abandoned: unknown; a failure that names no
/// device came before any was touched).
fn fates(c: &Context, kind: &'static str, e: Option<&Error>) -> Vec<Fate> {
    let named = e.map(named_fates).unwrap_or_default();
    let mut out: Vec<Fate> = c
        .devices
        .iter()
        .map(|(device, side)| {
            let fate = match (kind, side) {
                ("abandoned", _) => "unknown",
                ("in-doubt", Side::Source) => "stopped",
                // A destination of recv or load in doubt was reset (its completion may be
                // recorded in the fencing store); migrate's may run the state.
                ("in-doubt", Side::Destination) if c.command != "migrate" => "reset",
                ("in-doubt", Side::Destination) => "in-doubt",
                ("past-no-return", Side::Source) => "stopped",
                // The error line names which destination devices run and which were reset.
                ("past-no-return", Side::Destination) => "running-or-reset",
                _ => named
                    .iter()
                    .find(|(d, _)| canonical(d) == canonical(device))
                    .map_or("untouched", |(_, f)| *f),
            };
            Fate {
                device: device.clone(),
                fate,
            }
        })
        .collect();
    // A device the error names by another spelling is listed as named.
    for (device, fate) in named {
        if !out
            .iter()
            .any(|f| canonical(&f.device) == canonical(&device))
        {
            out.push(Fate { device, fate });
        }
    }
    out
}

/// Prints the outcome as JSON on stdout, if the command was asked for JSON.
fn print(kind: &'static str, status: u8, e: Option<&Error>, error: String, signal: Option<i32>) {
    let guard = context();
    let Some(c) = guard.as_ref().filter(|c| c.json) else {
        return;
    };
    let outcome = Outcome {
        outcome: kind,
        command: c.command,
        session: c.session.as_ref().map(|(s, _)| s.clone()),
        epoch: c.session.as_ref().map(|(_, e)| *e),
        devices: fates(c, kind, e),
        error,
        signal: signal.map(signals::name),
        exit_status: status,
    };
    drop(guard);
    if let Ok(text) = serde_json::to_string_pretty(&outcome) {
        // The error line already went to stderr; stdout may be gone.
        let _ = super::output_text(&format!("{text}\n"));
    }
}

/// Adds to a command's `--json` report what every outcome says (docs/cli.md "JSON
/// output"): `command`, `outcome` (`completed` unless the report names its own, such as
/// `already-completed`), `session` and `epoch` once the command had one, and `exit_status`
/// 0. A report that is not an object is left as it is.
pub fn stamp_success(report: &mut serde_json::Value) {
    let Some(fields) = report.as_object_mut() else {
        return;
    };
    let guard = context();
    let Some(c) = guard.as_ref() else {
        return;
    };
    fields.insert("command".into(), c.command.into());
    fields
        .entry("outcome")
        .or_insert_with(|| "completed".into());
    if let Some((session, epoch)) = &c.session {
        fields
            .entry("session")
            .or_insert_with(|| session.as_str().into());
        fields.entry("epoch").or_insert_with(|| (*epoch).into());
    }
    fields.insert("exit_status".into(), COMPLETED.into());
}

/// The exit status of a command's result, after printing its error line (and with `--json`
/// its outcome): 0 completed, 1 failed, 3 in doubt, 4 past a unit's point of no return,
/// 128 + N cancelled by signal N and rolled back. A signal that came after completion changes nothing.
pub fn finish(result: vfio_mig_session::Result<()>) -> u8 {
    let signal = signals::received();
    let (kind, status) = match (&result, signal) {
        (Ok(()), _) => ("completed", COMPLETED),
        (Err(Error::InDoubt { .. }), _) => ("in-doubt", IN_DOUBT),
        (Err(Error::Core(vfio_mig::Error::PastNoReturn { .. })), _) => {
            ("past-no-return", PAST_NO_RETURN)
        }
        (Err(_), Some(s)) => ("interrupted", signals::exit_status(s) as u8),
        (Err(_), None) => ("failed", FAILED),
    };
    {
        let mut decided = decided();
        if decided.is_some() {
            // A second signal is ending the process with its own outcome.
            drop(decided);
            loop {
                std::thread::park();
            }
        }
        *decided = Some(status);
    }
    let e = match result {
        Ok(()) => {
            if let Some(s) = signal {
                eprintln!(
                    "vfio-mig: {} arrived after the command completed: nothing was undone",
                    signals::name(s)
                );
            }
            return status;
        }
        Err(e) => e,
    };
    let line = Report(&e).to_string();
    match signal {
        Some(s) => eprintln!(
            "vfio-mig: error: interrupted by {}: {line}",
            signals::name(s)
        ),
        None => eprintln!("vfio-mig: error: {line}"),
    }
    print(kind, status, Some(&e), line, signal);
    status
}

/// The exit status after a second signal, which ends the process at once: prints the error
/// line and the JSON outcome (each given at most a moment: a blocked stderr or stdout must
/// not keep the process alive). If the command already ended, its own status (its output may
/// be cut short).
pub fn abandon(signal: i32) -> u8 {
    {
        let mut decided = decided();
        if let Some(status) = *decided {
            // The command ended (its rollback is done) and is saying so: that is the truth.
            return status;
        }
        *decided = Some(ABANDONED);
    }
    let line = format!(
        "{} again: exiting at once, without rollback; the devices' states are unknown (run \
         vfio-mig recover DEVICE)",
        signals::name(signal)
    );
    let (done, wait) = std::sync::mpsc::channel();
    let to_stdout = (line.clone(), done.clone());
    std::thread::spawn(move || {
        let (line, done) = to_stdout;
        print("abandoned", ABANDONED, None, line, Some(signal));
        let _ = done.send(());
    });
    std::thread::spawn(move || {
        eprintln!("vfio-mig: error: {line}");
        let _ = done.send(());
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if wait.recv_timeout(left).is_err() {
            break;
        }
    }
    ABANDONED
}
