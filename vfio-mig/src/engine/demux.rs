// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of several devices: one reader, one loader thread per device.
//!
//! The stream interleaves the devices' records; each device must receive its own in stream
//! order, and devices load in parallel. The reader hands every verified record to its
//! device's thread over a bounded channel (back-pressure: memory stays bounded by a few
//! records per device). The record is not copied: the reader's buffer itself moves to the
//! device thread ([`StreamReader::swap_buffer`]), which sends it back for reuse once the
//! device took the bytes. A single device is loaded inline, without threads or copies.

use std::io::Read;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};

use crate::error::{Error, Result};
use crate::stream::{Phase, Record, StreamReader};

use super::events::Observer;
use super::gate::LoadGate;
use super::loader::{check_compatible, DeviceLoader, LoadReport};
use super::parallel::each;
use super::run::run_unit;
use super::MigrationDevice;

/// Records in flight per device.
const QUEUE_DEPTH: usize = 4;

/// What the reader hands a device's thread.
enum Item {
    Data {
        phase: Phase,
        /// The reader's record buffer: the payload is its first `len` bytes.
        buf: Vec<u8>,
        len: usize,
        chunk_end: bool,
    },
    EndOfPhase(Phase),
}

/// Loads every device of the stream (device `i` of the header into `devs[i]`): checks them all
/// against the header before touching any, enters RESUMING on all, applies the records, calls
/// `gate.pre_copy_loaded` once every live device has loaded its pre-copy data; after the
/// trailer has every device take its state ([`MigrationDevice::load_state`]), calls
/// `gate.before_resume`, and runs the unit (`run_unit`: RUNNING_P2P on all, then RUNNING).
/// The caller resets them on failure ([`super::multi::rollback_destinations`]), except past
/// the point of no return ([`Error::PastNoReturn`]: what runs keeps running).
pub(crate) fn load_all_gated<R: Read>(
    devs: &mut [&mut dyn MigrationDevice],
    reader: &mut StreamReader<R>,
    obs: &dyn Observer,
    gate: &mut dyn LoadGate,
) -> Result<Vec<LoadReport>> {
    let header = reader.header().clone();
    if header.devices.len() != devs.len() {
        return Err(Error::stream(
            "check stream compatibility",
            format!(
                "the stream carries {} devices, {} destination devices were given",
                header.devices.len(),
                devs.len()
            ),
        ));
    }
    for (dev, desc) in devs.iter().zip(&header.devices) {
        check_compatible(&**dev, desc)?;
    }
    for dev in devs.iter_mut() {
        dev.start_resume()?;
    }
    let live = header.devices.iter().filter(|d| d.live).count();
    let reports = if devs.len() == 1 {
        load_inline(&mut *devs[0], reader, obs, gate, live)?
    } else {
        load_threaded(devs, reader, obs, gate, live)?
    };
    // The destination barrier: every device takes its state (and may refuse it) before the
    // source is told LOADED; then every device reaches RUNNING_P2P before any runs, so no
    // device runs (and initiates DMA) while a peer is unloaded or stopped.
    // Each step runs on every device in parallel (one state-change latency, not the sum)
    // and ends on all before the next begins.
    each(devs, "load the unit's state", |d| d.load_state())?;
    gate.before_resume(reader.get_mut())?;
    reader.finish()?;
    run_unit(devs)?;
    Ok(reports)
}

fn load_inline<R: Read>(
    dev: &mut dyn MigrationDevice,
    reader: &mut StreamReader<R>,
    obs: &dyn Observer,
    gate: &mut dyn LoadGate,
    live: usize,
) -> Result<Vec<LoadReport>> {
    let mut loader = DeviceLoader::new(0, obs);
    let mut pre_copy_ended = 0usize;
    loop {
        match reader.next_record()? {
            Record::Data {
                phase,
                bytes,
                chunk_end,
                ..
            } => loader.data(dev, phase, bytes, chunk_end)?,
            Record::EndOfPhase { phase, .. } => {
                loader.end_phase(phase);
                if phase == Phase::PreCopy && live > 0 {
                    pre_copy_ended += 1;
                    // The first end is the switchover-ack; a later one ends a pre-copy the
                    // source reopened with new initial data (REINIT).
                    if pre_copy_ended == 1 {
                        gate.pre_copy_loaded()?;
                    } else {
                        gate.pre_copy_reloaded()?;
                    }
                }
            }
            Record::End(_) => return Ok(vec![loader.report()]),
        }
    }
}

/// What a device's thread tells the reader.
enum Ack {
    /// Everything up to the end of this phase is in the device.
    PhaseLoaded(Phase),
    /// The device failed (its thread returns the error).
    Failed,
}

