// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source of a migration, paced by the VMM: start, rounds, switch-over, then finish or
//! cancel.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::multi::{check_unit, each_with_report, finish_handoff_all, quiesce_all};
use crate::engine::save::{stop_copy, Pump, RecordSink};
use crate::engine::session::{describe, new_session_id};
use crate::engine::{NoObserver, Observer, SaveOptions, SaveReport};
use crate::error::{Error, Result};
use crate::migration::{MigrationDevice, RunState};
use crate::stream::{Phase, StreamAuth, StreamHeader, StreamWriter};

use super::channels::{channel_header, check_count, flush_all, in_channel, Outputs};
use super::handback::{as_refs, reset_errored, restore, Handback};
use super::options::SourceOptions;
use super::relay::{Relay, Staged, UnitSink};

/// What the devices of a migration still hold, summed over the devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimate {
    /// Pre-copy bytes still pending on the devices in pre-copy (v1 `pending_bytes`; v2
    /// `initial_bytes + dirty_bytes` of `VFIO_MIG_GET_PRECOPY_INFO`).
    pub pending: u64,
    /// Of those, the initial bytes (v2). The uAPI asks userspace not to leave pre-copy before
    /// they reach 0 (a device may need them loaded early to keep the switch-over short). v1
    /// devices have no such split and count 0 here. They may grow again: a device that
    /// re-initialises its pre-copy data (`VFIO_PRECOPY_INFO_REINIT`) reports new initial
    /// bytes, and pre-copy has not converged until those are sent too.
    pub initial_bytes: u64,
    /// A device re-initialised its pre-copy data since it was last asked (v2
    /// `VFIO_PRECOPY_INFO_REINIT`): its `initial_bytes` are new, whatever was sent before.
    pub reinit: bool,
    /// The devices' estimate of what stop-and-copy will send (v2 `MIG_DATA_SIZE`); `None` when
    /// a device cannot tell (v1; v2 on Linux 5.18 to 6.1, which lack `MIG_DATA_SIZE`), so the
    /// VMM knows its downtime estimate is incomplete.
    pub stop_copy: Option<u64>,
}

impl Estimate {
    /// What the switch-over would move: the pending pre-copy bytes plus the stop-and-copy
    /// estimate, as QEMU's `vfio_state_pending_exact` counts them; `None` when the
    /// stop-and-copy size is unknown.
    pub fn switch_over_bytes(&self) -> Option<u64> {
        self.stop_copy.map(|s| s.saturating_add(self.pending))
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Round {
    /// Device state bytes the round sent (record payloads).
    pub sent: u64,
    /// Stream bytes the round wrote (the header on the first round, records, payloads): what
    /// the budget counts.
    pub written: u64,
    /// What is left after it.
    pub estimate: Estimate,
}

/// The outcome of [`Source::finish`]: the devices, stopped, and any whose STOP failed (each
/// then reset, never run again: its state runs on the destination).
pub struct Finished<D> {
    /// The devices, in the order they were given.
    pub devices: Vec<D>,
    /// Devices whose STOP after the handoff failed, with what became of each.
    pub stop_failures: Vec<String>,
    /// What was sent of each device, in device order ([`Source::reports`]), with the failed
    /// STOP of a device in its `after_handoff`.
    pub reports: Vec<SaveReport>,
}

impl<D> std::fmt::Debug for Finished<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Finished")
            .field("devices", &self.devices.len())
            .field("stop_failures", &self.stop_failures)
            .finish()
    }
}

/// The stream of a source: its header and one stream writer per channel.
struct Stream {
    /// The unit's stream header (each channel's part of it staged in `writers` until
    /// written).
    header: StreamHeader,
    /// The key of a keyed stream, for the channels' writers.
    key: Option<Arc<dyn StreamAuth>>,
    /// One stream writer per channel (the devices' sub-streams, `Source::set_channels`);
    /// `None` once the stream is finished or abandoned.
    writers: Option<Vec<Staged>>,
}

/// Where a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// Prepared: the header is staged, no device was touched yet.
    Prepared,
    /// Started: rounds may run (devices that were running are in pre-copy).
    PreCopy,
    /// The stream is complete; the devices are in stop-and-copy.
    SwitchedOver,
    /// Finished, cancelled or failed: the devices are back in the VMM's hands.
    Ended,
}

