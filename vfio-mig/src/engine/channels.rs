// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A unit's records over several channels (connections): which device goes on which
//! channel, the source's parallel save into one stream writer per channel, and the
//! destination's load with one reader thread per channel feeding one thread per device.
//!
//! Device `i` of a unit of `n` channels travels on channel `i mod n`, as device `i div n` of
//! that channel's stream (its "sub-stream": an ordinary stream whose header carries the
//! unit's session id and epoch and the descriptors of the channel's devices, in unit order).
//! A device's records therefore all travel on one connection, in order; devices share a
//! channel when there are more devices than channels and own one otherwise. Any channel
//! failing fails the unit: the source stops every device at its next record, the destination
//! stops every channel's reads, and the caller rolls back every device.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};

use crate::error::{Error, Result};
use crate::stream::{Phase, Record, StreamHeader, StreamReader};

use super::events::Observer;
use super::gate::LoadGate;
use super::loader::{check_compatible, DeviceLoader, LoadReport};
use super::multi::{each_with_report, quiesce_all, SharedWriter};
use super::run::run_unit;
use super::save::{pre_copy, resend_reinit, stop_copy, RecordSink, SaveOptions, SaveReport};
use super::MigrationDevice;

/// Records in flight per device on the destination.
const QUEUE_DEPTH: usize = 4;

/// The channel of unit device `device` among `count` channels, and its index there.
pub(crate) fn channel_of(device: usize, count: usize) -> (usize, u16) {
    let count = count.max(1);
    (device % count, (device / count) as u16)
}

/// The unit devices channel `channel` of `count` carries, in order.
pub(crate) fn devices_of(unit_devices: usize, channel: usize, count: usize) -> Vec<usize> {
    (channel..unit_devices).step_by(count.max(1)).collect()
}

/// The header of channel `channel`'s sub-stream: the unit's session id and epoch, the
/// descriptors of the channel's devices.
pub fn channel_header(unit: &StreamHeader, channel: usize, count: usize) -> StreamHeader {
    StreamHeader {
        session_id: unit.session_id,
        epoch: unit.epoch,
        devices: devices_of(unit.devices.len(), channel, count)
            .into_iter()
            .map(|i| unit.devices[i].clone())
            .collect(),
    }
}

/// One device's view of the channels: its records go to its channel's writer, under its
/// index there. Events keep the unit index.
struct ChannelSink<'a, W: Write> {
    writer: &'a SharedWriter<W>,
    local: u16,
}

impl<W: Write> RecordSink for ChannelSink<'_, W> {
    fn data(&mut self, _device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        let mut w = self.writer;
        w.data(self.local, phase, bytes, chunk_end)
    }

    fn end_phase(&mut self, _device: u16, phase: Phase) -> Result<()> {
        let mut w = self.writer;
        w.end_phase(self.local, phase)
    }
}

/// Runs `phase` on every device in parallel, device `i` writing to its channel's writer;
/// the first device to fail marks every channel failed (the others stop at their next
/// record). Returns the first real failure.
fn on_channels<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    writers: &[SharedWriter<W>],
    reports: &mut [SaveReport],
    phase: impl Fn(&mut dyn MigrationDevice, &mut dyn RecordSink, u16, &mut SaveReport) -> Result<()>
        + Sync,
) -> Result<()> {
    each_with_report(devs, reports, |i, dev, report| {
        let (ch, local) = channel_of(i, writers.len());
        let mut sink = ChannelSink {
            writer: &writers[ch],
            local,
        };
        let r = phase(dev, &mut sink, i as u16, report);
        if r.is_err() {
            writers.iter().for_each(SharedWriter::fail);
        }
        r
    })
}

/// Pre-copy on every device in parallel over the channels (one writer per channel, in
/// channel order).
pub fn pre_copy_channels<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    writers: &[SharedWriter<W>],
    opts: &SaveOptions,
    obs: &dyn Observer,
    reports: &mut [SaveReport],
) -> Result<()> {
    on_channels(devs, writers, reports, |dev, sink, i, report| {
        pre_copy(dev, sink, i, opts, obs, report)
    })
}

/// `resend_reinit` on every device in parallel over the channels: returns how many devices
/// reopened their pre-copy with new initial data.
pub fn resend_reinit_channels<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    writers: &[SharedWriter<W>],
    opts: &SaveOptions,
    obs: &dyn Observer,
    reports: &mut [SaveReport],
) -> Result<usize> {
    let reopened = AtomicUsize::new(0);
    on_channels(devs, writers, reports, |dev, sink, i, report| {
        if resend_reinit(dev, sink, i, opts, obs, report)? {
            reopened.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })?;
    Ok(reopened.into_inner())
}

/// Quiesces every device, then stop-and-copy on every device in parallel over the channels.
pub fn stop_copy_channels<W: Write + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    writers: &[SharedWriter<W>],
    opts: &SaveOptions,
    obs: &dyn Observer,
    reports: &mut [SaveReport],
) -> Result<()> {
    quiesce_all(devs)?;
    on_channels(devs, writers, reports, |dev, sink, i, report| {
        stop_copy(dev, sink, i, opts, obs, report)
    })
}

