// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's output into any `Write` the VMM passes per call.
//!
//! The stream writer keeps the stream's state (sequence numbers, totals) for the whole
//! migration, but a VMM passes a different writer to each round (a frame of its own protocol,
//! a buffer with a byte budget). So the stream writer writes into a staging buffer, and every
//! record is moved on into the caller's writer as soon as it is complete: the concatenation of
//! everything the calls wrote is one stream.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use crate::engine::save::RecordSink;
use crate::error::{Error, Result};
use crate::stream::{Phase, StreamWriter};

/// The stream writer of a migration, staging into memory.
pub(crate) type Staged = StreamWriter<Vec<u8>>;

/// Records of one call, moved on into `out` one by one.
pub(crate) struct Relay<'a, W: Write + ?Sized> {
    pub(crate) writer: &'a mut Staged,
    pub(crate) out: &'a mut W,
    /// Stream bytes written into `out` by this call.
    pub(crate) written: u64,
}

impl<'a, W: Write + ?Sized> Relay<'a, W> {
    /// Relays `writer`'s records into `out`, starting with whatever is staged (the header,
    /// before the first call).
    pub(crate) fn new(writer: &'a mut Staged, out: &'a mut W) -> Result<Self> {
        let mut relay = Relay {
            writer,
            out,
            written: 0,
        };
        relay.drain()?;
        Ok(relay)
    }

    /// Moves what is staged into `out`.
    pub(crate) fn drain(&mut self) -> Result<()> {
        let staged = self.writer.get_mut();
        if staged.is_empty() {
            return Ok(());
        }
        self.out
            .write_all(staged)
            .map_err(|e| Error::transport("write the migration stream", e))?;
        self.written += staged.len() as u64;
        staged.clear();
        Ok(())
    }
}

impl<W: Write + ?Sized> RecordSink for Relay<'_, W> {
    /// The record goes into `out` straight from the device's buffer (nothing is staged
    /// before it: every call drains).
    fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        self.written += self
            .writer
            .data_to(&mut *self.out, device, phase, bytes, chunk_end)?;
        Ok(())
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.writer.end_phase(device, phase)?;
        self.drain()
    }
}

/// The sink of a unit's device threads: each record is staged whole under the lock and its
/// bytes sent, in stream order, to the calling thread, which alone writes into the VMM's
/// writer (so that writer need not be `Send`). Once a device failed, records are refused, so
/// the others stop early.
pub(crate) struct UnitSink<'a> {
    writer: Mutex<&'a mut Staged>,
    tx: SyncSender<Vec<u8>>,
    failed: AtomicBool,
}

impl<'a> UnitSink<'a> {
    /// A sink staging into `writer`, and the receiver of its bytes.
    pub(crate) fn new(writer: &'a mut Staged) -> (Self, Receiver<Vec<u8>>) {
        // A few records in flight: the device threads run ahead of the writer by that much.
        let (tx, rx) = sync_channel(4);
        let sink = Self {
            writer: Mutex::new(writer),
            tx,
            failed: AtomicBool::new(false),
        };
        (sink, rx)
    }

    /// Marks the unit failed.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    fn with(&self, f: impl FnOnce(&mut Staged) -> Result<()>) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::SiblingFailed);
        }
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut writer)?;
        let bytes = std::mem::take(writer.get_mut());
        // Sent under the lock, so records reach the writer in the order they were staged.
        self.tx
            .send(bytes)
            .map_err(|_| Error::protocol("switch over", "the stream writer stopped"))
    }
}

impl RecordSink for &UnitSink<'_> {
    fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        self.with(|w| w.data(device, phase, bytes, chunk_end))
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.with(|w| w.end_phase(device, phase))
    }
}
