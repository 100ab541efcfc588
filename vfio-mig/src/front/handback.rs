// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The devices, handed back with the error that ended a migration before it began or after
//! it ended: a VMM that gave its devices to the front door never loses them.

pub(crate) use crate::engine::rollback::fold;
use crate::error::Recovery;
use crate::error::{Error, Report};
use crate::migration::{MigrationDevice, RunState};

/// An error, with the devices it concerns handed back (each in the state the error names).
pub struct Handback<D> {
    /// What went wrong, and what became of each device (boxed: a `Result` with this error
    /// stays small).
    pub error: Box<Error>,
    /// The devices, in the order they were given.
    pub devices: Vec<D>,
}

impl<D> Handback<D> {
    /// The error and the devices.
    pub fn into_parts(self) -> (Error, Vec<D>) {
        (*self.error, self.devices)
    }

    /// Hands `devices` back with `error`.
    pub(crate) fn new(error: Error, devices: Vec<D>) -> Self {
        Self {
            error: Box::new(error),
            devices,
        }
    }
}

impl<D> std::fmt::Debug for Handback<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handback")
            .field("error", &Report(&self.error).to_string())
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl<D> std::fmt::Display for Handback<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<D> std::error::Error for Handback<D> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl<D> From<Handback<D>> for Error {
    fn from(h: Handback<D>) -> Self {
        *h.error
    }
}

/// Returns each device to the state it had when the migration began, after `error`: a device
/// still there is left alone; any other is recovered by its driver, which returns it to
/// where its saving session began (RUNNING, or STOP for a paused VM) or resets it. The coarse
/// run state cannot tell RUNNING from the quiesced RUNNING_P2P, so a running device the
/// migration moved (`touched`) is also told to run, which leaves RUNNING_P2P. The error then
/// says what became of each.
pub(crate) fn restore<D: MigrationDevice>(
    devs: &mut [D],
    start: &[RunState],
    touched: &[bool],
    error: Error,
) -> Error {
    let outcomes: Vec<(String, Recovery)> = devs
        .iter_mut()
        .zip(start)
        .zip(touched)
        .map(|((dev, &start), &touched)| {
            let recovery = match dev.run_state() {
                Ok(RunState::Running) if start == RunState::Running && touched => match dev.run() {
                    Ok(()) => Recovery::AlreadyRunning,
                    Err(_) => dev.recover(),
                },
                Ok(now) if now == start => match start {
                    RunState::Running => Recovery::AlreadyRunning,
                    RunState::Stopped => Recovery::AlreadyStopped,
                },
                _ => dev.recover(),
            };
            (dev.identity().instance, recovery)
        })
        .collect();
    fold(error, outcomes)
}

/// The end of a migration that failed before it moved any device: a device that dropped
/// into an error state meanwhile (its hardware stopped answering as it was read) is reset, and
/// `error` says so; the others are as they were, and `error` is returned as it is.
pub(crate) fn reset_errored<D: MigrationDevice>(devs: &mut [D], error: Error) -> Error {
    let outcomes: Vec<(String, Recovery)> = devs
        .iter_mut()
        .filter_map(|dev| match dev.run_state() {
            Ok(_) => None,
            Err(_) => Some((dev.identity().instance, dev.recover())),
        })
        .collect();
    if outcomes.is_empty() {
        return error;
    }
    fold(error, outcomes)
}

/// The devices as the engine's functions take them.
pub(crate) fn as_refs<D: MigrationDevice>(devs: &mut [D]) -> Vec<&mut dyn MigrationDevice> {
    devs.iter_mut()
        .map(|d| d as &mut dyn MigrationDevice)
        .collect()
}
