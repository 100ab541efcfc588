// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door: one migration of one or several devices, as a VMM drives it.
//!
//! A VMM owns the schedule of a live migration: it runs memory rounds, measures its link and
//! decides when to stop the vCPUs. [`Source`] fits that loop. [`Source::start`] writes the
//! stream header and puts every device that supports it into pre-copy, all devices forming
//! one unit; [`Source::round`] sends one pre-copy round (what each device had pending when
//! the round began) and returns what is left, with the device's own estimate of its
//! stop-and-copy size, so the VMM can fold device state into its downtime estimate;
//! [`Source::complete`] quiesces every device before any stops (P2P), stops them, sends the
//! rest of their state and ends the stream. On the destination, [`resume`] loads the stream
//! into the devices and runs them only once the whole stream verified.
//!
//! Any failure returns every source device to RUNNING (or resets it), and every destination
//! device is reset, never run with partial state; the error says what became of each.
//!
//! ```
//! # fn demo(src: Box<dyn vfio_mig::MigrationDevice>, dst: Box<dyn vfio_mig::MigrationDevice>)
//! # -> vfio_mig::Result<()> {
//! let mut source = vfio_mig::Source::start(vec![src], Vec::new(), 1)?;
//! loop {
//!     let round = source.round()?;
//!     // The VMM's own policy: here, switch over once little is left.
//!     if round.estimate.pending < 64 << 10 {
//!         break;
//!     }
//! }
//! let stream = source.complete()?;
//! let mut dst = [dst];
//! vfio_mig::resume(&mut dst, &stream[..])?;
//! # Ok(()) }
//! ```

use std::io::{Read, Write};

use crate::engine::demux::load_all_gated;
use crate::engine::multi::{
    check_unit, finish_handoff_all, quiesce_all, rollback_destinations, rollback_sources,
};
use crate::engine::save::Pump;
use crate::engine::session::{describe, new_session_id};
use crate::engine::{check_compatible, LoadReport, NoGate, NoObserver, SaveReport};
use crate::error::{Error, Result};
use crate::migration::MigrationDevice;
use crate::stream::{Phase, StreamHeader, StreamReader, StreamWriter};

/// The engine's record size for a VMM-driven migration: a MiB, as QEMU reads a data fd.
const BUFFER: usize = 1 << 20;

/// What the devices of a migration still hold, summed over the devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Estimate {
    /// Pre-copy bytes still pending (0 for devices without pre-copy).
    pub pending: u64,
    /// The devices' estimate of what stop-and-copy will send
    /// ([`MigrationDevice::stop_copy_estimate`], v2 `MIG_DATA_SIZE`); `None` when a device
    /// cannot tell (v1), so the VMM knows its downtime estimate is incomplete.
    pub stop_copy: Option<u64>,
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Round {
    /// Bytes the round sent.
    pub sent: u64,
    /// What is left after it.
    pub estimate: Estimate,
}

/// The source side of a live migration of one or several devices, as one unit.
pub struct Source<W: Write> {
    devs: Vec<Box<dyn MigrationDevice>>,
    out: Option<StreamWriter<W>>,
    buf: Vec<u8>,
    sent: Vec<u64>,
}

impl<W: Write> std::fmt::Debug for Source<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.devs.iter().map(|d| d.identity().instance).collect();
        f.debug_struct("Source")
            .field("devices", &ids)
            .field("open", &self.out.is_some())
            .finish()
    }
}

impl<W: Write> Source<W> {
    /// Starts migrating `devs` into `out`: writes the stream header (session id, `epoch`, one
    /// descriptor per device) and puts every device that supports pre-copy into it; the
    /// others keep running until [`complete`](Self::complete).
    pub fn start(devs: Vec<Box<dyn MigrationDevice>>, out: W, epoch: u64) -> Result<Self> {
        Self::start_with(devs, out, epoch, false)
    }

