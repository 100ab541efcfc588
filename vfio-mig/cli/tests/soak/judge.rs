// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whether what a run's two sides and its store say agrees, by docs/cli.md ("Exit status and
//! errors", "JSON output") and docs/fencing.md: each side's exit status against its `--json`
//! outcome and the devices' fates there, and across sides and the store: never both sides
//! running the state, never the state lost, in doubt only with the source stopped, the store
//! naming the destination only when it runs the state.

use std::os::unix::process::ExitStatusExt;

use crate::plan::{Fault, Plan, Side};
use crate::proc::Ended;
use crate::run::{Outcome, Record, DESTINATION_HOST};

/// What became of one side's device, as its process reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// It runs the state (the source rolled back or untouched; the destination resumed).
    Runs,
    /// The source's device is stopped and the state handed off (exit 0).
    HandedOff,
    /// The source's device is stopped, the outcome in doubt (exit 3).
    InDoubt,
    /// The source's device failed and was reset (its driver lost the state).
    Reset,
    /// The destination's device does not run the state (reset, or untouched).
    Idle,
    /// The destination reset its device without knowing whether the store recorded its
    /// completion (exit 3): the source must stay stopped.
    ResetInDoubt,
    /// The soak killed the process: its device is as the process left it.
    Killed,
}

/// The outcome's JSON document, when the side printed one.
fn json(side: &Ended) -> Result<serde_json::Value, String> {
    serde_json::from_str(side.stdout.trim())
        .map_err(|e| format!("stdout is not one JSON document ({e}): {:?}", side.stdout))
}

/// The fates the JSON outcome gives the devices: one device a side, so one fate.
fn fates(doc: &serde_json::Value) -> Result<Vec<String>, String> {
    let devices = doc["devices"]
        .as_array()
        .ok_or_else(|| format!("no devices in {doc}"))?;
    if devices.len() != 1 {
        return Err(format!(
            "one device was given, the JSON outcome lists {}",
            devices.len()
        ));
    }
    devices
        .iter()
        .map(|d| {
            d["fate"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| format!("a device without a fate in {doc}"))
        })
        .collect()
}

/// The statuses of a command cancelled by a signal the soak sent, before its point of no
/// return (docs/cli.md: 128 + the signal).
fn cancelled_by(side: &Ended, code: i32) -> bool {
    side.sent.iter().any(|s| 128 + s == code)
}

/// Judges one side alone: its status, its one error line, its JSON outcome; returns what
/// became of its device and the session id its outcome names.
pub fn side(which: Side, side: &Ended) -> Result<(Held, Option<String>), String> {
    if side.stderr.contains("panicked") {
        return Err("it panicked".into());
    }
    if side.killed() {
        return Ok((Held::Killed, None));
    }
    // A signal in the first instants of the process, before main() installed its handler,
    // takes the default action: the process ends having printed and touched nothing.
    let default_action = side.status.signal().is_some_and(|s| side.sent.contains(&s));
    if default_action && side.stderr.is_empty() && side.stdout.is_empty() {
        let untouched = match which {
            Side::Source => Held::Runs,
            Side::Destination => Held::Idle,
        };
        return Ok((untouched, None));
    }
    let code = side.code();
    if code != 0 {
        let errors = side.stderr.lines().filter(|l| l.contains("error:")).count();
        if errors != 1 {
            return Err(format!("exit {code} with {errors} error lines, not one"));
        }
    }
    let doc = json(side)?;
    let outcome = doc["outcome"].as_str().unwrap_or_default().to_owned();
    let session = doc["session"].as_str().map(str::to_owned);
    if doc["exit_status"] != code {
        return Err(format!(
            "exit {code}, but the JSON says {}",
            doc["exit_status"]
        ));
    }
    let held = match (which, code, outcome.as_str()) {
        // `save --json` too: its save report, stamped "completed" (docs/cli.md, "JSON output").
        (Side::Source, 0, "completed") => Held::HandedOff,
        (Side::Destination, 0, "resumed") => Held::Runs,
        (_, 1, "failed") => rolled_back(which, &doc)?,
        (_, c, "interrupted") if cancelled_by(side, c) => {
            let name = match c - 128 {
                libc::SIGINT => "SIGINT",
                libc::SIGHUP => "SIGHUP",
                _ => "SIGTERM",
            };
            if doc["signal"] != name {
                return Err(format!(
                    "exit {c}, but the JSON names signal {}",
                    doc["signal"]
                ));
            }
            rolled_back(which, &doc)?
        }
        (Side::Source, 3, "in-doubt") => {
            let f = fates(&doc)?;
            if f.iter().any(|f| f != "stopped") {
                return Err(format!("in doubt, but not every device stopped: {f:?}"));
            }
            Held::InDoubt
        }
        (Side::Destination, 3, "in-doubt") => {
            let f = fates(&doc)?;
            if f.iter().any(|f| f != "reset" && f != "in-doubt") {
                return Err(format!("in doubt, but a device's fate is {f:?}"));
            }
            Held::ResetInDoubt
        }
        _ => {
            return Err(format!(
                "exit {code} with outcome {outcome:?}: not in docs/cli.md's table"
            ))
        }
    };
    Ok((held, session))
}

