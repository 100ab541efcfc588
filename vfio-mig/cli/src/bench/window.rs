// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The downtime window of a migration measured from the engine's events on both sides: from
//! the first source entering stop-and-copy (its STOP transition included) to the last
//! destination having every stop-copy byte in its device (its END_OF_PHASE applied). The
//! device's own load step after that (RESUMING -> STOP, where a mock verifies its state) is
//! the device's, not the engine's, and is left out on both sides of a comparison.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use vfio_mig::Event;

use vfio_mig::wire::Phase;
use vfio_mig::Observer;

/// Stop-copy phases seen so far: each source's (start, end), each destination's end.
#[derive(Debug, Default)]
pub struct Window {
    sources: Mutex<Vec<(Instant, Instant)>>,
    ends: Mutex<Vec<Instant>>,
}

/// The source side's observer of a [`Window`].
pub struct SourceSide<'a>(pub &'a Window);

/// The destination side's observer of a [`Window`].
pub struct DestinationSide<'a>(pub &'a Window);

fn push<T>(list: &Mutex<Vec<T>>, item: T) {
    list.lock().unwrap_or_else(|p| p.into_inner()).push(item);
}

impl Observer for SourceSide<'_> {
    fn on_event(&self, event: &Event) {
        if let Event::PhaseEnded {
            phase: Phase::StopCopy,
            elapsed,
            ..
        } = event
        {
            // The phase's wall time runs from before the STOP_COPY transition.
            let end = Instant::now();
            push(
                &self.0.sources,
                (end.checked_sub(*elapsed).unwrap_or(end), end),
            );
        }
    }
}

impl Observer for DestinationSide<'_> {
    fn on_event(&self, event: &Event) {
        if let Event::PhaseEnded {
            phase: Phase::StopCopy,
            ..
        } = event
        {
            push(&self.0.ends, Instant::now());
        }
    }
}

impl Window {
    /// When the last destination had its stop-copy data in.
    pub fn last_end(&self) -> Option<Instant> {
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        ends.iter().max().copied()
    }

    /// First source start to last destination end, once `devices` of each were seen.
    pub fn span(&self, devices: usize) -> Option<Duration> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let ends = self.ends.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() != devices || ends.len() != devices {
            return None;
        }
        let start = sources.iter().map(|(s, _)| *s).min()?;
        let end = ends.iter().max()?;
        Some(end.saturating_duration_since(start))
    }

    /// The sources' side alone: first start to last end (the source's share of the
    /// downtime, as `SaveReport::stop_copy_time` is one device's).
    pub fn source_span(&self) -> Option<Duration> {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let start = sources.iter().map(|(s, _)| *s).min()?;
        let end = sources.iter().map(|(_, e)| *e).max()?;
        Some(end.saturating_duration_since(start))
    }
}
