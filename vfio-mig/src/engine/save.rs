// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source side: pre-copy rounds, stop-and-copy, and rollback on failure.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::stream::{Phase, StreamWriter};

use super::events::{Event, Observer};
use super::policy::{PreCopyPolicy, SwitchReason};
use super::{MigrationDevice, ReadOutcome};

/// Default size of the engine's transfer buffer (and of the stream's largest fragment).
pub const DEFAULT_BUFFER: usize = 1 << 20;

/// The save pipeline's depth ([`SaveOptions::pipeline`]) for a thread that may run on
/// `cores` CPUs: with three or more, a ring of three buffers (one being read, one being
/// written, one ready); with fewer, 0 (inline). The pipelined pump keeps two threads busy
/// (the device read; the CRC and the write), and the other end of the transfer (the
/// transport's receiver, a device's own thread, a destination on the same host) needs a
/// core too: on two CPUs the ring's reader competes with it, and issue 22's same-run
/// figures on a two-CPU machine had the inline pump ahead in 13 of the 17 comparisons that
/// differed (docs/benchmarks.md).
pub(crate) fn pipeline_for_cores(cores: usize) -> usize {
    if cores >= 3 {
        3
    } else {
        0
    }
}

/// The CPUs the calling thread may run on, from its affinity mask (`sched_getaffinity(2)`),
/// at least 1: a VMM pins its migration threads, and `nproc` of the host says nothing about
/// them.
pub(crate) fn available_cores() -> usize {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(mask) => (0..CpuSet::count())
            .filter(|&c| mask.is_set(c).unwrap_or(false))
            .count()
            .max(1),
        // The mask is always readable for the calling thread; if not, assume no spare core.
        Err(_) => 1,
    }
}

/// The default depth of the save pipeline: `pipeline_for_cores` of the CPUs the calling
/// thread may run on ([`available_cores`]).
pub(crate) fn default_pipeline() -> usize {
    pipeline_for_cores(available_cores())
}

/// The ring's buffers beyond the pump's own, for `opts`.
fn spare_buffers(opts: &SaveOptions, size: usize) -> Vec<Vec<u8>> {
    (1..opts.pipeline).map(|_| vec![0u8; size]).collect()
}

/// How to save a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveOptions {
    /// Pre-copy while the device runs before stopping it.
    pub live: bool,
    /// When to leave pre-copy.
    pub policy: PreCopyPolicy,
    /// Transfer buffer size.
    pub buffer: usize,
    /// Accept a unit of several devices where some lack the P2P states (every v1 device; v2
    /// without `VFIO_MIGRATION_P2P`). Off by default, as in QEMU: such a device cannot be
    /// quiesced, so while the unit stops it may still DMA into a peer that is already stopped
    /// (and on the destination run before a peer is loaded). See
    /// [`super::multi::check_unit`].
    pub allow_non_p2p_unit: bool,
    /// Buffers (of `buffer` bytes each) in the ring between the thread that reads the device
    /// and the one that checksums and writes the records; 0 or 1 does it all on one thread.
    /// The stream is the same either way; with a spare core the pipeline hides the CRC32C,
    /// HMAC and TLS work behind the device reads. The default is chosen from the CPUs the
    /// thread creating the options may run on (a ring of 3 from three CPUs up, else 0).
    pub pipeline: usize,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            live: false,
            policy: PreCopyPolicy::default(),
            buffer: DEFAULT_BUFFER,
            allow_non_p2p_unit: false,
            pipeline: default_pipeline(),
        }
    }
}

