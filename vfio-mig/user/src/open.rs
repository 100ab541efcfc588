// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door: a device named `vfio-user:PATH` (PATH the server's socket), opened into
//! vfio-mig's [`OpenedDevice`] with the protocol driver the device answers for (v2).

use std::path::Path;
use std::sync::Arc;

use vfio_mig::backend::DeviceIo;
use vfio_mig::error::{Error, Result};
use vfio_mig::OpenedDevice;
use vfio_mig_fence::DeviceKey;

use crate::device::{ConnectOptions, VfioUserDevice};

/// The prefix that names a vfio-user device.
pub const SCHEME: &str = "vfio-user:";

/// Whether `name` names a vfio-user device.
pub fn is_vfio_user(name: &str) -> bool {
    name.starts_with(SCHEME)
}

fn socket_of(name: &str) -> Result<&Path> {
    match name.strip_prefix(SCHEME) {
        Some(path) if !path.is_empty() => Ok(Path::new(path)),
        _ => Err(Error::InvalidInput(format!(
            "{name}: expected vfio-user:PATH, PATH a vfio-user server's socket"
        ))),
    }
}

/// Connects to the server of `name` (`vfio-user:PATH`) and opens its device for migration.
pub fn open(name: &str, opts: &ConnectOptions) -> Result<OpenedDevice> {
    let path = socket_of(name)?;
    let dev = VfioUserDevice::connect(path, opts)
        .map_err(|e| Error::device(format!("open {name}"), e))?;
    let io: Arc<dyn DeviceIo> = Arc::new(dev);
    OpenedDevice::from_io(io)
}

/// The fencing key of `name`: its socket's canonical path (the device is the server behind
/// it), so that one server is not claimed twice under two spellings.
pub fn device_key(name: &str) -> Result<DeviceKey> {
    let path = socket_of(name)?;
    let canonical = path.canonicalize().map_err(|e| {
        Error::InvalidInput(format!(
            "{name}: no vfio-user socket at {}: {e}",
            path.display()
        ))
    })?;
    Ok(DeviceKey::from_text(format!(
        "{SCHEME}{}",
        canonical.display()
    )))
}