/// A failure rolled back: each device untouched, back in RUNNING (source) or reset
/// (destination).
fn rolled_back(which: Side, doc: &serde_json::Value) -> Result<Held, String> {
    let f = fates(doc)?;
    let allowed: &[&str] = match which {
        Side::Source => &["untouched", "returned-to-running", "running", "reset"],
        Side::Destination => &["untouched", "reset"],
    };
    if let Some(bad) = f.iter().find(|f| !allowed.contains(&f.as_str())) {
        return Err(format!("rolled back, but a device's fate is {bad:?}"));
    }
    Ok(match which {
        Side::Source if f == ["reset"] => Held::Reset,
        Side::Source => Held::Runs,
        Side::Destination => Held::Idle,
    })
}

/// Judges the whole run; every disagreement found, one line each.
pub fn run(plan: &Plan, outcome: &Outcome) -> Vec<String> {
    let mut wrong = Vec::new();
    let (src, src_session) = match side(Side::Source, &outcome.source) {
        Ok(s) => s,
        Err(e) => {
            wrong.push(format!("source: {e}"));
            return wrong;
        }
    };
    let session = outcome.source.printed_session();
    if src_session.is_some() && src_session != session {
        wrong.push(format!(
            "the source's JSON names session {src_session:?}, its stderr {session:?}"
        ));
    }
    let Some(destination) = &outcome.destination else {
        return judge_file(plan, outcome, src, wrong);
    };
    let (dst, dst_session) = match side(Side::Destination, destination) {
        Ok(s) => s,
        Err(e) => {
            wrong.push(format!("destination: {e}"));
            return wrong;
        }
    };
    if outcome.stopped_idle_destination && dst != Held::Idle {
        wrong.push(format!(
            "the idle destination stopped by the soak ended {dst:?}"
        ));
    }
    if dst_session.is_some() && session.is_some() && dst_session != session {
        wrong.push(format!(
            "the destination names session {dst_session:?}, the source {session:?}"
        ));
    }
    // A source device is reset only when it failed itself, and its error line says so.
    if src == Held::Reset
        && !(matches!(
            plan.fault,
            Fault::Device {
                side: Side::Source,
                ..
            }
        ) && outcome.source.stderr.contains("was reset"))
    {
        wrong.push("the source's device was reset, but it had no fault of its own".into());
    }
    if dst == Held::ResetInDoubt && !matches!(src, Held::InDoubt | Held::Killed) {
        wrong.push(format!(
            "the destination is in doubt, but the source is {src:?}, not stopped"
        ));
    }
    if src == Held::Runs && dst == Held::Runs {
        wrong.push("both sides run the state".into());
    }
    if src == Held::HandedOff && dst == Held::Idle {
        wrong.push(
            "the state is lost: the source handed it off, the destination does not run it".into(),
        );
    }
    // Whether the store says the destination completed this session (and so runs it).
    let completed = match (&outcome.record, &session) {
        (Record::Local(r), Some(s)) => r.completed.contains(s),
        (Record::Shared(Some(r)), Some(s)) => r
            .completed
            .iter()
            .any(|c| &c.session == s && c.by == DESTINATION_HOST),
        (Record::Local(r), None) => !r.completed.is_empty(),
        (Record::Shared(Some(r)), None) => !r.completed.is_empty(),
        _ => false,
    };
    let owner = match &outcome.record {
        Record::Shared(Some(r)) => Some(r.owner.as_str()),
        _ => None,
    };
    if (dst == Held::Runs || src == Held::HandedOff) && !completed {
        wrong.push(format!(
            "the destination runs the state, but the store does not record session \
             {session:?} as completed by it"
        ));
    }
    if completed && (dst == Held::Idle || src == Held::Runs) {
        wrong.push(format!(
            "the store records the session as completed by the destination, but the source \
             is {src:?} and the destination {dst:?}"
        ));
    }
    if let Some((retry, retry_dst)) = &outcome.resolution {
        wrong.extend(resolution(completed, retry, retry_dst));
    }
    if matches!(outcome.record, Record::Shared(_)) {
        if completed && owner != Some(DESTINATION_HOST) {
            wrong.push(format!(
                "completed by the destination, but the store's owner is {owner:?}"
            ));
        }
        if src == Held::Runs && owner == Some(DESTINATION_HOST) {
            wrong.push(
                "the source runs the state, but the store names the destination its owner".into(),
            );
        }
    }
    wrong
}

