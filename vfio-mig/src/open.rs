// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a real VFIO device by its sysfs path, and picking its protocol driver.
//!
//! The caller chooses the [`Backend`] (group or iommufd, or [`Backend::Auto`]); the library
//! reads no environment. A VMM that already holds a device fd wraps it in its own
//! [`DeviceIo`] and calls [`driver_for`].

use std::path::Path;
use std::sync::Arc;

pub use crate::device::backend::{Backend, DeviceAccess};
use crate::device::vfio::VfioDeviceIo;
use crate::device::DeviceIo;
use crate::error::{Error, Result};
use crate::migration::MigrationDevice;
#[cfg(feature = "v1")]
use crate::v1::V1Device;

/// An opened device, ready for the engine.
#[non_exhaustive]
pub struct OpenedDevice {
    /// The protocol driver over the device.
    pub device: Box<dyn MigrationDevice>,
    /// The raw device access, for probing.
    pub io: Arc<dyn DeviceIo>,
    /// For a real device, how it was opened (group or iommufd); `None` for a device the
    /// caller built itself.
    pub access: Option<DeviceAccess>,
}

impl OpenedDevice {
    /// Wraps a device access the caller built (a mock, or a VMM's own fd), with the protocol
    /// driver the device answers to: v2 where it answers a `PROBE | GET` of
    /// `VFIO_DEVICE_FEATURE_MIGRATION`, else v1 where it has a migration region.
    pub fn from_io(io: Arc<dyn DeviceIo>) -> Result<Self> {
        let device = driver_for(io.clone())?;
        Ok(Self {
            device,
            io,
            access: None,
        })
    }
}

impl std::fmt::Debug for OpenedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedDevice")
            .field("identity", &self.io.identity())
            .finish()
    }
}

/// Opens the VFIO device at sysfs path `path` (`/sys/bus/mdev/devices/<uuid>`,
/// `/sys/bus/pci/devices/<bdf>`) through `backend`.
pub fn open_device(path: &str, backend: Backend) -> Result<OpenedDevice> {
    if !Path::new(path).exists() {
        return Err(Error::InvalidInput(format!(
            "{path}: no such device (expected a sysfs path such as /sys/bus/mdev/devices/<uuid>)"
        )));
    }
    let vfio = VfioDeviceIo::open_with(Path::new(path), backend)
        .map_err(|e| Error::device(format!("open {path}"), e))?;
    let access = Some(vfio.access().clone());
    let io: Arc<dyn DeviceIo> = Arc::new(vfio);
    let device = driver_for(io.clone())?;
    Ok(OpenedDevice { device, io, access })
}

/// Picks the protocol driver for a device: v2 when it answers a
/// `VFIO_DEVICE_FEATURE_PROBE | GET` of `VFIO_DEVICE_FEATURE_MIGRATION`, else v1 (which needs
/// a v1 migration region).
pub(crate) fn driver_for(io: Arc<dyn DeviceIo>) -> Result<Box<dyn MigrationDevice>> {
    use vfio_bindings::bindings::vfio::{VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION};
    let v2 = crate::v2::feature::probe(
        io.as_ref(),
        VFIO_DEVICE_FEATURE_MIGRATION,
        VFIO_DEVICE_FEATURE_GET,
    );
    if v2.is_ok() {
        return Ok(Box::new(crate::v2::V2Device::open(io)?));
    }
    v1_driver(io)
}

/// The v1 driver for a device that does not speak v2.
#[cfg(feature = "v1")]
fn v1_driver(io: Arc<dyn DeviceIo>) -> Result<Box<dyn MigrationDevice>> {
    Ok(Box::new(V1Device::open(io)?))
}

/// Without the `v1` feature a device that does not speak v2 cannot migrate here.
#[cfg(not(feature = "v1"))]
fn v1_driver(_io: Arc<dyn DeviceIo>) -> Result<Box<dyn MigrationDevice>> {
    Err(Error::Unsupported(
        "probe the migration protocol: the device does not offer v2 migration \
         (VFIO_DEVICE_FEATURE_MIGRATION) and this build has no v1 (feature `v1`)"
            .into(),
    ))
}
