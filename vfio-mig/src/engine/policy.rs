// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! When to stop pre-copy and switch over to stop-and-copy.
//!
//! Pre-copy pays off while each round leaves less to send in the downtime window. The policy
//! measures the link's bandwidth from the rounds themselves and switches over as soon as the
//! remaining bytes would cross the link within the downtime budget. It gives up on waiting,
//! within bounds (rounds, time), and recognises a device that dirties state at least as fast as
//! the link carries it: then more rounds cannot help, and the policy says so instead of looping.

use std::time::Duration;

use crate::migration::StopCopySize;

/// The pre-copy policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreCopyPolicy {
    /// The downtime the stop-and-copy phase may take: switch over once the remaining bytes
    /// would be sent within it at the measured bandwidth.
    pub downtime_budget: Duration,
    /// Switch over once the device reports at most this many pending bytes, whatever the
    /// bandwidth (0 disables this test except for an empty device).
    pub switchover_bytes: u64,
    /// Most pre-copy rounds.
    pub max_rounds: u32,
    /// Most pre-copy time.
    pub max_time: Duration,
    /// Rounds without progress (pending bytes falling by less than a tenth) after which
    /// pre-copy is declared not to converge.
    pub stall_rounds: u32,
    /// Fail the migration, rather than switch over past the budget, when pre-copy does not
    /// converge or hits its bounds.
    pub strict: bool,
}

impl Default for PreCopyPolicy {
    fn default() -> Self {
        Self {
            downtime_budget: Duration::from_millis(300),
            switchover_bytes: 0,
            max_rounds: 30,
            max_time: Duration::from_secs(60),
            stall_rounds: 3,
            strict: false,
        }
    }
}

/// Why pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
#[non_exhaustive]
pub enum SwitchReason {
    /// The remaining bytes fit the downtime budget (or the switchover threshold).
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The time limit was reached.
    MaxTime,
    /// The device dirties state as fast as the link carries it: more rounds cannot help.
    NotConverging,
}

impl SwitchReason {
    /// Whether the switch happens within the downtime budget.
    pub fn within_budget(self) -> bool {
        self == SwitchReason::Converged
    }
}

/// What the policy decided after a round.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Switch over now.
    Switch(SwitchReason),
    /// Give up: the migration cannot meet its downtime budget (strict policy).
    Abort(SwitchReason),
}

/// The measurements the policy decides on, kept across rounds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreCopyState {
    /// Rounds completed.
    pub rounds: u32,
    /// Bytes sent in pre-copy so far.
    pub bytes: u64,
    /// Time spent sending them.
    pub busy: Duration,
    /// Pending bytes after the last round.
    pub pending: u64,
    /// Initial (not yet sent once) bytes after the last round, when the device tells (v2).
    pub initial_pending: Option<u64>,
    /// Consecutive rounds whose pending bytes fell by less than a tenth.
    pub stalled: u32,
    /// Bytes sent in the last round.
    pub last_bytes: u64,
    /// Time the last round took.
    pub last_busy: Duration,
    /// What stop-and-copy will carry apart from `pending` (v2: MIG_DATA_SIZE); see
    /// [`PreCopyState::downtime_bytes`].
    pub stop_copy: StopCopySize,
}

/// The last round alone measures the bandwidth once it moved at least this much (1 MiB);
/// below that its timing is mostly per-round latency.
pub(crate) const RECENT_MIN_BYTES: u64 = 1 << 20;

impl PreCopyState {
    /// Starts with what the device reports before the first round.
    pub fn new(pending: u64, initial_pending: Option<u64>) -> Self {
        Self {
            pending,
            initial_pending,
            ..Default::default()
        }
    }

    /// Notes what the device reports pending after a round that could send nothing (no data
    /// ready yet): not a round, so neither the round bound nor the stall count moves.
    pub fn note_pending(&mut self, pending: u64, initial_pending: Option<u64>) {
        self.pending = pending;
        self.initial_pending = initial_pending;
    }

    /// Records a round: `sent` bytes in `took`, after which the device reports `pending`.
    pub fn record_round(
        &mut self,
        sent: u64,
        took: Duration,
        pending: u64,
        initial_pending: Option<u64>,
    ) {
        self.rounds += 1;
        self.bytes += sent;
        self.busy += took;
        self.last_bytes = sent;
        self.last_busy = took;
        // A round that removed less than a tenth of what was pending made no real progress:
        // the device dirties almost as fast as the link carries.
        if self.rounds > 1 && pending.saturating_mul(10) > self.pending.saturating_mul(9) {
            self.stalled += 1;
        } else {
            self.stalled = 0;
        }
        self.pending = pending;
        self.initial_pending = initial_pending;
    }