/// The source side of a migration of one or several devices, as one unit.
///
/// `D` is how the VMM hands its devices over: owned (`Box<dyn MigrationDevice>`, a driver
/// type), or borrowed (`&mut V2Device`, `&mut Box<dyn MigrationDevice>`), for a VMM that keeps
/// its device in a structure of its own. Whatever happens, the devices come back: with every
/// error of [`start`](Self::start) ([`Handback`]), from [`finish`](Self::finish), and from
/// [`into_devices`](Self::into_devices) after a failure or a cancel.
///
/// Every failure returns each device to the state it had when the migration began (a running
/// device to RUNNING, a paused VM's device to STOP), or resets it where that fails; the error
/// says which. Dropping an unfinished source cancels it before the switch-over and stops its
/// devices for good after it (see [`into_devices`](Self::into_devices)).
pub struct Source<D: MigrationDevice> {
    pub(super) devs: Vec<D>,
    /// Each device's state when the migration began.
    start: Vec<RunState>,
    /// Which devices are in pre-copy.
    pub(super) live: Vec<bool>,
    stage: Stage,
    /// The END_OF_PHASE(PRE_COPY) records are written: no more rounds.
    pub(super) pre_copy_ended: bool,
    /// The switch-over began: every device may have moved.
    switching: bool,
    /// Boxed: the stream's bookkeeping is large, and a VMM keeps a source in its own enums.
    stream: Box<Stream>,
    /// How many channels the devices travel over.
    channels: usize,
    buf: Vec<u8>,
    /// What was sent of each device so far.
    pub(super) reports: Vec<SaveReport>,
    buffer: usize,
    /// The switch-over pump's depth ([`SourceOptions::pipeline`]).
    pipeline: Option<usize>,
    /// A query of a round found a device re-initialised (REINIT): the next estimate says so.
    reinit_seen: bool,
}

impl<D: MigrationDevice> std::fmt::Debug for Source<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.devs.iter().map(|d| d.identity().instance).collect();
        f.debug_struct("Source")
            .field("devices", &ids)
            .field("start", &self.start)
            .field("stage", &self.stage)
            .finish()
    }
}

impl<D: MigrationDevice> Source<D> {
    /// Starts migrating `devs` as one unit: records each device's state (running, or stopped
    /// for a paused VM), stages the stream header (written by the first
    /// [`round`](Self::round) or [`switch_over`](Self::switch_over)), and puts every running
    /// device that supports it into pre-copy. Devices of a paused VM go straight to
    /// stop-and-copy at the switch-over (the path a snapshot takes).
    ///
    /// On failure the devices come back with the error, each in its start state (or reset).
    /// The same as [`prepare`](Self::prepare) then [`begin`](Self::begin).
    pub fn start(devs: Vec<D>, opts: &SourceOptions) -> std::result::Result<Self, Handback<D>> {
        let mut source = Self::prepare(devs, opts)?;
        match source.begin() {
            Ok(()) => Ok(source),
            Err(error) => {
                let devices = std::mem::take(&mut source.devs);
                Err(Handback::new(error, devices))
            }
        }
    }

    /// The first half of [`start`](Self::start), touching no device: checks the unit,
    /// records each device's state and stages the stream header, so that a session layer can
    /// send the header and wait for the destination's answer before any device moves. A
    /// prepared source is dropped (or [`cancel`](Self::cancel)led) with nothing to undo.
    pub fn prepare(
        mut devs: Vec<D>,
        opts: &SourceOptions,
    ) -> std::result::Result<Self, Handback<D>> {
        match plan(&mut devs, opts) {
            Ok((start, live, header, writer)) => {
                // As QEMU and the engine's save: a live migration of a device without
                // PRE_COPY moves it in stop-and-copy only, and its report says so.
                let reports = devs
                    .iter()
                    .map(|d| SaveReport {
                        stop_copy_only: opts.pre_copy && !d.capabilities().pre_copy,
                        ..SaveReport::default()
                    })
                    .collect();
                Ok(Self {
                    devs,
                    start,
                    live,
                    stage: Stage::Prepared,
                    pre_copy_ended: false,
                    switching: false,
                    stream: Box::new(Stream {
                        header,
                        key: opts.key.clone(),
                        writers: Some(vec![writer]),
                    }),
                    channels: 1,
                    buf: Vec::new(),
                    reports,
                    buffer: opts.buffer.max(4096),
                    pipeline: opts.pipeline,
                    reinit_seen: false,
                })
            }
            Err(error) => {
                let error = reset_errored(&mut devs, error);
                Err(Handback::new(error, devs))
            }
        }
    }

