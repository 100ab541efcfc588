// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pre-copy paced by the engine's policy, for a caller that leaves the schedule to it (the
//! command line, the session layer) rather than pacing rounds itself as a VMM does.

use std::io::Write;
use std::time::Instant;

use crate::engine::policy::abort_error;
use crate::engine::wait::DataWait;
use crate::engine::{Decision, Event, PreCopyPolicy, PreCopyState, SwitchReason};
use crate::error::Result;
use crate::migration::{MigrationDevice, Pending, StopCopySize};
use crate::stream::Phase;

use super::Source;

impl<D: MigrationDevice> Source<D> {
    /// Runs pre-copy rounds into `out` until `policy` switches over (the caller then calls
    /// [`switch_over`](Self::switch_over)), deciding on the unit's sums: what its devices
    /// still hold, the bandwidth the rounds measured. A round that could send nothing while
    /// data is pending (ENOMSG) waits for it rather than counting. A strict policy that
    /// gives up fails the migration (every device back to its start state). Without a
    /// device in pre-copy (a paused VM, no PRE_COPY support) it returns at once with `None`.
    ///
    /// The reason is also in each device's report ([`reports`](Self::reports)), with the
    /// rounds, the predicted downtime and the measured bandwidth.
    pub fn pre_copy<W: Write + ?Sized>(
        &mut self,
        out: &mut W,
        policy: &PreCopyPolicy,
    ) -> Result<Option<SwitchReason>> {
        if !self.live.iter().any(|&l| l) {
            return Ok(None);
        }
        let r = self.paced_rounds(out, policy);
        let reason = r.map_err(|e| self.fail(e))?;
        Ok(Some(reason))
    }

    fn paced_rounds<W: Write + ?Sized>(
        &mut self,
        out: &mut W,
        policy: &PreCopyPolicy,
    ) -> Result<SwitchReason> {
        let started = Instant::now();
        let first = self.unit_pending()?;
        for i in self.live_devices() {
            self.observer().on_event(&Event::PhaseStarted {
                device: i as u16,
                phase: Phase::PreCopy,
                pending: Some(first.bytes),
            });
        }
        let mut state = PreCopyState::new(first.bytes, first.initial_bytes);
        state.set_stop_copy(first.stop_copy_bytes);
        let mut waits = DataWait::new();
        let reason = loop {
            match policy.decide(&state, started.elapsed()) {
                Decision::Continue => {}
                Decision::Switch(reason) => break reason,
                Decision::Abort(reason) => return Err(abort_error(reason, &state, policy)),
            }
            let round_started = Instant::now();
            let (sent, _) = self.send_round(out, None)?;
            let pending = self.unit_pending()?;
            let bytes: u64 = sent.iter().sum();
            if !state.after_round(bytes, round_started.elapsed(), &pending) {
                let first_live = self.live_devices().next();
                if let Some(dev) = first_live.and_then(|i| self.devs.get(i)) {
                    waits.wait(dev)?;
                }
                continue;
            }
            waits.reset();
            for i in self.live_devices() {
                self.observer().on_event(&Event::RoundDone {
                    device: i as u16,
                    round: state.rounds,
                    bytes: sent[i],
                    pending: pending.bytes,
                });
            }
        };
        let elapsed = started.elapsed();
        let live: Vec<usize> = self.live_devices().collect();
        for i in live {
            let report = &mut self.reports[i];
            report.switch_reason = Some(reason);
            report.rounds = state.rounds;
            report.estimated_downtime = state.estimated_downtime();
            report.bandwidth = state.bandwidth().map(|b| b as u64);
            let ended = Event::PhaseEnded {
                device: i as u16,
                phase: Phase::PreCopy,
                bytes: report.pre_copy_bytes,
                chunks: report.chunks,
                elapsed,
            };
            self.observer().on_event(&ended);
        }
        Ok(reason)
    }

    /// The indices of the devices in pre-copy.
    fn live_devices(&self) -> impl Iterator<Item = usize> + '_ {
        self.live
            .iter()
            .enumerate()
            .filter_map(|(i, &l)| l.then_some(i))
    }

    /// What the devices in pre-copy hold, summed as one device's report: the unit switches
    /// over as one.
    fn unit_pending(&mut self) -> Result<Pending> {
        let mut total = Pending {
            bytes: 0,
            initial_bytes: None,
            stop_copy_bytes: StopCopySize::InPending,
        };
        for (dev, &live) in self.devs.iter_mut().zip(&self.live) {
            if !live {
                continue;
            }
            let p = dev.pending()?;
            total.bytes = total.bytes.saturating_add(p.bytes);
            total.initial_bytes = match (total.initial_bytes, p.initial_bytes) {
                (None, b) | (b, None) => b,
                (Some(a), Some(b)) => Some(a.saturating_add(b)),
            };
            total.stop_copy_bytes = match (total.stop_copy_bytes, p.stop_copy_bytes) {
                (StopCopySize::Unknown, _) | (_, StopCopySize::Unknown) => StopCopySize::Unknown,
                (StopCopySize::Bytes(a), StopCopySize::Bytes(b)) => {
                    StopCopySize::Bytes(a.saturating_add(b))
                }
                (StopCopySize::Bytes(b), StopCopySize::InPending)
                | (StopCopySize::InPending, StopCopySize::Bytes(b)) => StopCopySize::Bytes(b),
                (StopCopySize::InPending, StopCopySize::InPending) => StopCopySize::InPending,
            };
        }
        Ok(total)
    }
}
