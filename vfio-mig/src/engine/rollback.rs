// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rollback after a failure, shared by the single-device and multi-device paths: apply a
//! recovery to each device, report it, and fold what became of the devices into the error.

use crate::error::Error;

use super::events::{Event, Observer};
use super::{MigrationDevice, Recovery};

/// Folds what became of each device into the error.
fn rolled_back(devs: &[&mut dyn MigrationDevice], error: Error, outcomes: Vec<Recovery>) -> Error {
    let outcomes: Vec<(String, Recovery)> = devs
        .iter()
        .map(|d| d.identity().instance)
        .zip(outcomes)
        .collect();
    fold(error, outcomes)
}

/// Folds what became of each named device into `error`: [`Error::RolledBack`] for one
/// device, [`Error::RolledBackAll`] for several.
pub(crate) fn fold(error: Error, mut outcomes: Vec<(String, Recovery)>) -> Error {
    if outcomes.len() == 1 {
        let (device, recovery) = outcomes.remove(0);
        return Error::RolledBack {
            source: Box::new(error),
            device,
            recovery,
        };
    }
    Error::RolledBackAll {
        source: Box::new(error),
        outcomes,
    }
}

/// Applies `recover` to every device (reporting each outcome as device `first + i`) and folds
/// the outcomes into `error`.
pub(crate) fn roll_back(
    devs: &mut [&mut dyn MigrationDevice],
    first: u16,
    error: Error,
    obs: &dyn Observer,
    recover: fn(&mut dyn MigrationDevice) -> Recovery,
) -> Error {
    let outcomes = devs
        .iter_mut()
        .enumerate()
        .map(|(i, d)| {
            let r = recover(&mut **d);
            obs.on_event(&Event::RolledBack {
                device: first + i as u16,
                recovery: r.to_string(),
            });
            r
        })
        .collect();
    rolled_back(devs, error, outcomes)
}