    /// The second half of [`start`](Self::start): puts every running device that supports it
    /// into pre-copy. On failure every device returns to its start state (or is reset), the
    /// error says which, and the migration is over.
    pub fn begin(&mut self) -> Result<()> {
        self.check(Stage::Prepared, "begin")?;
        for i in 0..self.devs.len() {
            if self.live[i] {
                if let Err(e) = self.devs[i].start_pre_copy() {
                    self.stage = Stage::Ended;
                    self.stream.writers = None;
                    let touched = &self.live[..=i];
                    return Err(restore(&mut self.devs[..=i], &self.start[..=i], touched, e));
                }
            }
        }
        self.stage = Stage::PreCopy;
        Ok(())
    }

    /// The stream header: the session id, the epoch and each device's descriptor (live for a
    /// device in pre-copy).
    pub fn header(&self) -> &StreamHeader {
        &self.stream.header
    }

    /// Sends the unit's devices over `count` channels (connections) instead of one: device
    /// `i` travels on channel `i mod count`, in that channel's sub-stream (its header names
    /// the channel's devices). Every later call then takes one writer per channel
    /// ([`Channels`](super::Channels)); the unit stays one: one quiesce barrier before any
    /// device stops, and one rollback of every device whichever channel fails. Only before
    /// [`begin`](Self::begin) and before anything was written; 1 to one channel per device.
    pub fn set_channels(&mut self, count: usize) -> Result<()> {
        self.check(Stage::Prepared, "set the channels")?;
        check_count(count, self.devs.len())?;
        let writers = self.stream.writers.as_ref().ok_or_else(ended)?;
        if writers.iter().any(|w| w.get_ref().is_empty()) {
            return Err(Error::InvalidInput(
                "set the channels: the stream header was written already".into(),
            ));
        }
        let writers = (0..count)
            .map(|ch| {
                let sub = channel_header(&self.stream.header, ch, count);
                StreamWriter::with_key(Vec::new(), &sub, self.stream.key.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        self.stream.writers = Some(writers);
        self.channels = count;
        Ok(())
    }

    /// How many channels the devices travel over ([`set_channels`](Self::set_channels)).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Writes the stream header (each channel's sub-stream header) into `out` if no call
    /// wrote it yet (a session layer sends it before the destination accepts, before
    /// [`begin`](Self::begin)); returns the bytes written. Otherwise the first
    /// [`round`](Self::round) or the switch-over writes it.
    pub fn write_header<O: Outputs + ?Sized>(&mut self, out: &mut O) -> Result<u64> {
        if !matches!(self.stage, Stage::Prepared | Stage::PreCopy) {
            return Err(ended());
        }
        let writers = self.stream.writers.as_mut().ok_or_else(ended)?;
        let r = Relay::new(writers, out).map(|relay| relay.written);
        r.map_err(|e| self.fail(e))
    }

    /// What was sent of each device so far, in device order: the pre-copy and stop-and-copy
    /// bytes and chunks, the stop-and-copy time, and whether a device skipped pre-copy.
    pub fn reports(&self) -> &[SaveReport] {
        &self.reports
    }

    /// Whether a device is in pre-copy (live), in device order.
    pub fn live(&self) -> &[bool] {
        &self.live
    }

    /// Whether [`switch_over`](Self::switch_over) completed: the stream is whole and the
    /// devices wait in stop-and-copy for [`finish`](Self::finish) or [`cancel`](Self::cancel).
    pub fn switched_over(&self) -> bool {
        self.stage == Stage::SwitchedOver
    }

    /// Each device's state when the migration began, in device order.
    pub fn start_states(&self) -> &[RunState] {
        &self.start
    }

    /// What the devices hold now, without sending anything. `reinit` also counts a
    /// re-initialisation a round's own query found since the last estimate.
    pub fn estimate(&mut self) -> Result<Estimate> {
        self.check(Stage::PreCopy, "estimate")?;
        let r = estimate(&mut self.devs, &self.live);
        let mut e = r.map_err(|e| self.fail(e))?;
        e.reinit |= std::mem::take(&mut self.reinit_seen);
        Ok(e)
    }

    /// Sends one pre-copy round into `out`: from each device in pre-copy, the bytes it had
    /// pending when the round began (at least one chunk), until `budget` stream bytes were
    /// written (reads are sized to what is left of it, so a round ends within a page and a
    /// record header of it, at a chunk boundary). A device whose pre-copy data is
    /// exhausted for now sends nothing and may have more later
    /// ([`wait_for_data`](Self::wait_for_data)). The first call also writes the stream
    /// header. Returns what it wrote and what is left.
    ///
    /// Over several channels ([`set_channels`](Self::set_channels)) `out` is one writer per
    /// channel ([`Channels`](super::Channels)) and the budget counts them all.
    pub fn round<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        budget: Option<u64>,
    ) -> Result<Round> {
        self.check(Stage::PreCopy, "send a pre-copy round")?;
        if self.pre_copy_ended {
            return Err(Error::InvalidInput(
                "send a pre-copy round: pre-copy was ended".into(),
            ));
        }
        let r = self.send_round(out, budget, &NoObserver);
        let (sent, written) = r.map_err(|e| self.fail(e))?;
        let estimate = self.estimate()?;
        Ok(Round {
            sent,
            written,
            estimate,
        })
    }

    /// One round; returns the payload bytes sent and the stream bytes written.
    pub(super) fn send_round<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        budget: Option<u64>,
        obs: &dyn Observer,
    ) -> Result<(u64, u64)> {
        self.check_sessions("send a pre-copy round")?;
        let writers = self.stream.writers.as_mut().ok_or_else(ended)?;
        let mut relay = Relay::new(writers, out)?;
        let mut buf = std::mem::take(&mut self.buf);
        let mut sent = 0;
        'devices: for (i, dev) in self.devs.iter_mut().enumerate() {
            if !self.live[i] {
                continue;
            }
            // What the device had pending when its turn began: the round sends that much
            // (at least one chunk), so a device dirtying faster than the link cannot keep
            // the round going forever.
            let now = dev.pending()?;
            self.reinit_seen |= now.reinit;
            let pending = now.bytes.max(1);
            let mut device_sent = 0;
            while device_sent < pending {
                let left = budget.map(|b| b.saturating_sub(relay.written));
                if left == Some(0) {
                    break 'devices;
                }
                let want = left.map_or(pending - device_sent, |l| l.min(pending - device_sent));
                // One chunk per pump, read no larger than what is left of the budget: a round
                // ends within a page (and a record header) of it.
                let read_size = usize::try_from(want)
                    .unwrap_or(usize::MAX)
                    .clamp(4096, self.buffer);
                buf.resize(read_size, 0);
                let report = &mut self.reports[i];
                let (bytes, ended) =
                    pump_pre_copy(dev, &mut relay, i, &mut buf, Some(1), report, obs)?;
                device_sent += bytes;
                sent += bytes;
                if ended || bytes == 0 {
                    break;
                }
            }
        }
        self.buf = buf;
        Ok((sent, relay.written))
    }

