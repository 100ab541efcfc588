// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Rollback after a failure, shared by the single-device and multi-device paths: apply a
//! recovery to each device, report it, and fold what became of the devices into the error.

use crate::error::Error;

use super::Recovery;

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