    /// [`start`](Self::start), where `allow_non_p2p_unit` lets several devices of which some
    /// lack the P2P states migrate as one unit. Without P2P a device cannot be quiesced before
    /// its peers stop, so it may still DMA into a peer that is already stopped (QEMU refuses
    /// such a unit; so does [`start`](Self::start)).
    pub fn start_with(
        mut devs: Vec<Box<dyn MigrationDevice>>,
        out: W,
        epoch: u64,
        allow_non_p2p_unit: bool,
    ) -> Result<Self> {
        {
            let refs: Vec<&mut dyn MigrationDevice> = as_refs(&mut devs);
            check_unit(&refs, allow_non_p2p_unit)?;
        }
        if devs.is_empty() || devs.len() > usize::from(u16::MAX) {
            return Err(Error::InvalidInput(format!(
                "a migration of {} devices (1 to {} are possible)",
                devs.len(),
                u16::MAX
            )));
        }
        let header = StreamHeader {
            session_id: new_session_id()?,
            epoch,
            devices: devs
                .iter()
                .map(|d| describe(d.as_ref(), d.capabilities().pre_copy))
                .collect(),
        };
        let out = StreamWriter::new(out, &header)?;
        for i in 0..devs.len() {
            if devs[i].capabilities().pre_copy {
                if let Err(e) = devs[i].start_pre_copy() {
                    return Err(roll_back(&mut devs[..=i], e));
                }
            }
        }
        let n = devs.len();
        Ok(Self {
            devs,
            out: Some(out),
            buf: vec![0u8; BUFFER],
            sent: vec![0; n],
        })
    }

    /// What the devices hold now, without sending anything.
    pub fn estimate(&mut self) -> Result<Estimate> {
        self.check_open()?;
        let r = estimate(&mut self.devs);
        r.map_err(|e| self.fail(e))
    }

    /// Sends one pre-copy round: from each device in pre-copy, the bytes it had pending when
    /// the round began (at least one chunk), through the engine's record pump. A device whose
    /// pre-copy data is exhausted for now sends nothing and may have more later.
    pub fn round(&mut self) -> Result<Round> {
        self.check_open()?;
        let r = self.send_round();
        let sent = r.map_err(|e| self.fail(e))?;
        let estimate = self.estimate()?;
        Ok(Round { sent, estimate })
    }

