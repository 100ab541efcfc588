// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Typed events the engine reports while it works, for progress bars, logs and VMMs.

use std::time::Duration;

use crate::stream::Phase;

/// Something that happened during a migration.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "event", rename_all = "snake_case"))]
#[non_exhaustive]
pub enum Event {
    /// A phase started on a device.
    PhaseStarted {
        /// Device index in the stream.
        device: u16,
        /// The phase.
        phase: Phase,
        /// Bytes the device reported pending at the start, if known.
        pending: Option<u64>,
    },
    /// Bytes moved (cumulative for this device and phase).
    Progress {
        /// Device index.
        device: u16,
        /// The phase.
        phase: Phase,
        /// Bytes moved in this phase so far.
        bytes: u64,
    },
    /// A pre-copy round ended.
    RoundDone {
        /// Device index.
        device: u16,
        /// Round number, from 1.
        round: u32,
        /// Bytes sent in the round.
        bytes: u64,
        /// Bytes the device still reports pending.
        pending: u64,
    },
    /// A phase ended on a device.
    PhaseEnded {
        /// Device index.
        device: u16,
        /// The phase.
        phase: Phase,
        /// Bytes moved in the phase.
        bytes: u64,
        /// Device chunks moved in the phase.
        chunks: u64,
        /// Wall time of the phase.
        #[cfg_attr(feature = "serde", serde(with = "duration_micros"))]
        elapsed: Duration,
    },
    /// A failure was rolled back.
    RolledBack {
        /// Device index.
        device: u16,
        /// What the recovery achieved.
        recovery: String,
    },
}

/// Receives engine events. Called from the migration threads; keep it cheap.
pub trait Observer: Sync {
    /// One event.
    fn on_event(&self, event: &Event);
}

/// An observer that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl Observer for NoObserver {
    fn on_event(&self, _event: &Event) {}
}

impl<F: Fn(&Event) + Sync> Observer for F {
    fn on_event(&self, event: &Event) {
        self(event)
    }
}

#[cfg(feature = "serde")]
mod duration_micros {
    use std::time::Duration;

    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }
}
