// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's output into the writers the VMM passes per call.
//!
//! The stream writer keeps the stream's state (sequence numbers, totals) for the whole
//! migration, but a VMM passes a different writer to each round (a frame of its own protocol,
//! a buffer with a byte budget). So each channel's stream writer keeps the stream's state and
//! stages only its small pieces (the header, the trailer); every record goes into the
//! caller's writer of its channel as soon as it is encoded, its payload straight from the
//! buffer the device read into: the concatenation of everything the calls wrote to a channel
//! is one stream. A unit's switch-over, a thread per device, hands its records with their
//! buffers to the calling thread ([`UnitSink`]).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

use crate::engine::save::{DeviceRead, RecordSink};
use crate::error::{Error, Result};
use crate::stream::writer::EncodedRecord;
use crate::stream::{Phase, StreamWriter};

use super::channels::{channel_of, in_channel, Outputs};
use super::outgoing::{Outgoing, Pool, UnitRecords};

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
    fn data(&mut self, device: u16, phase: Phase, read: DeviceRead) -> Result<Vec<u8>> {
        let (ch, local) = channel_of(usize::from(device), self.writers.len());
        let count = self.out.count();
        self.written += self.writers[ch]
            .data_to(
                self.out.channel(ch),
                local,
                phase,
                read.data(),
                read.chunk_end,
            )
            .map_err(|e| in_channel(ch, count, e))?;
        Ok(read.buf)
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        let (ch, local) = channel_of(usize::from(device), self.writers.len());
        self.writers[ch].end_phase(local, phase)?;
        self.drain(ch)
    }
}

/// The sink of a unit's device threads. Each record is encoded on its device's thread, under
/// its channel's lock (the header with its CRC32C, and the keyed tag), and sent with the
/// buffer the device read into, in the channel's stream order, to the calling thread, which
/// alone writes into the VMM's writers (so they need not be `Send`): header, payload and tag
/// in one vectored write, as one device alone writes them. The device thread goes on reading
/// into a buffer from the unit's pool, to which every buffer returns once written: no copy
/// and no allocation per record. Once a device failed, records are refused, so the others
/// stop early.
pub(crate) struct UnitSink<'a> {
    writers: Vec<Mutex<&'a mut Staged>>,
    tx: SyncSender<Outgoing>,
    pool: Arc<Pool>,
    failed: AtomicBool,
}

impl<'a> UnitSink<'a> {
    /// A sink encoding with `writers` (one per channel), and its records, each with its
    /// channel.
    pub(crate) fn new(writers: &'a mut [Staged]) -> (Self, UnitRecords) {
        // A few records in flight: the device threads run ahead of the writer by that much.
        let (tx, rx) = sync_channel(4);
        let sink = Self {
            writers: writers.iter_mut().map(Mutex::new).collect(),
            tx,
            pool: Arc::default(),
            failed: AtomicBool::new(false),
        };
        (sink, UnitRecords(rx))
    }

    /// Marks the unit failed.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Encodes a record of `device` with its channel's writer (`encode` gets the writer, the
    /// device's index in its channel and `payload[..len]`) and sends it on with `payload`.
    fn send(
        &self,
        device: u16,
        payload: Vec<u8>,
        len: usize,
        encode: impl FnOnce(&mut Staged, u16, &[u8]) -> Result<EncodedRecord>,
    ) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(Error::SiblingFailed);
        }
        let (channel, local) = channel_of(usize::from(device), self.writers.len());
        let mut writer = self.writers[channel]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (head, tag) = encode(&mut writer, local, &payload[..len])?;
        let record = Outgoing {
            channel,
            head,
            tag,
            payload,
            len,
            pool: self.pool.clone(),
        };
        // Sent under the lock, so a channel's records reach its writer in the order they
        // were encoded (their sequence numbers).
        self.tx
            .send(record)
            .map_err(|_| Error::protocol("switch over", "the stream writer stopped"))
    }
}

impl RecordSink for &UnitSink<'_> {
    fn data(&mut self, device: u16, phase: Phase, read: DeviceRead) -> Result<Vec<u8>> {
        // The CRC32C is computed under the channel's lock, with the sequence number it
        // covers: a CRC computed before and combined with the header's (`crc32c_combine`)
        // cost about as much again per 1 MiB record (zlib's matrix method; 1.8 % of a `multi`
        // profile against 4.2 % for the CRC itself), and the one writing thread, not the CRC,
        // bounds a channel.
        let size = read.buf.len();
        let chunk_end = read.chunk_end;
        self.send(device, read.buf, read.len, |w, local, payload| {
            w.encode_data(local, phase, payload, chunk_end)
        })?;
        Ok(self.pool.take(size))
    }

    fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.send(device, Vec::new(), 0, |w, local, _| {
            w.encode_end_phase(local, phase)
        })
    }
}