    /// The measured bandwidth in bytes per second, once something was sent: the last round's
    /// rate when it moved at least [`RECENT_MIN_BYTES`], else the rate over all rounds.
    ///
    /// Stop-and-copy follows the last round at once, while the first round may have run
    /// seconds earlier under other conditions (a shared link or CPU, a device that slows
    /// down): over a long pre-copy the average over all rounds is the worse predictor
    /// (`vfio-mig bench`, downtime suite, docs/benchmarks.md).
    pub fn bandwidth(&self) -> Option<f64> {
        let last = self.last_busy.as_secs_f64();
        if self.last_bytes >= RECENT_MIN_BYTES && last > 0.0 {
            return Some(self.last_bytes as f64 / last);
        }
        let secs = self.busy.as_secs_f64();
        (self.bytes > 0 && secs > 0.0).then(|| self.bytes as f64 / secs)
    }

    /// Sets what the device says stop-and-copy will carry (v2: MIG_DATA_SIZE).
    pub fn set_stop_copy(&mut self, stop_copy: StopCopySize) {
        self.stop_copy = stop_copy;
    }

    /// The bytes the downtime window will carry: the pending pre-copy bytes **plus** the
    /// device's stop-copy size, as QEMU's `vfio_state_pending_exact` counts them (bytes
    /// produced for pre-copy and not read yet are read in STOP_COPY on top of the stop-copy
    /// image). `None` when the device could not tell its stop-copy size.
    pub fn downtime_bytes(&self) -> Option<u64> {
        match self.stop_copy {
            StopCopySize::InPending => Some(self.pending),
            StopCopySize::Bytes(b) => Some(self.pending.saturating_add(b)),
            StopCopySize::Unknown => None,
        }
    }

    /// The stop-and-copy time [`downtime_bytes`](Self::downtime_bytes) would take at the
    /// measured bandwidth; `None` before any bandwidth was measured or when the downtime
    /// bytes are unknown.
    pub fn estimated_downtime(&self) -> Option<Duration> {
        let bytes = self.downtime_bytes()?;
        self.bandwidth()
            .map(|bw| Duration::from_secs_f64(bytes as f64 / bw))
    }
}

/// The error of a strict policy that gave up for `reason` after the rounds in `state`.
pub(crate) fn abort_error(
    reason: SwitchReason,
    state: &PreCopyState,
    policy: &PreCopyPolicy,
) -> crate::error::Error {
    crate::error::Error::PreCopy(format!(
        "{reason:?} after {} rounds: {} bytes for stop-and-copy, estimated downtime {} exceeds \
         the {:?} budget (measured bandwidth {})",
        state.rounds,
        state.downtime_bytes().map_or_else(
            || "unknown (MIG_DATA_SIZE failed)".into(),
            |b| b.to_string()
        ),
        state
            .estimated_downtime()
            .map(|d| format!("{d:?}"))
            .unwrap_or_else(|| "unknown".into()),
        policy.downtime_budget,
        state
            .bandwidth()
            .map(|b| format!("{:.1} MiB/s", b / (1u64 << 20) as f64))
            .unwrap_or_else(|| "unknown".into()),
    ))
}