    /// Waits up to `timeout` for pre-copy data, after a [`round`](Self::round) that sent
    /// nothing while the estimate still counts pre-copy bytes (a device answered ENOMSG: "userspace
    /// can wait for more data (which may never come) by using poll", says the uAPI). Polls
    /// the data fds of the devices in pre-copy; `true` when one became readable. Without a
    /// data fd to poll (v1) it sleeps `timeout` and answers `false`.
    pub fn wait_for_data(&mut self, timeout: Duration) -> Result<bool> {
        self.check(Stage::PreCopy, "wait for pre-copy data")?;
        let fds: Vec<_> = self.devs.iter().filter_map(|d| d.data_fd()).collect();
        crate::engine::wait::poll_any(&fds, timeout)
    }

    /// The switch-over, with the vCPUs stopped: quiesces every device before any of them
    /// stops (RUNNING_P2P / PRE_COPY_P2P where supported), moves them all to stop-and-copy and
    /// sends the rest of their state into `out` (the devices in parallel, one thread each),
    /// and ends the stream. The devices stay in stop-and-copy: the VMM now reads its last
    /// dirty pages (DMA logs still run there; pds ends them at STOP_COPY -> STOP), hands the
    /// stream over, and then calls [`finish`](Self::finish) once the destination runs, or
    /// [`cancel`](Self::cancel) if it cannot.
    ///
    /// Before anything stops, every device in pre-copy is asked once more (QEMU's final
    /// `save_query_pending`): if one re-initialised its pre-copy data since the last
    /// estimate (`VFIO_PRECOPY_INFO_REINIT`), the switch-over is refused with an error naming
    /// it and the migration stays in pre-copy: more [`round`](Self::round)s send the new
    /// initial data first, as the uAPI recommends.
    pub fn switch_over<O: Outputs + ?Sized>(&mut self, out: &mut O) -> Result<()> {
        self.switch_over_observed(out, &NoObserver)
    }