/// What a channel's reader hands a device's thread.
enum Item {
    Data {
        phase: Phase,
        bytes: Vec<u8>,
        chunk_end: bool,
    },
    EndOfPhase(Phase),
}

/// What the threads tell the coordinating thread.
enum Note<R: Read> {
    /// A device applied everything up to the end of this phase.
    PhaseLoaded(Phase),
    /// A device failed (its thread returns the error).
    DeviceFailed,
    /// A channel's reader ended: its reader after the trailer, or its error.
    ChannelEnded(usize, Result<StreamReader<R>>),
}

fn device_thread<R: Read>(
    index: u16,
    dev: &mut dyn MigrationDevice,
    items: Receiver<Item>,
    notes: Sender<Note<R>>,
    obs: &dyn Observer,
) -> Result<LoadReport> {
    let mut loader = DeviceLoader::new(index, obs);
    for item in items {
        let applied = match item {
            Item::Data {
                phase,
                bytes,
                chunk_end,
            } => loader.data(dev, phase, &bytes, chunk_end),
            Item::EndOfPhase(phase) => {
                loader.end_phase(phase);
                let _ = notes.send(Note::PhaseLoaded(phase));
                Ok(())
            }
        };
        if let Err(e) = applied {
            let _ = notes.send(Note::DeviceFailed);
            return Err(e);
        }
    }
    Ok(loader.report())
}

/// Reads channel `ch`'s sub-stream: its header must be `expected`; every record goes to its
/// device's queue (`queues[local]`).
fn read_channel<R: Read>(
    ch: usize,
    conn: R,
    expected: &StreamHeader,
    queues: Vec<SyncSender<Item>>,
    units: &[usize],
) -> Result<StreamReader<R>> {
    let step = format!("read channel {ch}");
    let (mut reader, header) = StreamReader::open(conn).map_err(|e| in_channel(ch, e))?;
    if header != *expected {
        return Err(Error::stream(
            step,
            format!(
                "the sub-stream header (session {:02x?}, epoch {}, {} devices) is not the one \
                 this channel was given in the handshake",
                header.session_id,
                header.epoch,
                header.devices.len()
            ),
        ));
    }
    let closed = |local: u16| {
        Error::protocol(
            format!("read channel {ch}"),
            format!(
                "device {} stopped loading (its error follows)",
                units[local as usize]
            ),
        )
    };
    loop {
        match reader.next_record().map_err(|e| in_channel(ch, e))? {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                let item = Item::Data {
                    phase,
                    bytes: bytes.to_vec(),
                    chunk_end,
                };
                queues[device as usize]
                    .send(item)
                    .map_err(|_| closed(device))?;
            }
            Record::EndOfPhase { device, phase } => queues[device as usize]
                .send(Item::EndOfPhase(phase))
                .map_err(|_| closed(device))?,
            Record::End(_) => return Ok(reader),
        }
    }
}

/// Names the channel in a stream or transport error of its reader.
fn in_channel(ch: usize, e: Error) -> Error {
    match e {
        Error::Stream { step, detail } => Error::Stream {
            step: format!("channel {ch}: {step}"),
            detail,
        },
        Error::Transport { step, source } => Error::Transport {
            step: format!("channel {ch}: {step}"),
            source,
        },
        e => e,
    }
}