impl PreCopyPolicy {
    /// Decides what to do after the rounds recorded in `state`, `elapsed` into pre-copy.
    pub fn decide(&self, state: &PreCopyState, elapsed: Duration) -> Decision {
        // The initial data must have been sent once before switching (QEMU waits for it too):
        // the destination needs it before the device stops.
        let initial_done = state.initial_pending.is_none_or(|b| b == 0);
        // An unknown stop-copy size never fits the budget (QEMU assumes 100 GiB).
        let remaining = state.downtime_bytes();
        let fits = remaining.is_some_and(|r| r <= self.switchover_bytes)
            || state
                .estimated_downtime()
                .is_some_and(|d| d <= self.downtime_budget);
        // Pre-copy has nothing more to send. With no bandwidth measured there is nothing to
        // judge the stop-copy size by; with one, a stop-copy size that does not fit will not
        // shrink with more rounds.
        let drained = state.pending == 0;
        if initial_done
            && (remaining == Some(0)
                || (state.rounds > 0 && fits)
                || (drained && remaining.is_some() && state.bandwidth().is_none()))
        {
            return Decision::Switch(SwitchReason::Converged);
        }
        let bound = if initial_done && (drained || state.stalled >= self.stall_rounds.max(1)) {
            Some(SwitchReason::NotConverging)
        } else if state.rounds >= self.max_rounds {
            Some(SwitchReason::MaxRounds)
        } else if elapsed >= self.max_time {
            Some(SwitchReason::MaxTime)
        } else {
            None
        };
        match bound {
            None => Decision::Continue,
            Some(reason) if self.strict => Decision::Abort(reason),
            Some(reason) => Decision::Switch(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn policy() -> PreCopyPolicy {
        PreCopyPolicy {
            downtime_budget: Duration::from_millis(100),
            max_rounds: 10,
            ..Default::default()
        }
    }

    #[test]
    fn the_stop_copy_size_counts_in_the_downtime() {
        let p = policy();
        // 100 MB/s; pre-copy drained, but stop-copy will carry 1 GB = 10 s: more rounds cannot
        // help, and a strict policy gives up.
        let mut s = PreCopyState::new(100 * MB, Some(100 * MB));
        s.record_round(100 * MB, Duration::from_secs(1), 0, Some(0));
        s.set_stop_copy(StopCopySize::Bytes(1000 * MB));
        assert_eq!(s.downtime_bytes(), Some(1000 * MB));
        assert_eq!(s.estimated_downtime(), Some(Duration::from_secs(10)));
        assert_eq!(
            p.decide(&s, Duration::from_secs(1)),
            Decision::Switch(SwitchReason::NotConverging)
        );
        let strict = PreCopyPolicy { strict: true, ..p };
        assert_eq!(
            strict.decide(&s, Duration::from_secs(1)),
            Decision::Abort(SwitchReason::NotConverging)
        );
        // 5 MB of stop-copy data = 50 ms: fits.
        s.set_stop_copy(StopCopySize::Bytes(5 * MB));
        assert_eq!(
            strict.decide(&s, Duration::from_secs(1)),
            Decision::Switch(SwitchReason::Converged)
        );
    }

    /// QEMU's `vfio_state_pending_exact` (hw/vfio/migration.c) is the oracle: what must move
    /// before the destination starts is MIG_DATA_SIZE **plus** PRECOPY_INFO's initial and
    /// dirty bytes (the bytes produced for pre-copy and not read yet are read in STOP_COPY on
    /// top of the stop-copy image).
    #[test]
    fn downtime_bytes_are_pending_plus_the_stop_copy_size_as_in_qemu() {
        let p = policy(); // 100 ms budget
        let qemu_must_precopy = |stop_copy: u64, init: u64, dirty: u64| stop_copy + init + dirty;
        // 100 MB/s; 4 MB dirty still pending, 7 MB of stop-copy image: 11 MB = 110 ms, over
        // the budget although each part alone (70 ms) fits.
        let mut s = PreCopyState::new(100 * MB, Some(100 * MB));
        s.record_round(100 * MB, Duration::from_secs(1), 4 * MB, Some(0));
        s.set_stop_copy(StopCopySize::Bytes(7 * MB));
        assert_eq!(
            s.downtime_bytes(),
            Some(qemu_must_precopy(7 * MB, 0, 4 * MB))
        );
        assert_eq!(s.estimated_downtime(), Some(Duration::from_millis(110)));
        assert_eq!(p.decide(&s, Duration::from_secs(1)), Decision::Continue);
        // 1 MB dirty + 7 MB image = 80 ms: fits.
        s.record_round(4 * MB, Duration::from_millis(40), MB, Some(0));
        assert_eq!(s.downtime_bytes(), Some(qemu_must_precopy(7 * MB, 0, MB)));
        assert_eq!(
            p.decide(&s, Duration::from_secs(1)),
            Decision::Switch(SwitchReason::Converged)
        );
    }

    /// QEMU reports `VFIO_MIG_STOP_COPY_SIZE` (100 GiB) when MIG_DATA_SIZE fails, "so
    /// downtime limit won't be violated": an unknown size never meets a budget.
    #[test]
    fn an_unknown_stop_copy_size_never_converges() {
        let strict = PreCopyPolicy {
            strict: true,
            downtime_budget: Duration::from_secs(3600),
            switchover_bytes: 64 * MB,
            ..policy()
        };
        let mut s = PreCopyState::new(MB, Some(0));
        s.set_stop_copy(StopCopySize::Unknown);
        assert_eq!(s.downtime_bytes(), None);
        // Before any round: not an empty device, not "drained before any bandwidth".
        assert_ne!(
            strict.decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::Converged)
        );
        // 1 GB/s measured, 1 KiB pending, an hour's budget: still not converged.
        s.record_round(1000 * MB, Duration::from_secs(1), 1024, Some(0));
        assert_eq!(s.estimated_downtime(), None);
        assert_eq!(strict.decide(&s, Duration::ZERO), Decision::Continue);
        // Drained with the size still unknown: a strict policy gives up.
        s.record_round(1024, Duration::from_millis(1), 0, Some(0));
        assert_eq!(
            strict.decide(&s, Duration::ZERO),
            Decision::Abort(SwitchReason::NotConverging)
        );
        // Once the device tells its size, the budget decides again.
        s.set_stop_copy(StopCopySize::Bytes(MB));
        assert_eq!(
            strict.decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::Converged)
        );
    }

    #[test]
    fn switches_when_the_rest_fits_the_downtime_budget() {
        let p = policy();
        // 100 MB/s measured; 20 MB left = 200 ms: not yet. 5 MB = 50 ms: switch.
        let mut s = PreCopyState::new(100 * MB, None);
        s.record_round(100 * MB, Duration::from_secs(1), 20 * MB, None);
        assert_eq!(p.decide(&s, Duration::from_secs(1)), Decision::Continue);
        s.record_round(20 * MB, Duration::from_millis(200), 5 * MB, None);
        assert_eq!(
            p.decide(&s, Duration::from_secs(1)),
            Decision::Switch(SwitchReason::Converged)
        );
        let est = s.estimated_downtime().unwrap();
        assert!(
            est > Duration::from_millis(45) && est < Duration::from_millis(55),
            "{est:?}"
        );
    }

    #[test]
    fn waits_for_initial_bytes_before_switching() {
        let p = policy();
        // The rest would fit the budget, but initial bytes are still unsent: keep going.
        let mut s = PreCopyState::new(100 * MB, Some(100 * MB));
        s.record_round(100 * MB, Duration::from_secs(1), 10, Some(10));
        assert_eq!(p.decide(&s, Duration::ZERO), Decision::Continue);
        s.record_round(10, Duration::from_millis(1), 10, Some(0));
        assert_eq!(
            p.decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::Converged)
        );
    }