    /// Refuses to go on with a device that left the saving session this migration put it in
    /// (it ran again): its data so far belongs to a session that no longer exists, and a new
    /// session's data appended to it would not load on any real driver.
    fn check_sessions(&mut self, step: &str) -> Result<()> {
        for dev in self.devs.iter_mut() {
            if dev.capabilities().pre_copy && !dev.is_saving()? {
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

    /// Waits up to `timeout` for pre-copy data, after a [`round`](Self::round) that sent
    /// nothing while the estimate still counts pre-copy bytes (a device answered ENOMSG: "userspace can
    /// wait for more data (which may never come) by using poll", says the uAPI). Polls the
    /// data fds of the devices in pre-copy; `true` when one became readable. Without a data
    /// fd to poll (v1) it sleeps `timeout` and answers `false`. A VMM that paces rounds itself
    /// calls this between empty rounds instead of spinning.
    pub fn wait_for_data(&mut self, timeout: std::time::Duration) -> Result<bool> {
        self.check_open()?;
        let fds: Vec<_> = self.devs.iter().filter_map(|d| d.data_fd()).collect();
        crate::engine::wait::poll_any(&fds, timeout)
    }

    fn send_round(&mut self) -> Result<u64> {
        self.check_sessions("send a pre-copy round")?;
        let out = self.out.as_mut().expect("checked by the caller");
        let mut total = 0;
        for (i, dev) in self.devs.iter_mut().enumerate() {
            if !dev.capabilities().pre_copy {
                continue;
            }
            let budget = dev.pending()?.bytes.max(1);
            let mut pump = Pump {
                dev: &mut **dev,
                out: &mut *out,
                index: i as u16,
                buf: std::mem::take(&mut self.buf),
                obs: &NoObserver,
            };
            let result = pump.run(Phase::PreCopy, Some(budget), self.sent[i]);
            self.buf = pump.buf;
            let (bytes, _, _) = result?;
            self.sent[i] += bytes;
            total += bytes;
        }
        Ok(total)
    }

    /// Completes the migration, with the vCPUs stopped: quiesces every device before any of
    /// them stops (RUNNING_P2P / PRE_COPY_P2P where supported), ends pre-copy, moves each
    /// device to stop-and-copy and sends the rest of its state, ends the stream, and only then
    /// stops the devices (out of the downtime window). Returns the transport; the devices
    /// stay with this value ([`into_devices`](Self::into_devices)), whatever the outcome.
    pub fn complete(&mut self) -> Result<W> {
        self.check_open()?;
        let r = self.send_rest();
        match r {
            Ok(w) => {
                // The state has left: a device whose STOP fails is reset, never run again
                // (finish_handoff), so that the state cannot run twice.
                let mut devs: Vec<&mut dyn MigrationDevice> = as_refs(&mut self.devs);
                let mut reports = vec![SaveReport::default(); devs.len()];
                finish_handoff_all(&mut devs, &mut reports);
                Ok(w)
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    fn send_rest(&mut self) -> Result<W> {
        self.check_sessions("complete the migration")?;
        let mut out = self.out.take().expect("checked by the caller");
        {
            let mut devs: Vec<&mut dyn MigrationDevice> = as_refs(&mut self.devs);
            quiesce_all(&mut devs)?;
        }
        for (i, dev) in self.devs.iter_mut().enumerate() {
            let index = i as u16;
            if dev.capabilities().pre_copy {
                out.end_phase(index, Phase::PreCopy)?;
            }
            dev.start_stop_copy()?;
            let mut pump = Pump {
                dev: &mut **dev,
                out: &mut out,
                index,
                buf: std::mem::take(&mut self.buf),
                obs: &NoObserver,
            };
            let result = pump.run(Phase::StopCopy, None, 0);
            self.buf = pump.buf;
            result?;
            out.end_phase(index, Phase::StopCopy)?;
        }
        Ok(out.finish()?.0)
    }

    /// Abandons the migration, if it is still going: every device returns to RUNNING (or is
    /// reset). Returns the error that says what became of each device.
    pub fn cancel(&mut self) -> Option<Error> {
        self.out.take()?;
        Some(roll_back(
            &mut self.devs,
            Error::InvalidInput("migration cancelled".into()),
        ))
    }

    /// The devices, once the migration completed, failed or was cancelled (or, before that,
    /// with the migration abandoned as by [`cancel`](Self::cancel)).
    pub fn into_devices(mut self) -> Vec<Box<dyn MigrationDevice>> {
        self.cancel();
        std::mem::take(&mut self.devs)
    }

    /// The devices, for anything this type does not cover.
    pub fn devices(&mut self) -> impl Iterator<Item = &mut dyn MigrationDevice> + '_ {
        self.devs
            .iter_mut()
            .map(|d| d.as_mut() as &mut dyn MigrationDevice)
    }

    fn check_open(&self) -> Result<()> {
        if self.out.is_none() {
            return Err(Error::InvalidInput(
                "the migration already completed or failed".into(),
            ));
        }
        Ok(())
    }

    /// Rolls every device back after `e`; the migration cannot go on.
    fn fail(&mut self, e: Error) -> Error {
        self.out = None;
        roll_back(&mut self.devs, e)
    }
}

/// The devices as the engine's functions take them.
fn as_refs(devs: &mut [Box<dyn MigrationDevice>]) -> Vec<&mut dyn MigrationDevice> {
    devs.iter_mut()
        .map(|d| &mut **d as &mut dyn MigrationDevice)
        .collect()
}

fn roll_back(devs: &mut [Box<dyn MigrationDevice>], e: Error) -> Error {
    let mut refs: Vec<&mut dyn MigrationDevice> = as_refs(devs);
    rollback_sources(&mut refs, e, &NoObserver)
}

fn estimate(devs: &mut [Box<dyn MigrationDevice>]) -> Result<Estimate> {
    let mut total = Estimate {
        pending: 0,
        stop_copy: Some(0),
    };
    for dev in devs.iter_mut() {
        if dev.capabilities().pre_copy {
            total.pending = total.pending.saturating_add(dev.pending()?.bytes);
        }
        let stop = dev.stop_copy_estimate()?;
        total.stop_copy = match (total.stop_copy, stop) {
            (Some(a), Some(b)) => Some(a.saturating_add(b)),
            _ => None,
        };
    }
    Ok(total)
}

/// Loads a stream written by [`Source`] into `devs` (in the source's device order) and runs
/// them. Every device enters RESUMING only after the header matched it, and runs only after
/// the whole stream, trailer included, verified; on any failure every device is reset and
/// the error says so, except past the unit's point of no return ([`Error::PastNoReturn`]:
/// the devices that run keep running, those that failed to run were reset).
pub fn resume<R: Read>(devs: &mut [Box<dyn MigrationDevice>], input: R) -> Result<Vec<LoadReport>> {
    let (mut reader, _) = StreamReader::open(input)?;
    let mut refs: Vec<&mut dyn MigrationDevice> = as_refs(devs);
    let header = reader.header().clone();
    if header.devices.len() != refs.len() {
        return Err(Error::stream(
            "stream header",
            format!(
                "the stream holds {} devices, {} were given",
                header.devices.len(),
                refs.len()
            ),
        ));
    }
    // An incompatible stream is refused before any device is touched.
    for (dev, desc) in refs.iter().zip(&header.devices) {
        check_compatible(&**dev, desc)?;
    }
    load_all_gated(&mut refs, &mut reader, &NoObserver, &mut NoGate)
        .map_err(|e| rollback_destinations(&mut refs, e, &NoObserver))
}
