// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Opening the devices a command names: a mock (`mock:v1,...`), a vfio-user server's socket
//! (`vfio-user:PATH`) or a sysfs path, through the backend of the command line, and claiming
//! them under their fencing key.

use std::sync::OnceLock;

use vfio_mig::{Backend, OpenedDevice};
use vfio_mig_fence::{Claim, DeviceKey, FenceConfig};
use vfio_mig_mock::MockHandle;
use vfio_mig_session::{Error, Result};
use vfio_mig_user::ConnectOptions;

/// The backend of this command (`--backend`, `VFIO_MIG_BACKEND`), set once by [`set_backend`].
/// The command is one process, so it keeps this choice here; the library takes it as an
/// argument.
static BACKEND: OnceLock<Backend> = OnceLock::new();

/// Parses `--backend`.
pub fn parse_backend(text: &str) -> std::result::Result<Backend, String> {
    text.trim()
        .parse()
        .map_err(|e| format!("{e} (--backend, or VFIO_MIG_BACKEND={text})"))
}

/// Records the command's backend (the first call wins).
pub fn set_backend(backend: Backend) {
    let _ = BACKEND.set(backend);
}

fn backend() -> Backend {
    BACKEND.get().copied().unwrap_or_default()
}

/// Opens device `name`.
pub fn open_device(name: &str) -> Result<OpenedDevice> {
    Ok(open_with_handle(name)?.0)
}

/// Opens device `name` (a mock, `vfio-user:PATH` or a sysfs path), with the handle of a
/// mock.
pub fn open_with_handle(name: &str) -> Result<(OpenedDevice, Option<MockHandle>)> {
    if vfio_mig_user::is_vfio_user(name) {
        return Ok((vfio_mig_user::open(name, &ConnectOptions::default())?, None));
    }
    Ok(vfio_mig_mock::open_named(name, backend())?)
}

/// The fencing key of device `name`, if it has one.
fn device_key(name: &str) -> Result<Option<DeviceKey>> {
    if vfio_mig_user::is_vfio_user(name) {
        return Ok(vfio_mig_user::device_key(name).map(Some)?);
    }
    Ok(vfio_mig_mock::device_key(name)?)
}

/// Claims device `name` (its lock, if it has a fencing key).
pub fn claim(fence: &FenceConfig, name: &str) -> Result<Claim> {
    Ok(fence.claim(name, device_key(name)?)?)
}

/// Fails with a usage error when `names` holds one device twice.
pub fn refuse_duplicates(command: &str, names: &[String]) -> Result<()> {
    let mut keys = Vec::new();
    for name in names {
        if let Some(key) = device_key(name)? {
            if keys.contains(&key) {
                return Err(Error::invalid_input(format!(
                    "{command}: {name} is given twice (the same device)"
                )));
            }
            keys.push(key);
        }
    }
    Ok(())
}