    #[test]
    fn a_device_dirtying_faster_than_the_link_is_declared_not_converging() {
        let p = policy();
        let mut s = PreCopyState::new(50 * MB, None);
        // Every round sends 50 MB in 1 s and 60 MB are pending again.
        s.record_round(50 * MB, Duration::from_secs(1), 60 * MB, None);
        for _ in 0..p.stall_rounds {
            assert_eq!(p.decide(&s, Duration::from_secs(1)), Decision::Continue);
            s.record_round(60 * MB, Duration::from_secs(1), 60 * MB, None);
        }
        assert_eq!(
            p.decide(&s, Duration::from_secs(4)),
            Decision::Switch(SwitchReason::NotConverging)
        );
        let strict = PreCopyPolicy { strict: true, ..p };
        assert_eq!(
            strict.decide(&s, Duration::from_secs(4)),
            Decision::Abort(SwitchReason::NotConverging)
        );
    }

    #[test]
    fn bounds_on_rounds_and_time() {
        let p = policy();
        let mut s = PreCopyState::new(100 * MB, None);
        let mut pending = 100 * MB;
        for _ in 0..10 {
            // Falling by 15% a round (real progress), never within budget.
            pending = pending * 85 / 100;
            s.record_round(MB, Duration::from_secs(1), pending, None);
        }
        assert_eq!(
            p.decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::MaxRounds)
        );
        let mut s = PreCopyState::new(100 * MB, None);
        s.record_round(MB, Duration::from_secs(1), 90 * MB, None);
        assert_eq!(
            p.decide(&s, Duration::from_secs(61)),
            Decision::Switch(SwitchReason::MaxTime)
        );
    }

    #[test]
    fn bandwidth_follows_the_last_round_unless_it_was_tiny() {
        let mut s = PreCopyState::new(200 * MB, None);
        s.record_round(100 * MB, Duration::from_secs(1), 100 * MB, None);
        assert_eq!(s.bandwidth(), Some(100.0 * MB as f64));
        // The link slowed down: the last round's 50 MB/s, not the 75 MB/s average.
        s.record_round(50 * MB, Duration::from_secs(1), 50 * MB, None);
        assert_eq!(s.bandwidth(), Some(50.0 * MB as f64));
        assert_eq!(s.estimated_downtime(), Some(Duration::from_secs(1)));
        // A round too small to time: the average over all rounds.
        s.record_round(1000, Duration::from_millis(10), 10, None);
        let avg = (150 * MB + 1000) as f64 / 2.01;
        assert!((s.bandwidth().unwrap() - avg).abs() < 1.0);
    }

    #[test]
    fn a_few_percent_of_progress_a_round_is_not_convergence() {
        let p = policy();
        let mut s = PreCopyState::new(100 * MB, None);
        let mut pending = 100 * MB;
        for _ in 0..=p.stall_rounds {
            pending = pending * 97 / 100;
            s.record_round(MB, Duration::from_secs(1), pending, None);
        }
        assert_eq!(
            p.decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::NotConverging)
        );
    }

    #[test]
    fn an_empty_device_switches_at_once() {
        let s = PreCopyState::new(0, None);
        assert_eq!(
            policy().decide(&s, Duration::ZERO),
            Decision::Switch(SwitchReason::Converged)
        );
    }
}
