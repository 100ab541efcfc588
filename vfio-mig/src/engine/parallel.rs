// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One state transition on every device of a unit at once.
//!
//! Why: a transition costs a device its firmware's latency (tens of milliseconds on some
//! devices), and inside the downtime window the unit waits for all of them. Issued one after
//! another, n devices cost n latencies; issued together, about one. The P2P order stays the
//! caller's: [`each`] returns only after every device's transition has ended, so a caller
//! that quiesces the unit with it, then stops it, never stops a device before every peer is
//! quiesced.

use crate::error::{Error, Result};

use super::MigrationDevice;

/// Runs `step` on every device, one thread each (inline for one device), and waits for all
/// of them. Returns the first device's error, in device order, after every thread ended:
/// the caller then rolls back a unit whose devices are all back in its hands.
pub(crate) fn each(
    devs: &mut [&mut dyn MigrationDevice],
    what: &str,
    step: impl Fn(&mut dyn MigrationDevice) -> Result<()> + Sync,
) -> Result<()> {
    if devs.len() <= 1 {
        return devs.iter_mut().try_for_each(|d| step(&mut **d));
    }
    let step = &step;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let threads: Vec<_> = devs
            .iter_mut()
            .map(|dev| s.spawn(move || step(&mut **dev)))
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    Err(Error::protocol(
                        what,
                        "a device's transition thread panicked",
                    ))
                })
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Like [`each`], for a step that cannot fail the unit: every device's outcome, in order.
pub(crate) fn each_outcome<T: Send>(
    devs: &mut [&mut dyn MigrationDevice],
    step: impl Fn(&mut dyn MigrationDevice) -> T + Sync,
) -> Vec<std::thread::Result<T>> {
    if devs.len() <= 1 {
        return devs.iter_mut().map(|d| Ok(step(&mut **d))).collect();
    }
    let step = &step;
    std::thread::scope(|s| {
        let threads: Vec<_> = devs
            .iter_mut()
            .map(|dev| s.spawn(move || step(&mut **dev)))
            .collect();
        threads.into_iter().map(|t| t.join()).collect()
    })
}
