// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `recover DEVICE`: report a device's migration state and bring one left in a non-running
//! state (a killed migration, a crashed VMM) back to RUNNING.

use vfio_mig::error::{Error, Result};
use vfio_mig::fence::FenceConfig;
use vfio_mig::migration::Recovery;

use super::transfer::print_json;

#[derive(serde::Serialize)]
struct RecoverJson {
    device: String,
    state_before: String,
    action: &'static str,
    state_after: Option<String>,
}

/// Runs `recover`.
pub fn run(device: &str, json: bool, fence: &FenceConfig) -> Result<()> {
    // The lock: a migration that still runs on this device is not interrupted.
    let _claim = super::devices::claim(fence, device)?;
    let mut opened = super::devices::open_device(device)?;
    let dev = opened.device.as_mut();
    let before = dev.state_name()?;
    let recovery = dev.recover();
    let action = match &recovery {
        Recovery::AlreadyRunning => "none",
        Recovery::Resumed => "recovered",
        Recovery::Reset => "reset",
        Recovery::Failed(_) => "failed",
    };
    let after = dev.state_name().ok();
    if let Recovery::Failed(why) = &recovery {
        return Err(Error::device(
            format!("recover {device} (state {before})"),
            std::io::Error::other(format!(
                "neither the recovery transition nor a reset worked: {why}"
            )),
        ));
    }
    if json {
        return print_json(&RecoverJson {
            device: device.to_owned(),
            state_before: before,
            action,
            state_after: after,
        });
    }
    let after = after.unwrap_or_else(|| "unknown".into());
    match recovery {
        Recovery::AlreadyRunning => {
            eprintln!("{device}: state {before}: running, nothing to do")
        }
        Recovery::Resumed => eprintln!(
            "{device}: state {before}: returned to RUNNING by the recovery transition (now {after})"
        ),
        Recovery::Reset => eprintln!(
            "{device}: state {before}: no transition to RUNNING worked, the device was reset \
             (now {after}; its migrated state is lost)"
        ),
        Recovery::Failed(_) => {}
    }
    Ok(())
}