/// The retry of an outcome in doubt (`send --session` to a new `recv`, healthy devices),
/// against the record the store kept: a completed session is answered "already completed" on
/// both sides (the state must not run twice); any other is handed off again, or fails
/// cleanly with the source running.
fn resolution(completed: bool, retry: &Ended, retry_dst: &Ended) -> Vec<String> {
    let outcome = |e: &Ended| {
        json(e)
            .map(|d| d["outcome"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    let (src, dst) = (outcome(retry), outcome(retry_dst));
    let answered = (retry.code(), src.as_str(), retry_dst.code(), dst.as_str());
    let wrong = match (completed, answered) {
        (true, (0, "already-completed", 0, "already-completed")) => None,
        (true, _) => Some(format!(
            "the store recorded the session completed, but its retry answered {answered:?}"
        )),
        (false, (0, "completed", 0, "resumed")) => None,
        (false, (_, "already-completed", _, _) | (_, _, _, "already-completed")) => Some(format!(
            "the store had no completion, but the retry answered {answered:?}"
        )),
        (false, _) => match (
            side(Side::Source, retry),
            side(Side::Destination, retry_dst),
        ) {
            (Ok((Held::Runs, _)), Ok((Held::Idle, _))) => None,
            (s, d) => Some(format!("the retry ended {s:?} / {d:?}")),
        },
    };
    wrong
        .map(|w| {
            vec![format!(
                "{w}\n--- retry source:\n{}\n{}\n--- retry destination:\n{}\n{}",
                retry.stderr, retry.stdout, retry_dst.stderr, retry_dst.stdout
            )]
        })
        .unwrap_or_default()
}

/// `send --to file:` or `save -o`: success leaves a complete file that loads into a device
/// of the same seed (so the state is not lost); a failure returns the device to RUNNING and
/// leaves no file and no partial file behind.
fn judge_file(plan: &Plan, outcome: &Outcome, src: Held, mut wrong: Vec<String>) -> Vec<String> {
    let out = outcome.dir.join("out");
    let names: Vec<String> = std::fs::read_dir(&out)
        .map(|d| {
            d.map_while(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    match src {
        Held::HandedOff => {
            if names != ["state.vfiomig"] {
                wrong.push(format!("saved, but the output directory holds {names:?}"));
            }
            let file = out.join("state.vfiomig");
            let load = std::process::Command::new(crate::common::BIN)
                .env("VFIO_MIG_CONFIG", "/dev/null")
                .env("VFIO_MIG_LOCK_DIR", outcome.dir.join("load-lock"))
                .env("VFIO_MIG_STATE_DIR", outcome.dir.join("load-state"))
                .args(["load", &plan.device(Side::Destination), "-i"])
                .arg(&file)
                .output()
                .unwrap();
            if !load.status.success() {
                wrong.push(format!(
                    "saved, but the file does not load: {}",
                    String::from_utf8_lossy(&load.stderr)
                ));
            }
        }
        Held::Runs => {
            if !names.is_empty() {
                wrong.push(format!("failed, but the output directory holds {names:?}"));
            }
        }
        other => wrong.push(format!("the save into a file ended {other:?}")),
    }
    wrong
}