/// What a save did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct SaveReport {
    /// Pre-copy rounds run.
    pub rounds: u32,
    /// Why pre-copy ended, if it ran.
    pub switch_reason: Option<SwitchReason>,
    /// Bytes sent in pre-copy.
    pub pre_copy_bytes: u64,
    /// Bytes sent in stop-and-copy.
    pub stop_copy_bytes: u64,
    /// Device chunks sent.
    pub chunks: u64,
    /// Wall time from entering stop-and-copy until everything was sent: the device's share of
    /// the downtime.
    #[cfg_attr(feature = "serde", serde(with = "micros"))]
    pub stop_copy_time: Duration,
    /// The stop-and-copy time pre-copy predicted (remaining bytes over measured bandwidth).
    #[cfg_attr(feature = "serde", serde(with = "opt_micros"))]
    pub estimated_downtime: Option<Duration>,
    /// The bandwidth measured during pre-copy, in bytes per second.
    pub bandwidth: Option<u64>,
    /// Set when the source's STOP after the handoff failed: the error, which says what became
    /// of the device (reset, never returned to RUNNING: the destination runs its state).
    pub after_handoff: Option<String>,
    /// A live save of a device without pre-copy support: it was migrated in stop-and-copy
    /// only (QEMU does the same).
    pub stop_copy_only: bool,
}

#[cfg(feature = "serde")]
mod opt_micros {
    use std::time::Duration;
    pub(super) fn serialize<S: serde::Serializer>(
        d: &Option<Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_micros() as u64)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(feature = "serde")]
mod micros {
    use std::time::Duration;
    pub(super) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }
}

/// Where the engine's records go: a stream writer, or the front door's relays into the VMM's
/// writers.
pub(crate) trait RecordSink {
    /// Appends `read`'s data as DATA of `device` (see [`StreamWriter::data`]), taking its
    /// buffer: returns the one to read the next data into, the same or another of its length
    /// (a sink whose records are written by another thread sends the buffer along instead of
    /// a copy). After an error the buffer may be gone.
    fn data(&mut self, device: u16, phase: Phase, read: DeviceRead) -> Result<Vec<u8>>;
    /// Appends the END_OF_PHASE record of `device`.
    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()>;
}

/// A device read handed to a [`RecordSink`]: `buf[..len]` holds the data, the last of a
/// chunk if `chunk_end`.
pub(crate) struct DeviceRead {
    pub(crate) buf: Vec<u8>,
    pub(crate) len: usize,
    pub(crate) chunk_end: bool,
}

impl DeviceRead {
    /// The data read.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl<W: Write> RecordSink for StreamWriter<W> {
    fn data(&mut self, device: u16, phase: Phase, read: DeviceRead) -> Result<Vec<u8>> {
        StreamWriter::data(self, device, phase, read.data(), read.chunk_end)?;
        Ok(read.buf)
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        StreamWriter::end_phase(self, device, phase)
    }
}

/// Moves one phase's data from the device into the stream. Returns (bytes, chunks, ended):
/// `ended` is true when the device reported the end of the phase, false when `budget` bytes
/// were sent first (the loop only stops at a chunk boundary).
pub(crate) struct Pump<'a, S: RecordSink + ?Sized> {
    pub(crate) dev: &'a mut dyn MigrationDevice,
    pub(crate) out: &'a mut S,
    pub(crate) index: u16,
    pub(crate) buf: Vec<u8>,
    pub(crate) obs: &'a dyn Observer,
}

impl<S: RecordSink + ?Sized> Pump<'_, S> {
    /// The inline pump: read, checksum and write on the calling thread, one buffer.
    pub(crate) fn run(
        &mut self,
        phase: Phase,
        budget: Option<u64>,
        base: u64,
    ) -> Result<(u64, u64, bool)> {
        let mut tally = Tally::new(self.index, phase, base);
        let ended = self.run_inline(&mut tally, budget, None)?;
        Ok((tally.bytes, tally.chunks, ended.unwrap_or(true)))
    }

    /// The inline loop, counting into `tally`: `Some(ended)` once the phase ended or the
    /// budget was reached at a chunk boundary, `None` once `limit` bytes were sent (at any
    /// record: the caller goes on with the same device reads).
    pub(crate) fn run_inline(
        &mut self,
        tally: &mut Tally,
        budget: Option<u64>,
        limit: Option<u64>,
    ) -> Result<Option<bool>> {
        let phase = tally.phase;
        loop {
            if limit.is_some_and(|l| tally.bytes >= l) {
                return Ok(None);
            }
            match self.dev.read(&mut self.buf)? {
                ReadOutcome::PhaseEnd => return Ok(Some(true)),
                ReadOutcome::Data { len, chunk_end } => {
                    let buf = std::mem::take(&mut self.buf);
                    let read = DeviceRead {
                        buf,
                        len,
                        chunk_end,
                    };
                    self.buf = self.out.data(self.index, phase, read)?;
                    tally.sent(len, chunk_end, self.obs);
                    if chunk_end && budget.is_some_and(|b| tally.bytes >= b) {
                        return Ok(Some(false));
                    }
                }
            }
        }
    }
}

