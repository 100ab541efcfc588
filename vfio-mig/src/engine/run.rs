// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The run step of a destination unit and its point of no return.
//!
//! Once one destination device has entered RUNNING it runs the migrated state: an mlx5 VF
//! may have transmitted queued work, an RDMA queue pair advanced its sequence numbers. From
//! then on the source must never run that state again, whatever happens to the unit's other
//! devices (QEMU leaves its source in postmigrate). Before it, a failure is an ordinary one:
//! every destination is reset and the source runs again. The step is ordered so that a device
//! that cannot run is found before that point where it can be: every device reaches
//! RUNNING_P2P first (a refused arc fails the unit while nothing runs), then they enter
//! RUNNING one after another, so that a failure of the first is still an ordinary one.

use crate::error::{Error, Report, Result};

use super::parallel::each;
use super::MigrationDevice;

/// Runs every device of a loaded unit: RUNNING_P2P on all ([`MigrationDevice::prepare_run`]),
/// then RUNNING on each in order ([`MigrationDevice::finish_resume`]).
///
/// A failure before any device ran is returned as it is: the caller resets the unit
/// (the front door's `Destination::run`). A device that failed to run after another one
/// ran (the point of no return) is reset here, the others keep running, and the error is
/// [`Error::PastNoReturn`] naming each: the caller must keep what runs, and the source must
/// not run the state again.
pub(crate) fn run_unit(devs: &mut [&mut dyn MigrationDevice]) -> Result<()> {
    each(devs, "prepare the unit to run", |d| d.prepare_run())?;
    // One device after another, not all at once: a driver resets a device whose RUNNING arc
    // failed inside that call, so a device started in parallel could enter RUNNING beside a
    // peer that already lost its state, and a unit whose *first* RUNNING fails would pass the
    // point of no return for nothing. In order, the first failure before any device runs is
    // an ordinary one; after it, every other device still runs (its state exists nowhere
    // else now) and the failures are named. QEMU also starts its devices one by one.
    let mut failures = Vec::new();
    let mut running = Vec::new();
    for dev in devs.iter_mut() {
        let name = dev.identity().instance;
        match dev.finish_resume() {
            Ok(()) => running.push(name),
            Err(e) if running.is_empty() => return Err(e),
            Err(e) => failures.push((name, Report(&e).to_string(), dev.abort_resume())),
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let failed: Vec<String> = failures
        .iter()
        .map(|(name, why, recovery)| format!("{name} failed to run ({why}) and {recovery}"))
        .collect();
    Err(Error::PastNoReturn {
        step: "run the unit".into(),
        detail: format!(
            "{} run{} the migrated state; {}",
            if running.is_empty() {
                "no device".to_string()
            } else {
                running.join(", ")
            },
            if running.len() == 1 { "s" } else { "" },
            failed.join("; ")
        ),
    })
}
