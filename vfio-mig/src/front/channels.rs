// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Several channels (connections) of one migration: which device travels on which channel,
//! and the outputs a source writes a call's records into.
//!
//! Device `i` of a unit sent over `n` channels travels on channel `i mod n`, as device
//! `i div n` of that channel's stream (its "sub-stream": an ordinary stream whose header
//! carries the unit's session id and epoch and the descriptors of the channel's devices, in
//! unit order; docs/stream-format.md, "Several channels"). A device's records therefore all
//! travel on one connection, in order; devices share a channel when there are more devices
//! than channels and own one otherwise.

use std::io::Write;
use std::sync::mpsc::sync_channel;

use crate::error::{Error, Result};
use crate::stream::StreamHeader;

use super::outgoing::{Outgoing, UnitRecords};

/// Where a source's call writes its records: one writer (any `Write`, one channel), or one
/// writer per channel ([`Channels`]).
pub trait Outputs {
    /// The writer of one channel.
    type Channel: Write + ?Sized;
    /// How many channels there are.
    fn count(&self) -> usize;
    /// The writer of channel `ch` (below [`count`](Self::count)).
    fn channel(&mut self, ch: usize) -> &mut Self::Channel;

    /// Writes the records a switch-over's device threads produce (each with its channel),
    /// every channel's in the order they come, until `records` ends or a write fails: each
    /// record's header, payload and tag in one vectored write, the payload from the buffer
    /// its device read into. One writer takes them in turn on the calling thread;
    /// [`Channels`] writes each channel on a thread of its own, so the channels move in
    /// parallel.
    fn write_records(&mut self, records: UnitRecords) -> Result<()> {
        let count = self.count();
        for record in records.0 {
            let ch = record.channel;
            record
                .write_to(self.channel(ch))
                .map_err(|e| write_failed(ch, count, e))?;
        }
        Ok(())
    }
}

impl<W: Write + ?Sized> Outputs for W {
    type Channel = W;

    fn count(&self) -> usize {
        1
    }

    fn channel(&mut self, _ch: usize) -> &mut W {
        self
    }
}

/// One writer per channel, in channel order (channel 0 first), for a source whose devices
/// travel over several channels ([`crate::Source::set_channels`]). The switch-over writes
/// each channel on a thread of its own, so the writers must be `Send`.
#[derive(Debug)]
pub struct Channels<'a, W>(pub &'a mut [W]);

impl<W: Write + Send> Outputs for Channels<'_, W> {
    type Channel = W;

    fn count(&self) -> usize {
        self.0.len()
    }

    fn channel(&mut self, ch: usize) -> &mut W {
        &mut self.0[ch]
    }

    fn write_records(&mut self, records: UnitRecords) -> Result<()> {
        let count = self.0.len();
        std::thread::scope(|s| {
            let mut queues = Vec::with_capacity(count);
            let mut writers = Vec::with_capacity(count);
            for (ch, out) in self.0.iter_mut().enumerate() {
                // A few records in flight per channel, as for the device threads.
                let (tx, rx) = sync_channel::<Outgoing>(4);
                queues.push(tx);
                writers.push(s.spawn(move || -> Result<()> {
                    for record in rx {
                        record
                            .write_to(out)
                            .map_err(|e| write_failed(ch, count, e))?;
                    }
                    Ok(())
                }));
            }
            for record in records.0 {
                // A channel whose writer failed takes no more: the unit stops (the dropped
                // `records` stops the device threads at their next record).
                if queues[record.channel].send(record).is_err() {
                    break;
                }
            }
            drop(queues);
            writers
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(Error::protocol(
                            "switch over",
                            "a channel's writer panicked",
                        ))
                    })
                })
                .collect::<Result<Vec<()>>>()
                .map(|_| ())
        })
    }
}

/// The error of a failed write of channel `ch`.
fn write_failed(ch: usize, count: usize, e: std::io::Error) -> Error {
    in_channel(ch, count, Error::transport("write the migration stream", e))
}

/// Flushes every channel of `out`.
pub(crate) fn flush_all<O: Outputs + ?Sized>(out: &mut O) -> Result<()> {
    for ch in 0..out.count() {
        out.channel(ch)
            .flush()
            .map_err(|e| Error::transport(in_channel_step(ch, out.count(), "flush"), e))?;
    }
    Ok(())
}

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
pub(crate) fn channel_header(unit: &StreamHeader, channel: usize, count: usize) -> StreamHeader {
    StreamHeader {
        session_id: unit.session_id,
        epoch: unit.epoch,
        devices: devices_of(unit.devices.len(), channel, count)
            .into_iter()
            .map(|i| unit.devices[i].clone())
            .collect(),
    }
}

/// Checks a channel count for a unit of `devices`: 1 to one channel per device.
pub(crate) fn check_count(count: usize, devices: usize) -> Result<()> {
    if count == 0 || count > devices {
        return Err(Error::InvalidInput(format!(
            "{count} channels for {devices} devices (1 to {devices} are possible: each channel \
             carries at least one device)"
        )));
    }
    Ok(())
}

/// `step`, naming channel `ch` when there are several.
pub(crate) fn in_channel_step(ch: usize, count: usize, step: &str) -> String {
    if count > 1 {
        format!("channel {ch}: {step}")
    } else {
        step.to_string()
    }
}

/// Names channel `ch` in a stream or transport error, when there are several.
pub(crate) fn in_channel(ch: usize, count: usize, e: Error) -> Error {
    if count <= 1 {
        return e;
    }
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
