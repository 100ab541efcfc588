// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening a device by name: a sysfs path of a VFIO device, or a mock specification.
//!
//! A real device is opened through the [`Backend`] chosen, in this order, by
//! [`set_backend`] (the command line's `--backend`), the `VFIO_MIG_BACKEND` environment
//! variable ([`BACKEND_ENV`]), or [`Backend::Auto`].

use std::path::Path;
use std::sync::Arc;

pub use crate::device::backend::{Backend, DeviceAccess, BACKEND_ENV};
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
    /// For a real device, how it was opened (group or iommufd); `None` for a mock.
    pub access: Option<DeviceAccess>,
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

/// Forces the backend [`open_device`] (and [`VfioDeviceIo::open`]) use in this process, over
/// `VFIO_MIG_BACKEND` (`None` returns the choice to the environment).
pub fn set_backend(backend: Option<Backend>) {
    crate::device::backend::set_process_backend(backend);
}

/// The backend [`open_device`] uses: the one [`set_backend`] forced, else `VFIO_MIG_BACKEND`,
/// else [`Backend::Auto`]. A `VFIO_MIG_BACKEND` other than `auto`, `group` or `iommufd` is a
/// usage error.
pub fn configured_backend() -> Result<Backend> {
    Backend::configured().map_err(Error::Usage)
}

/// Opens `name`: `mock:v1[,options]` or the sysfs path of a VFIO device
/// (`/sys/bus/mdev/devices/<uuid>`, `/sys/bus/pci/devices/<bdf>`), the latter through the
/// [`configured_backend`].
pub fn open_device(name: &str) -> Result<OpenedDevice> {
    if is_mock(name) {
        return open_device_with(name, Backend::Auto);
    }
    open_device_with(name, configured_backend()?)
}

/// Like [`open_device`], with the backend of a real device given (a mock ignores it).
pub fn open_device_with(name: &str, backend: Backend) -> Result<OpenedDevice> {
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
            access: None,
        });
    }
    let path = Path::new(name);
    if !path.exists() {
        return Err(Error::Usage(format!(
            "{name}: no such device (expected a sysfs path such as /sys/bus/mdev/devices/<uuid>, or mock:v1)"
        )));
    }
    let vfio = VfioDeviceIo::open_with(path, backend)
        .map_err(|e| Error::device(format!("open {name}"), e))?;
    let access = Some(vfio.access().clone());
    let io: Arc<dyn DeviceIo> = Arc::new(vfio);
    let device = driver_for(io.clone())?;
    Ok(OpenedDevice {
        device,
        io,
        mock: None,
        access,
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
