// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `recover DEVICE`: report a device's migration state and bring one left in a non-running
//! state (a killed migration, a crashed VMM) back to RUNNING.

use vfio_mig::error::Recovery;
use vfio_mig::MigrationDevice;
use vfio_mig_fence::FenceConfig;
use vfio_mig_session::{Error, Result};

use super::transfer::print_json;

#[derive(serde::Serialize)]
struct RecoverJson {
    device: String,
    state_before: String,
    action: &'static str,
    state_after: Option<String>,
}

/// The state before, what recovery did, the state after.
fn recover_device(dev: &mut dyn MigrationDevice) -> Result<(String, Recovery, Option<String>)> {
    let before = dev.state_name()?;
    let recovery = dev.recover();
    Ok((before, recovery, dev.state_name().ok()))
}

/// Runs `recover`.
pub fn run(device: &str, json: bool, fence: &FenceConfig) -> Result<()> {
    // The lock: a migration that still runs on this device is not interrupted.
    let _claim = super::devices::claim(fence, device)?;
    let mut opened = super::devices::open_device(device)?;
    let (before, recovery, after) = recover_device(opened.device.as_mut())?;
    let action = match &recovery {
        Recovery::AlreadyRunning => "none",
        Recovery::Resumed => "recovered",
        Recovery::Reset => "reset",
        Recovery::Failed(_) => "failed",
        _ => "unknown",
    };
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
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_mig::Backend;

    /// A device left in a migration state (as a killed command leaves mtty) is brought back:
    /// STOP_COPY by the recovery arc, RESUMING (partial state) by a reset, as the kernel's
    /// v2 arcs allow (vfio_mig_get_next_state).
    #[test]
    fn stuck_devices_are_brought_back_to_running() {
        let (mut o, _) = vfio_mig_mock::open_named("mock:v2,size=1M", Backend::Auto).unwrap();
        o.device.start_stop_copy().unwrap();
        let (before, r, after) = recover_device(o.device.as_mut()).unwrap();
        assert!(before.contains("STOP_COPY"), "{before}");
        assert_eq!(r, Recovery::Resumed);
        assert!(after.unwrap().contains("RUNNING"));

        let (mut o, _) = vfio_mig_mock::open_named("mock:v2,size=1M", Backend::Auto).unwrap();
        o.device.start_resume().unwrap();
        let (before, r, after) = recover_device(o.device.as_mut()).unwrap();
        assert!(before.contains("RESUMING"), "{before}");
        assert_eq!(r, Recovery::Reset);
        assert!(after.unwrap().contains("RUNNING"));

        let (mut o, _) = vfio_mig_mock::open_named("mock:v1,size=1M", Backend::Auto).unwrap();
        o.device.start_pre_copy().unwrap();
        let (_, r, after) = recover_device(o.device.as_mut()).unwrap();
        assert_eq!(r, Recovery::Resumed);
        assert!(after.unwrap().contains("RUNNING"));
    }
}
