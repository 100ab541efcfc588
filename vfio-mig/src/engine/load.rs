// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side: compatibility check, resuming, and reset on failure.

use std::io::Read;
use std::time::Instant;

use crate::error::{Error, Result};
use crate::stream::{DeviceDescriptor, Phase, Record, StreamReader};

use super::events::{Event, Observer};
use super::gate::{LoadGate, NoGate};
use super::MigrationDevice;

/// What a load did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
    let desc = reader
        .header()
        .devices
        .get(index as usize)
        .cloned()
        .ok_or_else(|| Error::stream("stream header", format!("no device {index} in stream")))?;
    check_compatible(dev, &desc)?;
    dev.start_resume()?;
    let mut report = LoadReport::default();
    let mut phase_started = Instant::now();
    let mut current: Option<Phase> = None;
    let mut since_event = 0u64;
    loop {
        match reader.next_record()? {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                if device != index {
                    return Err(Error::stream(
                        "read stream",
                        format!("record for device {device} in a single-device load"),
                    ));
                }
                if current != Some(phase) {
                    current = Some(phase);
                    phase_started = Instant::now();
                    obs.on_event(&Event::PhaseStarted {
                        device,
                        phase,
                        pending: None,
                    });
                }
                dev.write(bytes, chunk_end)?;
                let total = match phase {
                    Phase::PreCopy => &mut report.pre_copy_bytes,
                    Phase::StopCopy => &mut report.stop_copy_bytes,
                };
                *total += bytes.len() as u64;
                since_event += bytes.len() as u64;
                if chunk_end {
                    report.chunks += 1;
                }
                if since_event >= (4 << 20) {
                    since_event = 0;
                    obs.on_event(&Event::Progress {
                        device,
                        phase,
                        bytes: *total,
                    });
                }
            }
            Record::EndOfPhase { device, phase } => {
                obs.on_event(&Event::PhaseEnded {
                    device,
                    phase,
                    bytes: match phase {
                        Phase::PreCopy => report.pre_copy_bytes,
                        Phase::StopCopy => report.stop_copy_bytes,
                    },
                    chunks: report.chunks,
                    elapsed: phase_started.elapsed(),
                });
                current = None;
                if phase == Phase::PreCopy {
                    gate.pre_copy_loaded()?;
                }
            }
            Record::End(_) => break,
        }
    }
    gate.before_resume(reader.get_mut())?;
    reader.finish()?;
    dev.finish_resume()?;
    Ok(report)
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
    let recovery = dev.abort_resume();
    obs.on_event(&Event::RolledBack {
        device: index,
        recovery: recovery.to_string(),
    });
    Error::RolledBack {
        source: Box::new(error),
        device: dev.identity().instance,
        recovery,
    }
}