/// Loads a unit received over `channels` (channel `c`'s connection at `channels[c]`,
/// positioned at its sub-stream), as `load_all_gated` does for one stream:
/// checks every device against `unit`, enters RESUMING on all, loads every channel in
/// parallel, calls `gate.pre_copy_loaded` once every live device loaded its pre-copy data,
/// and after every channel's trailer has every device take its state, calls
/// `gate.before_resume` with channel 0 (the main connection), checks every channel's end,
/// and runs the unit (`run_unit`: RUNNING_P2P on all before any RUNNING).
///
/// A failing channel or device calls `stop` (which must make every channel's pending reads
/// return, e.g. by shutting the connections down for reading) and fails the load; the caller
/// resets the devices ([`super::multi::rollback_destinations`]).
pub fn load_channels_gated<R: Read + Send>(
    devs: &mut [&mut dyn MigrationDevice],
    unit: &StreamHeader,
    channels: Vec<R>,
    stop: &(dyn Fn() + Sync),
    obs: &dyn Observer,
    gate: &mut dyn LoadGate,
) -> Result<Vec<LoadReport>> {
    if unit.devices.len() != devs.len() || channels.is_empty() {
        return Err(Error::stream(
            "check stream compatibility",
            format!(
                "the stream carries {} devices, {} destination devices were given",
                unit.devices.len(),
                devs.len()
            ),
        ));
    }
    for (dev, desc) in devs.iter().zip(&unit.devices) {
        check_compatible(&**dev, desc)?;
    }
    for dev in devs.iter_mut() {
        dev.start_resume()?;
    }
    let count = channels.len();
    let live = unit.devices.iter().filter(|d| d.live).count();
    let (reports, mut readers) = std::thread::scope(|s| {
        let (note_tx, note_rx) = channel::<Note<R>>();
        let mut queues: Vec<Option<SyncSender<Item>>> = Vec::with_capacity(devs.len());
        let mut devices = Vec::with_capacity(devs.len());
        for (i, dev) in devs.iter_mut().enumerate() {
            let (tx, rx) = sync_channel::<Item>(QUEUE_DEPTH);
            let notes = note_tx.clone();
            queues.push(Some(tx));
            devices.push(s.spawn(move || device_thread(i as u16, &mut **dev, rx, notes, obs)));
        }
        for (ch, conn) in channels.into_iter().enumerate() {
            let units = devices_of(unit.devices.len(), ch, count);
            let mine: Vec<SyncSender<Item>> =
                units.iter().filter_map(|&i| queues[i].take()).collect();
            let expected = channel_header(unit, ch, count);
            let notes = note_tx.clone();
            s.spawn(move || {
                let r = read_channel(ch, conn, &expected, mine, &units);
                let _ = notes.send(Note::ChannelEnded(ch, r));
            });
        }
        drop(note_tx);
        let coordinated = coordinate(&note_rx, count, live, stop, gate);
        let results: Vec<Result<LoadReport>> = devices
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err(Error::protocol("load", "a device thread panicked")))
            })
            .collect();
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
        // A device's own failure explains a reader that found its queue closed.
        match (coordinated, device_error) {
            (_, Some(e)) | (Err(e), None) => Err(e),
            (Ok(readers), None) => Ok((reports, readers)),
        }
    })?;
    for dev in devs.iter_mut() {
        dev.load_state()?;
    }
    gate.before_resume(readers[0].get_mut())?;
    for (ch, r) in readers.iter_mut().enumerate() {
        r.finish().map_err(|e| in_channel(ch, e))?;
    }
    run_unit(devs)?;
    Ok(reports)
}

/// The coordinating thread: counts the pre-copy acknowledgements (then the switchover
/// gate) and the channels' ends; stops every channel at the first failure. Returns the
/// readers in channel order once every channel read its trailer.
fn coordinate<R: Read>(
    notes: &Receiver<Note<R>>,
    count: usize,
    live: usize,
    stop: &(dyn Fn() + Sync),
    gate: &mut dyn LoadGate,
) -> Result<Vec<StreamReader<R>>> {
    let mut readers: Vec<Option<StreamReader<R>>> = (0..count).map(|_| None).collect();
    let mut ended = 0;
    let mut pre_copy_loaded = 0;
    let mut failure = None;
    while ended < count {
        let Ok(note) = notes.recv() else { break };
        match note {
            Note::PhaseLoaded(Phase::PreCopy) if failure.is_none() => {
                pre_copy_loaded += 1;
                // The first time every live device loaded its pre-copy is the
                // switchover-ack; each later end is a pre-copy the source reopened (REINIT).
                let gated = match pre_copy_loaded.cmp(&live) {
                    std::cmp::Ordering::Less => Ok(()),
                    std::cmp::Ordering::Equal => gate.pre_copy_loaded(),
                    std::cmp::Ordering::Greater => gate.pre_copy_reloaded(),
                };
                if let Err(e) = gated {
                    stop();
                    failure = Some(e);
                }
            }
            Note::PhaseLoaded(_) => {}
            Note::DeviceFailed => {
                if failure.is_none() {
                    stop();
                    failure = Some(Error::protocol("load", "a device stopped loading"));
                }
            }
            Note::ChannelEnded(ch, r) => {
                ended += 1;
                match r {
                    Ok(reader) => readers[ch] = Some(reader),
                    Err(e) => {
                        if failure.is_none() {
                            stop();
                            failure = Some(e);
                        }
                    }
                }
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if pre_copy_loaded < live {
        return Err(Error::protocol(
            "load",
            "the channels ended before every live device's pre-copy data was in",
        ));
    }
    readers
        .into_iter()
        .map(|r| r.ok_or_else(|| Error::protocol("load", "a channel reader ended unseen")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_share_or_own_channels() {
        assert_eq!(devices_of(4, 0, 2), [0, 2]);
        assert_eq!(devices_of(4, 1, 2), [1, 3]);
        assert_eq!(devices_of(4, 3, 4), [3]);
        assert_eq!(channel_of(3, 2), (1, 1));
        assert_eq!(channel_of(2, 4), (2, 0));
        assert_eq!(channel_of(5, 1), (0, 5));
    }
}
