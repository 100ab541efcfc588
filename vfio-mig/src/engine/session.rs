// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stream headers for a migration session.

use std::io::Read;

use crate::error::{Error, Result};
use crate::stream::{DeviceDescriptor, StreamHeader};

use super::MigrationDevice;

/// A fresh random session id, from the kernel's random source.
pub fn new_session_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut id))
        .map_err(|e| Error::device("read /dev/urandom for a session id", e))?;
    Ok(id)
}

/// The descriptor of a device in a stream header.
pub(crate) fn describe(dev: &dyn MigrationDevice, live: bool) -> DeviceDescriptor {
    let caps = dev.capabilities();
    DeviceDescriptor {
        protocol: dev.protocol(),
        live,
        migration_flags: caps.migration_flags,
        model: dev.identity().model,
    }
}

impl StreamHeader {
    /// A header for a new session over `devices`, with a fresh session id
    /// ([`crate::new_session_id`]); `live` says the devices pre-copy, `epoch` is the fencing
    /// epoch ([`crate::Epoch`]) the stream carries.
    pub fn new(devices: &[&dyn MigrationDevice], live: bool, epoch: u64) -> Result<Self> {
        Ok(StreamHeader {
            session_id: new_session_id()?,
            epoch,
            devices: devices.iter().map(|d| describe(*d, live)).collect(),
        })
    }
}
