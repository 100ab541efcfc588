// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What every destination path shares: the compatibility check of a stream's device
//! descriptor, and the per-device record loader with its report (used by the single-device
//! [`super::load`] and the front door's destination alike).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::stream::{DeviceDescriptor, Phase};

use super::events::{Event, Observer};
use super::MigrationDevice;

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct LoadReport {
    /// Bytes loaded in pre-copy records.
    pub pre_copy_bytes: u64,
    /// Bytes loaded in stop-and-copy records.
    pub stop_copy_bytes: u64,
    /// Device chunks written.
    pub chunks: u64,
}

/// Checks, before the device is touched, that a stream's device descriptor fits `dev`.
pub fn check_compatible(dev: &dyn MigrationDevice, desc: &DeviceDescriptor) -> Result<()> {
    let id = dev.identity();
    if desc.protocol != dev.protocol() {
        return Err(Error::stream(
            "check stream compatibility",
            format!(
                "stream was saved from a {} device, {} speaks {}",
                desc.protocol,
                id.instance,
                dev.protocol()
            ),
        ));
    }
    if desc.model != id.model {
        return Err(Error::stream(
            "check stream compatibility",
            format!(
                "stream holds state of a {} device, {} is a {}",
                desc.model, id.instance, id.model
            ),
        ));
    }
    Ok(())
}

/// Applies one device's records in stream order and keeps its report and events.
pub(crate) struct DeviceLoader {
    index: u16,
    report: LoadReport,
    phase: Option<(Phase, Instant, u64)>,
    since_event: u64,
}

impl DeviceLoader {
    /// The loader of stream device `index`; each call reports to the observer it is given
    /// (a front-door destination's observer changes from call to call).
    pub(crate) fn new(index: u16) -> Self {
        Self {
            index,
            report: LoadReport::default(),
            phase: None,
            since_event: 0,
        }
    }

    /// Writes a DATA record's bytes into the device, reporting to `obs`.
    pub(crate) fn data_to(
        &mut self,
        obs: &dyn Observer,
        dev: &mut dyn MigrationDevice,
        phase: Phase,
        bytes: &[u8],
        chunk_end: bool,
    ) -> Result<()> {
        if self.phase.map(|(p, ..)| p) != Some(phase) {
            self.phase = Some((phase, Instant::now(), 0));
            obs.on_event(&Event::PhaseStarted {
                device: self.index,
                phase,
                pending: None,
            });
        }
        dev.write(bytes, chunk_end)?;
        let total = match phase {
            Phase::PreCopy => &mut self.report.pre_copy_bytes,
            Phase::StopCopy => &mut self.report.stop_copy_bytes,
        };
        *total += bytes.len() as u64;
        let total = *total;
        if chunk_end {
            self.report.chunks += 1;
            if let Some((_, _, chunks)) = self.phase.as_mut() {
                *chunks += 1;
            }
        }
        self.since_event += bytes.len() as u64;
        if self.since_event >= (4 << 20) {
            self.since_event = 0;
            obs.on_event(&Event::Progress {
                device: self.index,
                phase,
                bytes: total,
            });
        }
        Ok(())
    }

    /// Notes the end of a phase of this device, reporting to `obs`.
    pub(crate) fn end_phase_to(&mut self, obs: &dyn Observer, phase: Phase) {
        let (elapsed, chunks) = match self.phase.take() {
            Some((p, started, chunks)) if p == phase => (started.elapsed(), chunks),
            _ => (Default::default(), 0),
        };
        obs.on_event(&Event::PhaseEnded {
            device: self.index,
            phase,
            bytes: match phase {
                Phase::PreCopy => self.report.pre_copy_bytes,
                Phase::StopCopy => self.report.stop_copy_bytes,
            },
            chunks,
            elapsed,
        });
    }

    /// The report.
    pub(crate) fn report(&self) -> LoadReport {
        self.report.clone()
    }
}
