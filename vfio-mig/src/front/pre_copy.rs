// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pre-copy rounds paced by the engine's [`PreCopyPolicy`], for a caller that does not pace
//! them itself (the command line, the session layer's `send`): the one place where rounds run
//! under a policy. A VMM paces [`Source::round`] with its own memory rounds instead.

use std::time::Instant;

use crate::engine::policy::{abort_error, Decision, PreCopyPolicy, PreCopyState, SwitchReason};
use crate::engine::wait::DataWait;
use crate::engine::{Event, Observer};
use crate::error::{Error, Result};
use crate::migration::{MigrationDevice, Pending, StopCopySize};
use crate::stream::Phase;

use super::channels::Outputs;
use super::source::{Source, Stage};

impl<D: MigrationDevice> Source<D> {
    /// Runs pre-copy rounds into `out` until `policy` switches over, reporting each device's
    /// phase and rounds to `obs`; the unit is measured as a whole (its pending bytes, its
    /// stop-and-copy size, the bandwidth of its rounds). Returns why pre-copy ended, `None`
    /// when no device is in pre-copy. A strict policy that gives up fails the migration (every
    /// device back to its start state). The caller then ends pre-copy or switches over.
    pub fn pre_copy<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        policy: &PreCopyPolicy,
        obs: &dyn Observer,
    ) -> Result<Option<SwitchReason>> {
        self.check(Stage::PreCopy, "run pre-copy")?;
        if self.pre_copy_ended {
            return Err(Error::InvalidInput(
                "run pre-copy: pre-copy was ended".into(),
            ));
        }
        if !self.live.iter().any(|&l| l) {
            return Ok(None);
        }
        let r = self.paced_rounds(out, policy, obs);
        r.map(Some).map_err(|e| self.fail(e))
    }

    fn paced_rounds<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        policy: &PreCopyPolicy,
        obs: &dyn Observer,
    ) -> Result<SwitchReason> {
        let started = Instant::now();
        let first = self.pending_each()?;
        for (i, p) in first.iter().enumerate() {
            if let Some(p) = p {
                obs.on_event(&Event::PhaseStarted {
                    device: i as u16,
                    phase: Phase::PreCopy,
                    pending: Some(p.bytes),
                });
            }
        }
        let (pending, initial, stop_copy) = unit_sums(&first);
        let mut state = PreCopyState::new(pending, initial);
        state.set_stop_copy(stop_copy);
        let mut waits = DataWait::new();
        let reason = loop {
            match policy.decide(&state, started.elapsed()) {
                Decision::Continue => {}
                Decision::Switch(reason) => break reason,
                Decision::Abort(reason) => return Err(abort_error(reason, &state, policy)),
            }
            let before: Vec<u64> = self.reports.iter().map(|r| r.pre_copy_bytes).collect();
            let round_started = Instant::now();
            let (sent, _) = self.send_round(out, None, obs)?;
            let now = self.pending_each()?;
            let (pending, initial, stop_copy) = unit_sums(&now);
            state.set_stop_copy(stop_copy);
            if sent == 0 && pending > 0 {
                // Nothing readable although the unit counts pending data (ENOMSG, an empty
                // v1 chunk): wait on the device holding the most, do not count the round.
                let most = (0..now.len())
                    .max_by_key(|&i| now[i].map_or(0, |p| p.bytes))
                    .unwrap_or(0);
                waits.wait(&self.devs[most])?;
                state.note_pending(pending, initial);
                continue;
            }
            waits.reset();
            state.record_round(sent, round_started.elapsed(), pending, initial);
            for (i, p) in now.iter().enumerate() {
                if let Some(p) = p {
                    obs.on_event(&Event::RoundDone {
                        device: i as u16,
                        round: state.rounds,
                        bytes: self.reports[i].pre_copy_bytes - before[i],
                        pending: p.bytes,
                    });
                }
            }
        };
        let elapsed = started.elapsed();
        for (i, report) in self.reports.iter_mut().enumerate() {
            if !self.live[i] {
                continue;
            }
            report.switch_reason = Some(reason);
            report.rounds = state.rounds;
            report.estimated_downtime = state.estimated_downtime();
            report.bandwidth = state.bandwidth().map(|b| b as u64);
            obs.on_event(&Event::PhaseEnded {
                device: i as u16,
                phase: Phase::PreCopy,
                bytes: report.pre_copy_bytes,
                chunks: report.chunks,
                elapsed,
            });
        }
        Ok(reason)
    }

    /// What each device in pre-copy reports pending (`None` for the others).
    fn pending_each(&mut self) -> Result<Vec<Option<Pending>>> {
        self.devs
            .iter_mut()
            .zip(&self.live)
            .map(|(d, &live)| {
                if live {
                    d.pending().map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }
}

/// The unit's pending bytes, initial bytes (`None` unless every device tells them) and
/// stop-and-copy size (unknown when any device's is), from each device's pending report.
fn unit_sums(each: &[Option<Pending>]) -> (u64, Option<u64>, StopCopySize) {
    let devices = each.iter().flatten();
    let pending = devices.clone().map(|p| p.bytes).sum();
    let initial = devices
        .clone()
        .map(|p| p.initial_bytes)
        .try_fold(0u64, |sum, i| i.map(|i| sum + i));
    let stop_copy = devices.fold(StopCopySize::InPending, |sum, p| {
        match (sum, p.stop_copy_bytes) {
            (StopCopySize::Unknown, _) | (_, StopCopySize::Unknown) => StopCopySize::Unknown,
            (StopCopySize::Bytes(a), StopCopySize::Bytes(b)) => StopCopySize::Bytes(a + b),
            (StopCopySize::Bytes(a), StopCopySize::InPending)
            | (StopCopySize::InPending, StopCopySize::Bytes(a)) => StopCopySize::Bytes(a),
            (StopCopySize::InPending, StopCopySize::InPending) => StopCopySize::InPending,
        }
    });
    (pending, initial, stop_copy)
}