/// What a pump sent of one phase, and when to tell the observer.
pub(crate) struct Tally {
    pub(crate) index: u16,
    pub(crate) phase: Phase,
    pub(crate) base: u64,
    pub(crate) bytes: u64,
    pub(crate) chunks: u64,
    since_event: u64,
}

impl Tally {
    pub(crate) fn new(index: u16, phase: Phase, base: u64) -> Self {
        Tally {
            index,
            phase,
            base,
            bytes: 0,
            chunks: 0,
            since_event: 0,
        }
    }

    /// Counts `len` bytes written; a progress event every 4 MiB, or at a chunk's end after
    /// 1 MiB.
    pub(crate) fn sent(&mut self, len: usize, chunk_end: bool, obs: &dyn Observer) {
        self.bytes += len as u64;
        self.since_event += len as u64;
        if chunk_end {
            self.chunks += 1;
        }
        if self.since_event >= (4 << 20) || chunk_end && self.since_event >= (1 << 20) {
            self.since_event = 0;
            obs.on_event(&Event::Progress {
                device: self.index,
                phase: self.phase,
                bytes: self.base + self.bytes,
            });
        }
    }
}

/// Stop-and-copy: stops the device and sends the rest of its state, ending the stream's
/// stop-copy phase. The device is left in its stop-and-copy state: the STOP transition is the
/// caller's, after the stream is complete, so that it stays out of the downtime window
/// ([`MigrationDevice::finish_save`]).
pub(crate) fn stop_copy<S: RecordSink + ?Sized>(
    dev: &mut dyn MigrationDevice,
    out: &mut S,
    index: u16,
    opts: &SaveOptions,
    obs: &dyn Observer,
    report: &mut SaveReport,
) -> Result<()> {
    let started = Instant::now();
    dev.start_stop_copy()?;
    obs.on_event(&Event::PhaseStarted {
        device: index,
        phase: Phase::StopCopy,
        pending: None,
    });
    let mut pump = Pump {
        dev,
        out,
        index,
        buf: vec![0u8; opts.buffer.max(4096)],
        obs,
    };
    let mut spare = spare_buffers(opts, pump.buf.len());
    let (bytes, chunks, _) = pump.run_pipelined(Phase::StopCopy, None, 0, &mut spare)?;
    report.stop_copy_bytes = bytes;
    report.chunks += chunks;
    pump.out.end_phase(index, Phase::StopCopy)?;
    report.stop_copy_time = started.elapsed();
    obs.on_event(&Event::PhaseEnded {
        device: index,
        phase: Phase::StopCopy,
        bytes,
        chunks,
        elapsed: report.stop_copy_time,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::pipeline_for_cores;

    /// The rule at every CPU count, including those a test machine cannot afford (the
    /// integration test `pipeline.rs` checks the default against the thread's real affinity):
    /// inline below three CPUs, a ring of three buffers from three on (docs/benchmarks.md).
    #[test]
    fn the_pipeline_depth_follows_the_cpu_count() {
        assert_eq!([1, 2, 3, 64].map(pipeline_for_cores), [0, 0, 3, 3]);
    }
}