    /// Ends pre-copy in the stream before the switch-over: writes the END_OF_PHASE(PRE_COPY)
    /// record of every device in pre-copy into `out`, so that the destination can tell it
    /// loaded all pre-copy data (a session layer then waits for its acknowledgement, as QEMU's
    /// switchover-ack). The devices keep their state; no more rounds can run. Optional: the
    /// switch-over writes these records itself when this was not called.
    pub fn end_pre_copy<O: Outputs + ?Sized>(&mut self, out: &mut O) -> Result<()> {
        self.check(Stage::PreCopy, "end pre-copy")?;
        if self.pre_copy_ended {
            return Ok(());
        }
        let r = self.write_pre_copy_ends(out);
        r.map_err(|e| self.fail(e))
    }

    fn write_pre_copy_ends<O: Outputs + ?Sized>(&mut self, out: &mut O) -> Result<()> {
        let writers = self.stream.writers.as_mut().ok_or_else(ended)?;
        let mut relay = Relay::new(writers, out)?;
        for (i, &live) in self.live.iter().enumerate() {
            if live {
                relay.end_phase(i as u16, Phase::PreCopy)?;
            }
        }
        self.pre_copy_ended = true;
        flush_all(out)
    }

    /// After pre-copy ended in the stream and the destination acknowledged it, asks every
    /// device in pre-copy once more (QEMU's final `save_query_pending`). Each that
    /// re-initialised its pre-copy data since (`VFIO_PRECOPY_INFO_REINIT`) has its pre-copy
    /// reopened: its new data goes into `out` up to the device's end of data, then its phase
    /// ends again. Returns how many devices were reopened: a session layer waits for as many
    /// acknowledgements before it asks again, and the switch-over refuses while a device
    /// reports REINIT.
    pub fn resend_reinit<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        obs: &dyn Observer,
    ) -> Result<usize> {
        self.check(Stage::PreCopy, "send re-initialised pre-copy data")?;
        let r = self.reopen_reinit(out, obs);
        r.map_err(|e| self.fail(e))
    }

    fn reopen_reinit<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        obs: &dyn Observer,
    ) -> Result<usize> {
        self.check_sessions("send re-initialised pre-copy data")?;
        let writers = self.stream.writers.as_mut().ok_or_else(ended)?;
        let mut relay = Relay::new(writers, &mut *out)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(self.buffer, 0);
        let mut reopened = 0;
        for (i, dev) in self.devs.iter_mut().enumerate() {
            if !self.live[i] {
                continue;
            }
            let now = dev.pending()?;
            if !now.reinit {
                continue;
            }
            log::info!(
                "{}: new initial data after its pre-copy ended (REINIT, {} bytes): sending it \
                 before the switch-over",
                dev.identity().instance,
                now.initial_bytes.unwrap_or(0)
            );
            pump_pre_copy(
                dev,
                &mut relay,
                i,
                &mut buf,
                None,
                &mut self.reports[i],
                obs,
            )?;
            relay.end_phase(i as u16, Phase::PreCopy)?;
            reopened += 1;
        }
        self.buf = buf;
        flush_all(out)?;
        Ok(reopened)
    }

    /// [`switch_over`](Self::switch_over), reporting each device's stop-and-copy phase to
    /// `obs`.
    pub fn switch_over_observed<O: Outputs + ?Sized>(
        &mut self,
        out: &mut O,
        obs: &dyn Observer,
    ) -> Result<()> {
        self.check(Stage::PreCopy, "switch over")?;
        match reinit_pending(&mut self.devs, &self.live) {
            Ok(None) => {}
            Ok(Some(refusal)) => return Err(refusal),
            Err(e) => return Err(self.fail(e)),
        }
        match self.send_rest(out, obs) {
            Ok(()) => {
                self.stage = Stage::SwitchedOver;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn send_rest<O: Outputs + ?Sized>(&mut self, out: &mut O, obs: &dyn Observer) -> Result<()> {
        self.check_sessions("switch over")?;
        let mut writers = self.stream.writers.take().ok_or_else(ended)?;
        Relay::new(&mut writers, &mut *out)?;
        self.switching = true;
        let mut devs = as_refs(&mut self.devs);
        quiesce_all(&mut devs)?;
        let defaults = SaveOptions::default();
        let opts = SaveOptions {
            buffer: self.buffer,
            pipeline: self.pipeline.unwrap_or(defaults.pipeline),
            ..defaults
        };
        let live = &self.live;
        let end_pre_copy = !self.pre_copy_ended;
        let reports = &mut self.reports;
        let count = writers.len();
        if let ([dev], [report]) = (&mut devs[..], &mut reports[..]) {
            // One device: on this thread, each record straight from the device's buffer into
            // its channel's writer with its header (no staging copy, no hand-over between
            // threads).
            let mut relay = Relay::new(&mut writers, &mut *out)?;
            if live[0] && end_pre_copy {
                relay.end_phase(0, Phase::PreCopy)?;
            }
            stop_copy(&mut **dev, &mut relay, 0, &opts, obs, report)?;
        } else {
            // Each device reads at most one record's payload at a time, so that its buffer
            // travels to the writer whole, as one record.
            let opts = SaveOptions {
                buffer: opts.buffer.min(crate::stream::format::MAX_FRAGMENT),
                ..opts
            };
            let (sink, records) = UnitSink::new(&mut writers);
            let saved = std::thread::scope(|s| {
                let unit = s.spawn(move || {
                    each_with_report(&mut devs, reports, |i, dev, report| {
                        let index = i as u16;
                        let mut to = &sink;
                        let r = if live[i] && end_pre_copy {
                            to.end_phase(index, Phase::PreCopy)
                        } else {
                            Ok(())
                        }
                        .and_then(|()| stop_copy(dev, &mut to, index, &opts, obs, report));
                        if r.is_err() {
                            sink.fail();
                        }
                        r
                    })
                    // The sink goes with this thread: its end closes `records`.
                });
                // Dropping `records` on a failed write stops the device threads at their next
                // record.
                let written = out.write_records(records);
                let saved = unit.join().unwrap_or_else(|_| {
                    Err(Error::protocol("switch over", "the unit's thread panicked"))
                });
                // A failed write stopped the device threads ("the stream writer stopped"): the
                // write's error is the cause, and a session layer explains it with the peer's
                // reason.
                written.and(saved)
            });
            saved?;
        }
        for (ch, writer) in writers.into_iter().enumerate() {
            let (trailer, _) = writer.finish()?;
            out.channel(ch).write_all(&trailer).map_err(|e| {
                in_channel(ch, count, Error::transport("write the stream trailer", e))
            })?;
        }
        flush_all(out)
    }

    /// Ends the migration once the destination runs the devices' state (or when that is in
    /// doubt: the devices must not run here again either way). Every device goes to STOP; one
    /// whose STOP fails is reset, never run: its state runs on the destination. Consumes the
    /// source: past this point nothing can roll back.
    ///
    /// Called before [`switch_over`](Self::switch_over) completed, it cancels instead (the
    /// stream is incomplete, so nothing can run elsewhere) and says so in `stop_failures`.
    pub fn finish(mut self) -> Finished<D> {
        if self.stage != Stage::SwitchedOver {
            let failure = self
                .cancel()
                .map(|e| crate::error::Report(&e).to_string())
                .unwrap_or_else(|| "the migration had already ended".into());
            return Finished {
                devices: std::mem::take(&mut self.devs),
                stop_failures: vec![format!("finish before the switch-over: {failure}")],
                reports: std::mem::take(&mut self.reports),
            };
        }
        self.stage = Stage::Ended;
        let mut reports = std::mem::take(&mut self.reports);
        finish_handoff_all(&mut as_refs(&mut self.devs), &mut reports);
        let stop_failures = self
            .devs
            .iter()
            .zip(&reports)
            .filter_map(|(d, r)| {
                r.after_handoff
                    .as_ref()
                    .map(|why| format!("{}: {why}", d.identity().instance))
            })
            .collect();
        Finished {
            devices: std::mem::take(&mut self.devs),
            stop_failures,
            reports,
        }
    }

    /// Abandons the migration if it has not ended: every device returns to the state it had
    /// when the migration began (or is reset). Valid after the switch-over only as long as
    /// the destination has not run the state. Returns the error that says what became of
    /// each device; `None` when the migration had already ended.
    pub fn cancel(&mut self) -> Option<Error> {
        if self.stage == Stage::Ended {
            return None;
        }
        Some(self.fail(Error::InvalidInput("migration cancelled".into())))
    }

    /// Abandons the migration after `error`, a failure of the VMM's own (its channel, its
    /// memory rounds), as [`cancel`](Self::cancel) does: returns `error` with what became of
    /// each device, or `error` alone when the migration had already ended.
    pub fn cancel_with(&mut self, error: Error) -> Error {
        if self.stage == Stage::Ended {
            return error;
        }
        self.fail(error)
    }

    /// The devices back, after a failure or a cancel, or of a migration still going, which
    /// then ends as when the source is dropped: before the switch-over it is cancelled (the
    /// stream is incomplete, so no destination can run it: the devices return to their start
    /// state); after it, the stream is whole and may already run elsewhere, so the outcome is
    /// in doubt and the devices are stopped for good, as by [`finish`](Self::finish).
    pub fn into_devices(mut self) -> Vec<D> {
        self.settle();
        std::mem::take(&mut self.devs)
    }

    /// Ends an unfinished migration as [`into_devices`](Self::into_devices) says.
    fn settle(&mut self) {
        match self.stage {
            Stage::Ended => {}
            Stage::Prepared => self.stage = Stage::Ended,
            Stage::PreCopy => {
                if let Some(e) = self.cancel() {
                    log::warn!(
                        "a migration source given up before its switch-over: {}",
                        crate::error::Report(&e)
                    );
                }
            }
            Stage::SwitchedOver => {
                log::warn!(
                    "a migration source given up after its switch-over, without finish or \
                     cancel: the outcome is in doubt, so its devices stay stopped"
                );
                self.stage = Stage::Ended;
                let mut reports = vec![SaveReport::default(); self.devs.len()];
                finish_handoff_all(&mut as_refs(&mut self.devs), &mut reports);
            }
        }
    }

    /// The devices, for what this type does not cover (DMA logging reads).
    pub fn devices(&mut self) -> impl Iterator<Item = &mut D> + '_ {
        self.devs.iter_mut()
    }

    pub(super) fn check(&self, stage: Stage, step: &str) -> Result<()> {
        if self.stage != stage {
            return Err(Error::InvalidInput(format!(
                "{step}: the migration is {}",
                match self.stage {
                    Stage::Prepared => "prepared, not begun",
                    Stage::PreCopy => "still in pre-copy",
                    Stage::SwitchedOver => "already switched over",
                    Stage::Ended => "over (finished, failed or cancelled)",
                }
            )));
        }
        Ok(())
    }

    /// Refuses to go on with a device that left the saving session this migration put it in
    /// (it ran again): its data so far belongs to a session that no longer exists.
    fn check_sessions(&mut self, step: &str) -> Result<()> {
        for (dev, &live) in self.devs.iter_mut().zip(&self.live) {
            if live && !dev.is_saving()? {
                return Err(Error::protocol(
                    step,
                    format!(
                        "{} left its saving session during the migration (it ran again): \
                         start a new migration",
                        dev.identity().instance
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Returns every device to its start state after `e`; the migration cannot go on.
    pub(super) fn fail(&mut self, e: Error) -> Error {
        // What this migration moved: nothing before it began, the devices in pre-copy, and
        // every device once the switch-over quiesced them.
        let touched: Vec<bool> = match self.stage {
            _ if self.switching => vec![true; self.devs.len()],
            _ => self.live.clone(),
        };
        let begun = self.stage != Stage::Prepared;
        self.stage = Stage::Ended;
        self.stream.writers = None;
        if !begun {
            // No device moved: nothing to restore, unless one dropped into an error state.
            return reset_errored(&mut self.devs, e);
        }
        restore(&mut self.devs, &self.start, &touched, e)
    }
}

impl<D: MigrationDevice> Drop for Source<D> {
    fn drop(&mut self) {
        self.settle();
    }
}

fn ended() -> Error {
    Error::InvalidInput("the migration is over".into())
}

/// Checks the unit, records the start states and stages the header; touches no device.
fn plan<D: MigrationDevice>(
    devs: &mut [D],
    opts: &SourceOptions,
) -> Result<(Vec<RunState>, Vec<bool>, StreamHeader, Staged)> {
    if devs.is_empty() || devs.len() > crate::stream::MAX_DEVICES {
        return Err(Error::InvalidInput(format!(
            "a migration of {} devices (1 to {} are possible)",
            devs.len(),
            crate::stream::MAX_DEVICES
        )));
    }
    check_unit(&as_refs(devs), opts.allow_non_p2p_unit)?;
    let start = devs
        .iter_mut()
        .map(|d| d.run_state())
        .collect::<Result<Vec<_>>>()?;
    let live: Vec<bool> = devs
        .iter()
        .zip(&start)
        .map(|(d, s)| opts.pre_copy && d.capabilities().pre_copy && *s == RunState::Running)
        .collect();
    let session_id = match opts.session {
        Some(id) => id,
        None => new_session_id()?,
    };
    let header = StreamHeader {
        session_id,
        epoch: opts.epoch.0,
        devices: devs
            .iter()
            .zip(&live)
            .map(|(d, &live)| describe(d, live))
            .collect(),
    };
    let writer = StreamWriter::with_key(Vec::new(), &header, opts.key.clone())?;
    Ok((start, live, header, writer))
}

/// The last query before the switch-over: the refusal naming the devices in pre-copy that
/// re-initialised their pre-copy data, if any did.
fn reinit_pending<D: MigrationDevice>(devs: &mut [D], live: &[bool]) -> Result<Option<Error>> {
    let mut reinit = Vec::new();
    for (dev, &live) in devs.iter_mut().zip(live) {
        if live {
            let pending = dev.pending()?;
            if pending.reinit {
                reinit.push(format!(
                    "{} ({} new initial bytes)",
                    dev.identity().instance,
                    pending.initial_bytes.unwrap_or(0)
                ));
            }
        }
    }
    Ok((!reinit.is_empty()).then(|| {
        Error::InvalidInput(format!(
            "switch over: {} re-initialised the pre-copy data (REINIT): send more rounds \
             first; the migration is still in pre-copy",
            reinit.join(", ")
        ))
    }))
}

fn estimate<D: MigrationDevice>(devs: &mut [D], live: &[bool]) -> Result<Estimate> {
    let mut total = Estimate {
        pending: 0,
        initial_bytes: 0,
        reinit: false,
        stop_copy: Some(0),
    };
    for (dev, &live) in devs.iter_mut().zip(live) {
        if live {
            let pending = dev.pending()?;
            total.reinit |= pending.reinit;
            total.pending = total.pending.saturating_add(pending.bytes);
            total.initial_bytes = total
                .initial_bytes
                .saturating_add(pending.initial_bytes.unwrap_or(0));
        }
        let stop = dev.stop_copy_estimate()?;
        total.stop_copy = match (total.stop_copy, stop) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            _ => None,
        };
    }
    Ok(total)
}

/// Pumps device `i`'s pre-copy data into `relay` (at most `chunks` chunks, or to its end of
/// data), reading into `buf`, and counts it in `report`. Returns the bytes sent and whether
/// the device's data ended.
fn pump_pre_copy<O: Outputs + ?Sized, D: MigrationDevice>(
    dev: &mut D,
    relay: &mut Relay<'_, O>,
    i: usize,
    buf: &mut Vec<u8>,
    chunks: Option<u64>,
    report: &mut SaveReport,
    obs: &dyn Observer,
) -> Result<(u64, bool)> {
    let mut pump = Pump {
        dev,
        out: relay,
        index: i as u16,
        buf: std::mem::take(buf),
        obs,
    };
    let result = pump.run(Phase::PreCopy, chunks, report.pre_copy_bytes);
    *buf = pump.buf;
    let (bytes, sent_chunks, ended) = result?;
    report.pre_copy_bytes += bytes;
    report.chunks += sent_chunks;
    Ok((bytes, ended))
}
