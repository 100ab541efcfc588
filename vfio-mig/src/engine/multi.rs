// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several devices as one unit: saved and loaded in parallel, switched over together.
//!
//! The order that keeps peer-to-peer DMA safe (the kernel's uAPI text for the P2P states): every
//! device is quiesced (RUNNING_P2P, or PRE_COPY_P2P in pre-copy: it stops initiating DMA but
//! still answers peers) **before any device stops**; only then does each enter stop-and-copy.
//! Each device runs in a thread of its own, writing its records into one stream
//! ([`SharedWriter`]); the destination demultiplexes records to one thread per device, so every
//! device receives its own records in stream order while devices load in parallel. One device
//! failing fails the unit: every source is rolled back, every destination reset.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::Report;
use crate::error::{Error, Result};
use crate::stream::{Phase, StreamWriter};

use super::events::Observer;
use super::save::{pre_copy, stop_copy, RecordSink, SaveOptions, SaveReport};
use super::MigrationDevice;

/// A stream writer shared by several device threads: each record is appended whole under a
/// lock, so records of different devices interleave but never mix. Once a device fails, the
/// writer refuses further records, so the other devices stop at their next write instead of
/// finishing a phase for nothing.
pub struct SharedWriter<W: Write> {
    inner: Mutex<StreamWriter<W>>,
    failed: AtomicBool,
}

impl<W: Write> std::fmt::Debug for SharedWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedWriter")
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<W: Write> SharedWriter<W> {
    /// Shares `writer`.
    pub fn new(writer: StreamWriter<W>) -> Self {
        Self {
            inner: Mutex::new(writer),
            failed: AtomicBool::new(false),
        }
    }

    /// Marks the unit failed: later records are refused.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// The writer back, for the trailer.
    pub fn into_inner(self) -> StreamWriter<W> {
        self.inner.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, f: impl FnOnce(&mut StreamWriter<W>) -> Result<T>) -> Result<T> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::SiblingFailed);
        }
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }
}

impl<W: Write> RecordSink for &SharedWriter<W> {
    fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        self.with(|w| w.data(device, phase, bytes, chunk_end))
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.with(|w| w.end_phase(device, phase))
    }
}

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

/// Runs `phase` on every device in parallel (one thread each); returns the first error after
/// all threads ended, having made the others stop early.
fn in_parallel<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    out: &SharedWriter<W>,
    reports: &mut [SaveReport],
    phase: impl Fn(&mut dyn MigrationDevice, &mut &SharedWriter<W>, u16, &mut SaveReport) -> Result<()>
        + Sync,
) -> Result<()> {
    if devs.len() == 1 {
        let mut sink = out;
        return phase(&mut *devs[0], &mut sink, 0, &mut reports[0]);
    }
    each_with_report(devs, reports, |i, dev, report| {
        let mut sink = out;
        let r = phase(dev, &mut sink, i as u16, report);
        if r.is_err() {
            out.fail();
        }
        r
    })
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

/// Pre-copy on every device in parallel, each under the policy of `opts`.
fn pre_copy_all<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    out: &SharedWriter<W>,
    opts: &SaveOptions,
    obs: &dyn Observer,
    reports: &mut [SaveReport],
) -> Result<()> {
    in_parallel(devs, out, reports, |dev, sink, i, report| {
        pre_copy(dev, sink, i, opts, obs, report)
    })
}

/// Quiesces every device (RUNNING_P2P / PRE_COPY_P2P where supported) before any of them is
/// stopped: after this, no device initiates DMA into a peer, and every device still answers.
/// The transitions run in parallel (one thread per device), so the unit pays one device's
/// state-change latency, not the sum; this returns once every one has ended.
pub(crate) fn quiesce_all(devs: &mut [&mut dyn MigrationDevice]) -> Result<()> {
    super::parallel::each(devs, "quiesce the unit", |d| d.quiesce())
}

/// Stop-and-copy on every device in parallel (after [`quiesce_all`]).
fn stop_copy_all<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    out: &SharedWriter<W>,
    opts: &SaveOptions,
    obs: &dyn Observer,
    reports: &mut [SaveReport],
) -> Result<()> {
    quiesce_all(devs)?;
    in_parallel(devs, out, reports, |dev, sink, i, report| {
        stop_copy(dev, sink, i, opts, obs, report)
    })
}

/// The STOP transition of every device (in parallel), once the destination runs its state
/// ([`MigrationDevice::finish_handoff`]). A device whose STOP fails is reset, never resumed,
/// and the failure is recorded in its report (`after_handoff`) and logged: the migration
/// itself succeeded.
pub fn finish_handoff_all(devs: &mut [&mut dyn MigrationDevice], reports: &mut [SaveReport]) {
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

/// Saves every device: pre-copy in parallel when `opts.live`, quiesce all, stop-and-copy in
/// parallel. The devices are left in stop-and-copy (see [`finish_handoff_all`]); the caller
/// writes the trailer and rolls the devices back on failure.
pub fn save_all<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    out: &SharedWriter<W>,
    opts: &SaveOptions,
    obs: &dyn Observer,
) -> Result<Vec<SaveReport>> {
    check_unit(devs, opts.allow_non_p2p_unit)?;
    let mut reports = vec![SaveReport::default(); devs.len()];
    if opts.live {
        pre_copy_all(devs, out, opts, obs, &mut reports)?;
    }
    stop_copy_all(devs, out, opts, obs, &mut reports)?;
    Ok(reports)
}
