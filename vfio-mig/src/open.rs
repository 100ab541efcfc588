// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a device by name: a sysfs path of a VFIO device, or a mock specification.

use std::path::Path;
use std::sync::Arc;

use crate::device::vfio::VfioDeviceIo;
use crate::device::DeviceIo;
use crate::engine::MigrationDevice;
use crate::error::{Error, Result};
use crate::mock::{MockHandle, MockSpec};
use crate::v1::V1Device;

/// An opened device, ready for the engine.
pub struct OpenedDevice {
    /// The protocol driver over the device.
    pub device: Box<dyn MigrationDevice>,
    /// The raw device access, for probing.
    pub io: Arc<dyn DeviceIo>,
    /// For a mock, the handle that inspects it.
    pub mock: Option<MockHandle>,
}

impl std::fmt::Debug for OpenedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedDevice")
            .field("identity", &self.io.identity())
            .finish()
    }
}

/// Whether `name` names a mock device (`mock:v1,...`).
pub fn is_mock(name: &str) -> bool {
    name.starts_with("mock:")
}

/// Opens `name`: `mock:v1[,options]` or the sysfs path of a VFIO device
/// (`/sys/bus/mdev/devices/<uuid>`, `/sys/bus/pci/devices/<bdf>`).
pub fn open_device(name: &str) -> Result<OpenedDevice> {
    if is_mock(name) {
        let spec: MockSpec = name
            .parse()
            .map_err(|e| Error::Usage(format!("{name}: {e}")))?;
        let (io, handle) = crate::mock::open(&spec)
            .map_err(|e| Error::device(format!("create mock device {name}"), e))?;
        let device = driver_for(io.clone())?;
        return Ok(OpenedDevice {
            device,
            io,
            mock: Some(handle),
        });
    }
    let path = Path::new(name);
    if !path.exists() {
        return Err(Error::Usage(format!(
            "{name}: no such device (expected a sysfs path such as /sys/bus/mdev/devices/<uuid>, or mock:v1)"
        )));
    }
    let io: Arc<dyn DeviceIo> =
        Arc::new(VfioDeviceIo::open(path).map_err(|e| Error::device(format!("open {name}"), e))?);
    let device = driver_for(io.clone())?;
    Ok(OpenedDevice {
        device,
        io,
        mock: None,
    })
}

/// Picks the protocol driver for a device: v2 when it answers a
/// `VFIO_DEVICE_FEATURE_PROBE | GET` of `VFIO_DEVICE_FEATURE_MIGRATION`, else v1 (which needs
/// a v1 migration region).
pub fn driver_for(io: Arc<dyn DeviceIo>) -> Result<Box<dyn MigrationDevice>> {
    use vfio_bindings::bindings::vfio::{VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION};
    let v2 = crate::v2::feature::probe(
        io.as_ref(),
        VFIO_DEVICE_FEATURE_MIGRATION,
        VFIO_DEVICE_FEATURE_GET,
    );
    if v2.is_ok() {
        return Ok(Box::new(crate::v2::V2Device::open(io)?));
    }
    Ok(Box::new(V1Device::open(io)?))
}
