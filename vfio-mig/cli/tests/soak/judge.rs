// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whether what a run's two sides and its store say agrees, by docs/cli.md ("Exit status and
//! errors", "JSON output") and docs/fencing.md: each side's exit status against its `--json`
//! outcome and each device's fate there, and across sides and the store, device by device:
//! never one device's state running on both sides, never a state lost, a unit all or nothing
//! (no member running on the destination while another runs on the source; the destination
//! runs some members and not others only past the point of no return, exit 4), in doubt only
//! with the source stopped, the store naming the destination only when it runs the state;
//! and the source out within its bound after a partition ([`Plan::source_bound`]).

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
    /// The source's device is stopped for good: the unit's destination passed its point of
    /// no return (exit 4).
    PastNoReturn,
    /// The destination's device runs the state or was reset, as its error line says: its
    /// unit passed the point of no return (exit 4).
    RunsOrReset,
}

/// The outcome's JSON document, when the side printed one.
fn json(side: &Ended) -> Result<serde_json::Value, String> {
    serde_json::from_str(side.stdout.trim())
        .map_err(|e| format!("stdout is not one JSON document ({e}): {:?}", side.stdout))
}

/// The fates the JSON outcome gives the `unit` devices of a side, in order.
fn fates(doc: &serde_json::Value, unit: usize) -> Result<Vec<String>, String> {
    let devices = doc["devices"]
        .as_array()
        .ok_or_else(|| format!("no devices in {doc}"))?;
    if devices.len() != unit {
        return Err(format!(
            "{unit} device(s) were given, the JSON outcome lists {}",
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
/// became of each of its `unit` devices and the session id its outcome names.
pub fn side(which: Side, side: &Ended, unit: usize) -> Result<(Vec<Held>, Option<String>), String> {
    if side.stderr.contains("panicked") {
        return Err("it panicked".into());
    }
    if side.killed() {
        return Ok((vec![Held::Killed; unit], None));
    }
    // A signal in the first instants of the process, before main() installed its handler,
    // takes the default action: the process ends having printed and touched nothing.
    let default_action = side.status.signal().is_some_and(|s| side.sent.contains(&s));
    if default_action && side.stderr.is_empty() && side.stdout.is_empty() {
        let untouched = match which {
            Side::Source => Held::Runs,
            Side::Destination => Held::Idle,
        };
        return Ok((vec![untouched; unit], None));
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
    let every = |fate: &str, held: Held| -> Result<Vec<Held>, String> {
        let f = fates(&doc, unit)?;
        if f.iter().any(|f| f != fate) {
            return Err(format!("{outcome}, but the devices' fates are {f:?}"));
        }
        Ok(vec![held; unit])
    };
    let held = match (which, code, outcome.as_str()) {
        // `save --json` too: its save report, stamped "completed" (docs/cli.md, "JSON output").
        (Side::Source, 0, "completed") => vec![Held::HandedOff; unit],
        (Side::Destination, 0, "resumed") => vec![Held::Runs; unit],
        (_, 1, "failed") => rolled_back(which, &doc, unit)?,
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
            rolled_back(which, &doc, unit)?
        }
        (Side::Source, 3, "in-doubt") => every("stopped", Held::InDoubt)?,
        (Side::Destination, 3, "in-doubt") => {
            let f = fates(&doc, unit)?;
            if f.iter().any(|f| f != "reset" && f != "in-doubt") {
                return Err(format!("in doubt, but the devices' fates are {f:?}"));
            }
            vec![Held::ResetInDoubt; unit]
        }
        // Only a unit has a point of no return between its members.
        (Side::Source, 4, "past-no-return") if unit > 1 => every("stopped", Held::PastNoReturn)?,
        (Side::Destination, 4, "past-no-return") if unit > 1 => {
            every("running-or-reset", Held::RunsOrReset)?
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
fn rolled_back(which: Side, doc: &serde_json::Value, unit: usize) -> Result<Vec<Held>, String> {
    let f = fates(doc, unit)?;
    let allowed: &[&str] = match which {
        Side::Source => &["untouched", "returned-to-running", "running", "reset"],
        Side::Destination => &["untouched", "reset"],
    };
    if let Some(bad) = f.iter().find(|f| !allowed.contains(&f.as_str())) {
        return Err(format!("rolled back, but a device's fate is {bad:?}"));
    }
    Ok(f.iter()
        .map(|f| match which {
            Side::Source if f == "reset" => Held::Reset,
            Side::Source => Held::Runs,
            Side::Destination => Held::Idle,
        })
        .collect())
}

/// Judges the whole run; every disagreement found, one line each.
pub fn run(plan: &Plan, outcome: &Outcome) -> Vec<String> {
    let mut wrong = Vec::new();
    if let Some(after) = outcome.after_cut {
        let bound = plan.source_bound();
        if after > bound {
            wrong.push(format!(
                "the source ended {after:.1?} after the partition, beyond its bound of \
                 {bound:?} (docs/cli.md, \"Timeouts\")"
            ));
        }
    }
    let unit = plan.unit;
    let (src, src_session) = match side(Side::Source, &outcome.source, unit) {
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
        return judge_file(plan, outcome, src[0], wrong);
    };
    let (dst, dst_session) = match side(Side::Destination, destination, unit) {
        Ok(s) => s,
        Err(e) => {
            wrong.push(format!("destination: {e}"));
            return wrong;
        }
    };
    if outcome.stopped_idle_destination && dst.iter().any(|d| *d != Held::Idle) {
        wrong.push(format!(
            "the idle destination stopped by the soak ended {dst:?}"
        ));
    }
    if dst_session.is_some() && session.is_some() && dst_session != session {
        wrong.push(format!(
            "the destination names session {dst_session:?}, the source {session:?}"
        ));
    }
    let src_fault = match &plan.fault {
        Fault::Device {
            side: Side::Source,
            member,
            ..
        } => Some(*member),
        _ => None,
    };
    for (member, (s, d)) in src.iter().zip(&dst).enumerate() {
        wrong.extend(device(member, *s, *d, src_fault, &outcome.source.stderr));
    }
    // All or nothing: no member of the unit runs on the destination while another runs on
    // the source; a destination runs some members only past the point of no return.
    if dst.contains(&Held::Runs) && src.contains(&Held::Runs) {
        wrong.push(format!(
            "the unit is split: the source runs members {src:?}, the destination {dst:?}"
        ));
    }
    if dst.contains(&Held::Runs) && dst.iter().any(|d| *d != Held::Runs) {
        wrong.push(format!("the destination runs part of the unit: {dst:?}"));
    }
    let completed = store_completed(outcome, &session, &mut wrong);
    let runs_there = dst
        .iter()
        .any(|d| matches!(d, Held::Runs | Held::RunsOrReset))
        || src.contains(&Held::HandedOff);
    if runs_there && !completed.iter().all(|c| *c) {
        wrong.push(format!(
            "the destination runs the state, but the store does not record session \
             {session:?} as completed by it for every member: {completed:?}"
        ));
    }
    if completed.iter().any(|c| *c)
        && (dst.iter().all(|d| *d == Held::Idle) || src.contains(&Held::Runs))
    {
        wrong.push(format!(
            "the store records the session as completed by the destination ({completed:?}), \
             but the source is {src:?} and the destination {dst:?}"
        ));
    }
    if let Some((retry, retry_dst)) = &outcome.resolution {
        let completed = completed.iter().any(|c| *c);
        wrong.extend(resolution(completed, retry, retry_dst, unit));
    }
    for record in &outcome.records {
        let Record::Shared(record) = record else {
            continue;
        };
        let owner = record.as_ref().map(|r| r.owner.as_str());
        let done = match (record, &session) {
            (Some(r), Some(s)) => r
                .completed
                .iter()
                .any(|c| &c.session == s && c.by == DESTINATION_HOST),
            _ => false,
        };
        if done && owner != Some(DESTINATION_HOST) {
            wrong.push(format!(
                "completed by the destination, but the store's owner is {owner:?}"
            ));
        }
        if src.contains(&Held::Runs) && owner == Some(DESTINATION_HOST) {
            wrong.push(
                "the source runs the state, but the store names the destination its owner".into(),
            );
        }
    }
    wrong
}

/// One member's two devices: never running on both sides, never lost; a source device reset
/// only when it failed itself (`faulty`) and its error line says so.
fn device(member: usize, src: Held, dst: Held, faulty: Option<usize>, stderr: &str) -> Vec<String> {
    let mut wrong = Vec::new();
    if src == Held::Reset && !(faulty == Some(member) && stderr.contains("was reset")) {
        wrong.push(format!(
            "member {member}: the source's device was reset, but it had no fault of its own"
        ));
    }
    if dst == Held::ResetInDoubt && !matches!(src, Held::InDoubt | Held::Killed) {
        wrong.push(format!(
            "member {member}: the destination is in doubt, but the source is {src:?}, not \
             stopped"
        ));
    }
    if src == Held::Runs && matches!(dst, Held::Runs | Held::RunsOrReset) {
        wrong.push(format!("member {member}: both sides run the state"));
    }
    if matches!(src, Held::HandedOff | Held::PastNoReturn) && dst == Held::Idle {
        wrong.push(format!(
            "member {member}: the state is lost: the source stopped it for good, the \
             destination does not run it"
        ));
    }
    if (src == Held::PastNoReturn) != (dst == Held::RunsOrReset) && dst != Held::Killed {
        wrong.push(format!(
            "member {member}: only one side says the unit passed its point of no return: \
             {src:?} / {dst:?}"
        ));
    }
    wrong
}

/// Whether the store says the destination completed the session, one answer per member; a
/// shared store completes a unit in one transaction, so its members must agree.
fn store_completed(
    outcome: &Outcome,
    session: &Option<String>,
    wrong: &mut Vec<String>,
) -> Vec<bool> {
    let completed: Vec<bool> = outcome
        .records
        .iter()
        .map(|record| match (record, session) {
            (Record::Local(r), Some(s)) => r.completed.contains(s),
            (Record::Shared(Some(r)), Some(s)) => r
                .completed
                .iter()
                .any(|c| &c.session == s && c.by == DESTINATION_HOST),
            (Record::Local(r), None) => !r.completed.is_empty(),
            (Record::Shared(Some(r)), None) => !r.completed.is_empty(),
            _ => false,
        })
        .collect();
    let shared = outcome
        .records
        .iter()
        .any(|r| matches!(r, Record::Shared(_)));
    if shared && completed.iter().any(|c| *c) && !completed.iter().all(|c| *c) {
        wrong.push(format!(
            "the store completed only part of the unit: {completed:?}"
        ));
    }
    completed
}

/// The retry of an outcome in doubt (`send --session` to a new `recv`, healthy devices),
/// against the record the store kept: a completed session is answered "already completed" on
/// both sides (the state must not run twice); any other is handed off again, or fails
/// cleanly with the source running.
fn resolution(completed: bool, retry: &Ended, retry_dst: &Ended, unit: usize) -> Vec<String> {
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
            side(Side::Source, retry, unit),
            side(Side::Destination, retry_dst, unit),
        ) {
            (Ok((s, _)), Ok((d, _)))
                if s.iter().all(|s| *s == Held::Runs) && d.iter().all(|d| *d == Held::Idle) =>
            {
                None
            }
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
                .args(["load", &plan.devices(Side::Destination)[0], "-i"])
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
