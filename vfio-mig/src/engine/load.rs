// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side: compatibility check, resuming, and reset on failure.

use std::io::Read;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::stream::{DeviceDescriptor, Phase, StreamReader};

use super::events::{Event, Observer};
use super::gate::{LoadGate, NoGate};
use super::MigrationDevice;

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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

/// Loads the records of stream device `index` into `dev`, which must be fresh (running or
/// stopped). Records of other devices are an error here; the multi-device loader
/// demultiplexes before calling this per device.
///
/// The device enters RESUMING only after the header was checked, and returns to RUNNING only
/// after the whole stream, trailer included, was read and verified: a destination never runs
/// with partial state. The caller handles rollback (see [`load_with_rollback`]).
pub fn load_device<R: Read>(
    dev: &mut dyn MigrationDevice,
    reader: &mut StreamReader<R>,
    index: u16,
    obs: &dyn Observer,
) -> Result<LoadReport> {
    load_device_gated(dev, reader, index, obs, &mut NoGate)
}

/// [`load_device`] with the hooks of a destination's handshake: `gate` is called once the
/// device's pre-copy data is loaded, and after the trailer before the device resumes.
pub fn load_device_gated<R: Read>(
    dev: &mut dyn MigrationDevice,
    reader: &mut StreamReader<R>,
    index: u16,
    obs: &dyn Observer,
    gate: &mut dyn LoadGate,
) -> Result<LoadReport> {
    if index != 0 || reader.header().devices.len() != 1 {
        return Err(Error::stream(
            "stream header",
            format!(
                "a single-device load of device {index} from a stream of {} devices",
                reader.header().devices.len()
            ),
        ));
    }
    let mut reports = super::demux::load_all_gated(&mut [dev], reader, obs, gate)?;
    Ok(reports.remove(0))
}

/// Applies one device's records in stream order and keeps its report and events.
pub(crate) struct DeviceLoader<'a> {
    index: u16,
    obs: &'a dyn Observer,
    report: LoadReport,
    phase: Option<(Phase, Instant, u64)>,
    since_event: u64,
}

impl<'a> DeviceLoader<'a> {
    pub(crate) fn new(index: u16, obs: &'a dyn Observer) -> Self {
        Self {
            index,
            obs,
            report: LoadReport::default(),
            phase: None,
            since_event: 0,
        }
    }

    /// Writes a DATA record's bytes into the device.
    pub(crate) fn data(
        &mut self,
        dev: &mut dyn MigrationDevice,
        phase: Phase,
        bytes: &[u8],
        chunk_end: bool,
    ) -> Result<()> {
        if self.phase.map(|(p, ..)| p) != Some(phase) {
            self.phase = Some((phase, Instant::now(), 0));
            self.obs.on_event(&Event::PhaseStarted {
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
            self.obs.on_event(&Event::Progress {
                device: self.index,
                phase,
                bytes: total,
            });
        }
        Ok(())
    }

    /// Notes the end of a phase of this device.
    pub(crate) fn end_phase(&mut self, phase: Phase) {
        let (elapsed, chunks) = match self.phase.take() {
            Some((p, started, chunks)) if p == phase => (started.elapsed(), chunks),
            _ => (Default::default(), 0),
        };
        self.obs.on_event(&Event::PhaseEnded {
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

/// [`load_device`], and on failure the destination is reset so that it never runs with partial
/// state; the error then says what became of the device.
pub fn load_with_rollback<R: Read>(
    dev: &mut dyn MigrationDevice,
    reader: &mut StreamReader<R>,
    index: u16,
    obs: &dyn Observer,
) -> Result<LoadReport> {
    // An incompatible stream is refused before the device is touched: nothing to roll back.
    let desc = reader.header().devices.get(index as usize).cloned();
    if let Some(desc) = desc {
        check_compatible(dev, &desc)?;
    }
    load_device(dev, reader, index, obs).map_err(|e| rollback_destination(dev, index, e, obs))
}

/// Resets a destination after `error` and folds the outcome into the error.
pub fn rollback_destination(
    dev: &mut dyn MigrationDevice,
    index: u16,
    error: Error,
    obs: &dyn Observer,
) -> Error {
    super::multi::roll_back(&mut [dev], index, error, obs, |d| d.abort_resume())
}