/// One device's thread: applies its records, acknowledges each end of phase once everything
/// before it is in the device, and says so when it fails, so the reader never waits on it.
fn device_thread(
    index: u16,
    dev: &mut dyn MigrationDevice,
    items: Receiver<Item>,
    acks: Sender<Ack>,
    recycle: Sender<Vec<u8>>,
    obs: &dyn Observer,
) -> Result<LoadReport> {
    let mut loader = DeviceLoader::new(index, obs);
    for item in items {
        let applied = match item {
            Item::Data {
                phase,
                buf,
                len,
                chunk_end,
            } => {
                let r = loader.data(dev, phase, &buf[..len], chunk_end);
                // The reader may be gone (it failed): the buffer is then simply freed.
                let _ = recycle.send(buf);
                r
            }
            Item::EndOfPhase(phase) => {
                loader.end_phase(phase);
                // The reader may be gone already (it failed): nothing to acknowledge then.
                let _ = acks.send(Ack::PhaseLoaded(phase));
                Ok(())
            }
        };
        if let Err(e) = applied {
            let _ = acks.send(Ack::Failed);
            return Err(e);
        }
    }
    Ok(loader.report())
}

fn load_threaded<R: Read>(
    devs: &mut [&mut dyn MigrationDevice],
    reader: &mut StreamReader<R>,
    obs: &dyn Observer,
    gate: &mut dyn LoadGate,
    live: usize,
) -> Result<Vec<LoadReport>> {
    std::thread::scope(|s| {
        let (ack_tx, ack_rx) = channel::<Ack>();
        // Buffers coming back from the device threads. Unbounded, but never holding more
        // than the buffers in flight: at most QUEUE_DEPTH + 1 per device, plus the reader's.
        let (recycle_tx, recycle_rx) = channel::<Vec<u8>>();
        let mut senders = Vec::with_capacity(devs.len());
        let mut threads = Vec::with_capacity(devs.len());
        for (i, dev) in devs.iter_mut().enumerate() {
            let (tx, rx) = sync_channel::<Item>(QUEUE_DEPTH);
            let acks = ack_tx.clone();
            let recycle = recycle_tx.clone();
            senders.push(tx);
            threads
                .push(s.spawn(move || device_thread(i as u16, &mut **dev, rx, acks, recycle, obs)));
        }
        drop(ack_tx);
        drop(recycle_tx);
        let read = read_and_dispatch(reader, &senders, &ack_rx, &recycle_rx, gate, live);
        // Closing the queues ends the threads (after their last record on success).
        drop(senders);
        let results: Vec<Result<LoadReport>> = threads
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::protocol("load", "a device thread panicked")))
            })
            .collect();
        // A device's own failure explains a reader that found its queue closed.
        let mut reports = Vec::with_capacity(results.len());
        let mut device_error = None;
        for r in results {
            match r {
                Ok(report) => reports.push(report),
                Err(e) => {
                    device_error.get_or_insert(e);
                }
            }
        }
        match (read, device_error) {
            (_, Some(e)) => Err(e),
            (Err(e), None) => Err(e),
            (Ok(()), None) => Ok(reports),
        }
    })
}

/// The reader's loop: every record to its device's queue; after every live device's
/// END_OF_PHASE(PRE_COPY) has been applied, the switchover gate.
fn read_and_dispatch<R: Read>(
    reader: &mut StreamReader<R>,
    senders: &[std::sync::mpsc::SyncSender<Item>],
    acks: &Receiver<Ack>,
    recycled: &Receiver<Vec<u8>>,
    gate: &mut dyn LoadGate,
    live: usize,
) -> Result<()> {
    let mut pre_copy_ended = 0usize;
    let closed = |device: u16| {
        Error::protocol(
            "load",
            format!("device {device} stopped loading (its error follows)"),
        )
    };
    loop {
        match reader.next_record()? {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                let len = bytes.len();
                // A buffer a device thread is done with (none yet while the pipeline
                // fills: the reader then grows an empty one for the next record).
                let spare = recycled.try_recv().unwrap_or_default();
                let item = Item::Data {
                    phase,
                    buf: reader.swap_buffer(spare),
                    len,
                    chunk_end,
                };
                senders[device as usize]
                    .send(item)
                    .map_err(|_| closed(device))?;
            }
            Record::EndOfPhase { device, phase } => {
                senders[device as usize]
                    .send(Item::EndOfPhase(phase))
                    .map_err(|_| closed(device))?;
                if phase == Phase::PreCopy {
                    pre_copy_ended += 1;
                    if pre_copy_ended == live {
                        wait_for_pre_copy(acks, live)?;
                        gate.pre_copy_loaded()?;
                    } else if pre_copy_ended > live {
                        // A pre-copy the source reopened (REINIT) ended again.
                        wait_for_pre_copy(acks, 1)?;
                        gate.pre_copy_reloaded()?;
                    }
                }
            }
            Record::End(_) => return Ok(()),
        }
    }
}

/// Waits until `live` devices have applied all of their pre-copy data.
fn wait_for_pre_copy(acks: &Receiver<Ack>, live: usize) -> Result<()> {
    let mut loaded = 0;
    while loaded < live {
        match acks.recv() {
            Ok(Ack::PhaseLoaded(Phase::PreCopy)) => loaded += 1,
            Ok(Ack::PhaseLoaded(_)) => {}
            Ok(Ack::Failed) | Err(_) => {
                return Err(Error::protocol(
                    "load",
                    "a device stopped loading before its pre-copy data was in",
                ))
            }
        }
    }
    Ok(())
}
