// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side: compatibility check, resuming, and reset on failure.

use std::io::Read;

use crate::error::{Error, Result};
use crate::stream::{Record, StreamReader};

use super::events::Observer;
use super::loader::{check_compatible, DeviceLoader, LoadReport};
use super::run::run_unit;
use super::MigrationDevice;

/// Loads the records of stream device `index` into `dev`, which must be fresh (running or
/// stopped). Records of other devices are an error here; the multi-device loader
/// demultiplexes before calling this per device.
///
/// The device enters RESUMING only after the header was checked, and returns to RUNNING only
/// after the whole stream, trailer included, was read and verified: a destination never runs
/// with partial state. The caller handles rollback (the front door resets a failed destination).
pub fn load_device<R: Read>(
    dev: &mut dyn MigrationDevice,
    reader: &mut StreamReader<R>,
    index: u16,
    obs: &dyn Observer,
) -> Result<LoadReport> {
    let header = reader.header();
    if index != 0 || header.devices.len() != 1 {
        return Err(Error::stream(
            "stream header",
            format!(
                "a single-device load of device {index} from a stream of {} devices",
                header.devices.len()
            ),
        ));
    }
    check_compatible(dev, &header.devices[0])?;
    dev.start_resume()?;
    let mut loader = DeviceLoader::new(0, obs);
    loop {
        match reader.next_record()? {
            Record::Data {
                phase,
                bytes,
                chunk_end,
                ..
            } => loader.data(dev, phase, bytes, chunk_end)?,
            Record::EndOfPhase { phase, .. } => loader.end_phase(phase),
            Record::End(_) => break,
        }
    }
    // The device takes its state (and may refuse it) only after the trailer verified, and
    // runs only after the end of the stream was checked.
    dev.load_state()?;
    reader.finish()?;
    run_unit(&mut [dev])?;
    Ok(loader.report())
}
