// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! When to stop pre-copy and switch over to stop-and-copy.

use std::time::Duration;

/// The pre-copy policy: iterate while it pays off, within bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreCopyPolicy {
    /// Switch over once the device reports at most this many pending bytes.
    pub switchover_bytes: u64,
    /// Switch over after this many rounds whatever is pending.
    pub max_rounds: u32,
    /// Switch over after this much pre-copy time whatever is pending.
    pub max_time: Duration,
}

impl Default for PreCopyPolicy {
    fn default() -> Self {
        Self {
            switchover_bytes: 0,
            max_rounds: 30,
            max_time: Duration::from_secs(60),
        }
    }
}

/// Why pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchReason {
    /// Pending bytes fell to the switchover threshold.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The time limit was reached.
    MaxTime,
}

impl PreCopyPolicy {
    /// Decides, before round `round` (from 1), whether to switch over now.
    pub fn should_switch(
        &self,
        round: u32,
        pending: u64,
        elapsed: Duration,
    ) -> Option<SwitchReason> {
        if pending <= self.switchover_bytes {
            Some(SwitchReason::Converged)
        } else if round > self.max_rounds {
            Some(SwitchReason::MaxRounds)
        } else if elapsed >= self.max_time {
            Some(SwitchReason::MaxTime)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_reasons_in_priority_order() {
        let p = PreCopyPolicy {
            switchover_bytes: 100,
            max_rounds: 3,
            max_time: Duration::from_secs(1),
        };
        assert_eq!(
            p.should_switch(1, 50, Duration::ZERO),
            Some(SwitchReason::Converged)
        );
        assert_eq!(p.should_switch(2, 500, Duration::ZERO), None);
        assert_eq!(
            p.should_switch(4, 500, Duration::ZERO),
            Some(SwitchReason::MaxRounds)
        );
        assert_eq!(
            p.should_switch(2, 500, Duration::from_secs(2)),
            Some(SwitchReason::MaxTime)
        );
    }
}
