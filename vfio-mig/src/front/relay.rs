// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's output into the writers the VMM passes per call.
//!
//! The stream writer keeps the stream's state (sequence numbers, totals) for the whole
//! migration, but a VMM passes a different writer to each round (a frame of its own protocol,
//! a buffer with a byte budget). So each channel's stream writer writes into a staging buffer,
//! and every record is moved on into the caller's writer of that channel as soon as it is
//! complete: the concatenation of everything the calls wrote to a channel is one stream.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::engine::save::RecordSink;
use crate::error::{Error, Result};
use crate::stream::{Phase, StreamWriter};

use super::channels::{channel_of, in_channel, Outputs};

/// The stream writer of one channel of a migration, staging into memory.
pub(crate) type Staged = StreamWriter<Vec<u8>>;

/// Records of one call, moved on into `out` one by one, each into its device's channel.
pub(crate) struct Relay<'a, O: Outputs + ?Sized> {
    /// One stream writer per channel.
    pub(crate) writers: &'a mut [Staged],
    pub(crate) out: &'a mut O,
    /// Stream bytes written into `out` by this call, over every channel.
    pub(crate) written: u64,
}

impl<'a, O: Outputs + ?Sized> Relay<'a, O> {
    /// Relays `writers`' records into `out`, starting with whatever is staged (the headers,
    /// before the first call). `out` must have one writer per channel.
    pub(crate) fn new(writers: &'a mut [Staged], out: &'a mut O) -> Result<Self> {
        if out.count() != writers.len() {
            return Err(Error::InvalidInput(format!(
                "{} outputs for a migration over {} channels",
                out.count(),
                writers.len()
            )));
        }
        let mut relay = Relay {
            writers,
            out,
            written: 0,
        };
        for ch in 0..relay.writers.len() {
            relay.drain(ch)?;
        }
        Ok(relay)
    }

    /// Moves what is staged on channel `ch` into its writer.
    pub(crate) fn drain(&mut self, ch: usize) -> Result<()> {
        let staged = self.writers[ch].get_mut();
        if staged.is_empty() {
            return Ok(());
        }
        let count = self.out.count();
        self.out.channel(ch).write_all(staged).map_err(|e| {
            in_channel(ch, count, Error::transport("write the migration stream", e))
        })?;
        self.written += staged.len() as u64;
        staged.clear();
        Ok(())
    }
}

impl<O: Outputs + ?Sized> RecordSink for Relay<'_, O> {
    /// The record goes into its channel's writer straight from the device's buffer (nothing
    /// is staged before it: every call drains).
    fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        let (ch, local) = channel_of(usize::from(device), self.writers.len());
        let count = self.out.count();
        self.written += self.writers[ch]
            .data_to(self.out.channel(ch), local, phase, bytes, chunk_end)
            .map_err(|e| in_channel(ch, count, e))?;
        Ok(())
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        let (ch, local) = channel_of(usize::from(device), self.writers.len());
        self.writers[ch].end_phase(local, phase)?;
        self.drain(ch)
    }
}

/// The sink of a unit's device threads: each record is staged whole under its channel's lock
/// and its bytes sent, in the channel's stream order, to the calling thread, which alone
/// writes into the VMM's writers (so they need not be `Send`). Once a device failed, records
/// are refused, so the others stop early.
pub(crate) struct UnitSink<'a> {
    writers: Vec<Mutex<&'a mut Staged>>,
    tx: SyncSender<(usize, Vec<u8>)>,
    failed: AtomicBool,
}

impl<'a> UnitSink<'a> {
    /// A sink staging into `writers` (one per channel), and the receiver of its bytes, each
    /// with its channel.
    pub(crate) fn new(writers: &'a mut [Staged]) -> (Self, Receiver<(usize, Vec<u8>)>) {
        // A few records in flight: the device threads run ahead of the writer by that much.
        let (tx, rx) = sync_channel(4);
        let sink = Self {
            writers: writers.iter_mut().map(Mutex::new).collect(),
            tx,
            failed: AtomicBool::new(false),
        };
        (sink, rx)
    }

    /// Marks the unit failed.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    fn with(&self, device: u16, f: impl FnOnce(&mut Staged, u16) -> Result<()>) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::SiblingFailed);
        }
        let (ch, local) = channel_of(usize::from(device), self.writers.len());
        let mut writer = self.writers[ch].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut writer, local)?;
        let bytes = std::mem::take(writer.get_mut());
        // Sent under the lock, so a channel's records reach its writer in the order they
        // were staged.
        self.tx
            .send((ch, bytes))
            .map_err(|_| Error::protocol("switch over", "the stream writer stopped"))
    }
}

impl RecordSink for &UnitSink<'_> {
    fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        self.with(device, |w, local| w.data(local, phase, bytes, chunk_end))
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.with(device, |w, local| w.end_phase(local, phase))
    }
}
