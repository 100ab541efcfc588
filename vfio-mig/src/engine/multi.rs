// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several devices as one unit: the P2P rule of a unit, the quiesce before any device stops,
//! and each device on a thread of its own (the front door's switch-over).
//!
//! The order that keeps peer-to-peer DMA safe (the kernel's uAPI text for the P2P states): every
//! device is quiesced (RUNNING_P2P, or PRE_COPY_P2P in pre-copy: it stops initiating DMA but
//! still answers peers) **before any device stops**; only then does each enter stop-and-copy.

use crate::error::Report;
use crate::error::{Error, Result};

use super::save::SaveReport;
use super::MigrationDevice;

/// Refuses a unit of several devices where some lack the P2P states, unless `allow` (the
/// caller's explicit opt-in, [`super::SaveOptions::allow_non_p2p_unit`]). QEMU refuses such a
/// unit ("Multiple VFIO devices migration is supported only if all of them support P2P
/// migration"): a device that cannot be quiesced keeps initiating DMA while its peers stop,
/// possibly into a peer already stopped. One device alone needs no P2P.
pub fn check_unit(devs: &[&mut dyn MigrationDevice], allow: bool) -> Result<()> {
    if devs.len() < 2 || allow {
        return Ok(());
    }
    let lacking: Vec<String> = devs
        .iter()
        .filter_map(|d| {
            d.capabilities()
                .unit_member(d.protocol())
                .err()
                .map(|why| format!("{} ({why})", d.identity().instance))
        })
        .collect();
    if lacking.is_empty() {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "several devices migrate as one unit only if all of them support P2P migration: {} \
         cannot be quiesced and could DMA into a peer already stopped; opt in to that risk \
         explicitly (--allow-non-p2p-unit) or migrate the devices separately",
        lacking.join(", ")
    )))
}

/// Runs `task(i, device, report)` for every device on a thread of its own and returns, after
/// every thread ended, the first real failure: not the [`Error::SiblingFailed`] of the
/// devices that failure stopped.
pub(crate) fn each_with_report(
    devs: &mut [&mut dyn MigrationDevice],
    reports: &mut [SaveReport],
    task: impl Fn(usize, &mut dyn MigrationDevice, &mut SaveReport) -> Result<()> + Sync,
) -> Result<()> {
    let task = &task;
    let results: Vec<Result<()>> = std::thread::scope(|s| {
        let threads: Vec<_> = devs
            .iter_mut()
            .zip(reports.iter_mut())
            .enumerate()
            .map(|(i, (dev, report))| s.spawn(move || task(i, &mut **dev, report)))
            .collect();
        threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::protocol("save", "a device thread panicked")))
            })
            .collect()
    });
    let mut errors: Vec<Error> = results.into_iter().filter_map(|r| r.err()).collect();
    match errors
        .iter()
        .position(|e| !matches!(e, Error::SiblingFailed))
    {
        Some(i) => Err(errors.swap_remove(i)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// Quiesces every device (RUNNING_P2P / PRE_COPY_P2P where supported) before any of them is
/// stopped: after this, no device initiates DMA into a peer, and every device still answers.
/// The transitions run in parallel (one thread per device), so the unit pays one device's
/// state-change latency, not the sum; this returns once every one has ended.
pub(crate) fn quiesce_all(devs: &mut [&mut dyn MigrationDevice]) -> Result<()> {
    super::parallel::each(devs, "quiesce the unit", |d| d.quiesce())
}

/// The STOP transition of every device (in parallel), once the destination runs its state
/// ([`MigrationDevice::finish_handoff`]). A device whose STOP fails is reset, never resumed,
/// and the failure is recorded in its report (`after_handoff`) and logged: the migration
/// itself succeeded.
pub(crate) fn finish_handoff_all(
    devs: &mut [&mut dyn MigrationDevice],
    reports: &mut [SaveReport],
) {
    let names: Vec<String> = devs.iter().map(|d| d.identity().instance).collect();
    let outcomes = super::parallel::each_outcome(devs, |d| d.finish_handoff());
    for (i, outcome) in outcomes.into_iter().enumerate() {
        let failure = match outcome {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => Report(&e).to_string(),
            Err(_) => "the STOP thread panicked".to_string(),
        };
        log::warn!(
            "{}: STOP after a completed handoff failed: {failure}",
            names[i]
        );
        if let Some(report) = reports.get_mut(i) {
            report.after_handoff = Some(failure);
        }
    }
}
