// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side: compatibility check, resuming, and reset on failure.

use std::io::Read;

use crate::error::{Error, Result};
use crate::stream::StreamReader;

use super::events::Observer;
use super::gate::{LoadGate, NoGate};
use super::loader::LoadReport;
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
    load_device_gated(dev, reader, index, obs, &mut NoGate)
}

/// [`load_device`] with the hooks of a destination's handshake: `gate` is called once the
/// device's pre-copy data is loaded, and after the trailer before the device resumes.
pub(crate) fn load_device_gated<R: Read>(
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
