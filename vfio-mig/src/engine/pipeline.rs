// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pipelined pump: the device is read on a thread of its own while the calling thread
//! checksums (CRC32C, and the HMAC of a keyed stream), encrypts (TLS) and writes the records.
//!
//! Why: inline, every byte costs the device read, then the CRC and the write, one after the
//! other on one thread; with a spare core the device can be read while the previous buffer
//! is checksummed and sent, so a device-bound save runs at the device's rate and a CPU-bound
//! one at the rate of its slower half.
//!
//! The two threads share a bounded ring of reusable buffers (two bounded channels: filled
//! buffers towards the writer, empty ones back towards the reader). Nothing is allocated per
//! record, memory is bounded by the ring (`depth` buffers), and the reader waits for an empty
//! buffer when the writer falls behind (back-pressure). Records leave in the order the device
//! produced them, through the same [`RecordSink`] calls as the inline pump: the stream's bytes
//! are identical. An error on either side stops both: a device error is handed to the writer
//! in order and returned; a write error makes the writer drop the ring, so the reader stops
//! after the read it is in.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

use crate::error::{Error, Result};
use crate::stream::Phase;

use super::events::Observer;
use super::save::{DeviceRead, Pump, RecordSink, Tally};
use super::{MigrationDevice, ReadOutcome};

/// Buffers of a phase sent inline before the reader thread starts.
const INLINE_BUFFERS: u64 = 2;

/// What the reader hands the writer, in device order.
enum Filled {
    /// `buf[..len]` holds device data.
    Data {
        buf: Vec<u8>,
        len: usize,
        chunk_end: bool,
    },
    /// The reader stopped reading: `true` when the device ended the phase, `false` when the
    /// budget was reached at a chunk boundary.
    Done(bool),
    /// The device read failed.
    Failed(Error),
}

impl<S: RecordSink + ?Sized> Pump<'_, S> {
    /// [`Pump::run`] with the device read on a thread of its own, through a ring of
    /// `spare.len() + 1` buffers (this pump's own and the spares, all returned on exit), once
    /// the phase has sent [`INLINE_BUFFERS`] buffers inline. Without spares it is the inline
    /// pump.
    pub(crate) fn run_pipelined(
        &mut self,
        phase: Phase,
        budget: Option<u64>,
        base: u64,
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<(u64, u64, bool)> {
        if spare.is_empty() {
            return self.run(phase, budget, base);
        }
        // A short phase (the last pre-copy rounds, a stop-and-copy of little state) never
        // pays for the reader thread: starting it costs a wake-up, which on a busy machine
        // can take milliseconds of downtime. The first buffers go inline; the same reads go
        // on through the ring once the phase proves long.
        let mut tally = Tally::new(self.index, phase, base);
        let inline = INLINE_BUFFERS * self.buf.len() as u64;
        if let Some(ended) = self.run_inline(&mut tally, budget, Some(inline))? {
            return Ok((tally.bytes, tally.chunks, ended));
        }
        let len = self.buf.len();
        let mut bufs: Vec<Vec<u8>> = std::mem::take(spare);
        bufs.push(std::mem::take(&mut self.buf));
        // Every buffer is the pump's size: the reads, hence the records, are the inline pump's.
        for b in bufs.iter_mut() {
            b.resize(len, 0);
        }
        let depth = bufs.len();
        // One more than the buffers: room for the reader's last word after its last buffer.
        let (full_tx, full_rx) = sync_channel::<Filled>(depth + 1);
        let (free_tx, free_rx) = sync_channel::<Vec<u8>>(depth);
        for b in bufs {
            // Capacity `depth`: never blocks, and the receiver is alive.
            let _ = free_tx.send(b);
        }
        let stop = AtomicBool::new(false);
        let Pump {
            dev,
            out,
            index,
            obs,
            ..
        } = self;
        let (index, obs) = (*index, *obs);
        let dev: &mut dyn MigrationDevice = &mut **dev;
        let read_so_far = tally.bytes;
        let mut writer = Writer {
            out: &mut **out,
            tally,
            obs,
            kept: Vec::with_capacity(depth),
        };
        let (result, free_rx) = std::thread::scope(|s| {
            let stop = &stop;
            let reader =
                s.spawn(move || read_ring(dev, free_rx, full_tx, budget, read_so_far, stop));
            let result = writer.run(&full_rx, free_tx, stop);
            // Unblock a reader waiting to hand over a buffer, and take back what it filled.
            while let Ok(item) = full_rx.recv() {
                if let Filled::Data { buf, .. } = item {
                    writer.kept.push(buf);
                }
            }
            match reader.join() {
                Ok((mut held, free_rx)) => {
                    writer.kept.append(&mut held);
                    (result, Some(free_rx))
                }
                Err(_) => (
                    Err(Error::protocol(
                        format!("read device {index} ({phase})"),
                        "the device-read thread panicked",
                    )),
                    None,
                ),
            }
        });
        let mut returned = writer.kept;
        // Every sender is gone: what is left in the free queue is ours again.
        if let Some(free_rx) = free_rx {
            returned.extend(free_rx.try_iter());
        }
        self.buf = returned.pop().unwrap_or_else(|| vec![0u8; len]);
        spare.append(&mut returned);
        result
    }
}

/// The writer's half, on the calling thread.
struct Writer<'a, S: RecordSink + ?Sized> {
    out: &'a mut S,
    tally: Tally,
    obs: &'a dyn Observer,
    /// Buffers the reader will not take back.
    kept: Vec<Vec<u8>>,
}

impl<S: RecordSink + ?Sized> Writer<'_, S> {
    /// Every filled buffer into the sink, in order, and back to the reader. On an error it
    /// marks the ring stopped and drops its end of the free queue, so the reader ends after
    /// its current read.
    fn run(
        &mut self,
        full: &Receiver<Filled>,
        free: SyncSender<Vec<u8>>,
        stop: &AtomicBool,
    ) -> Result<(u64, u64, bool)> {
        let t = &mut self.tally;
        let result = loop {
            let item = match full.recv() {
                Ok(item) => item,
                // The reader always ends with Done or Failed: this is a panicked reader,
                // which the join reports.
                Err(_) => break Ok((t.bytes, t.chunks, true)),
            };
            match item {
                Filled::Data {
                    buf,
                    len,
                    chunk_end,
                } => {
                    // The sink hands back a buffer for the reader: this one once written,
                    // or one of its length (the sink took this one along).
                    let read = DeviceRead {
                        buf,
                        len,
                        chunk_end,
                    };
                    let next = match self.out.data(t.index, t.phase, read) {
                        Ok(next) => next,
                        Err(e) => break Err(e),
                    };
                    if let Err(back) = free.send(next) {
                        self.kept.push(back.0);
                    }
                    t.sent(len, chunk_end, self.obs);
                }
                Filled::Done(ended) => break Ok((t.bytes, t.chunks, ended)),
                Filled::Failed(e) => break Err(e),
            }
        };
        if result.is_err() {
            stop.store(true, Ordering::SeqCst);
        }
        result
    }
}

/// The reader's half: reads the device into empty buffers until the phase ends, the budget
/// is reached at a chunk boundary, the device fails, or the writer stops. The buffers it
/// still holds are returned with the free queue.
fn read_ring(
    dev: &mut dyn MigrationDevice,
    free: Receiver<Vec<u8>>,
    full: SyncSender<Filled>,
    budget: Option<u64>,
    read_so_far: u64,
    stop: &AtomicBool,
) -> (Vec<Vec<u8>>, Receiver<Vec<u8>>) {
    let mut held = Vec::new();
    let mut bytes = read_so_far;
    // Until the queue is disconnected: the writer is done (it failed).
    while let Ok(mut buf) = free.recv() {
        if stop.load(Ordering::SeqCst) {
            held.push(buf);
            break;
        }
        let item = match dev.read(&mut buf) {
            Err(e) => {
                held.push(buf);
                let _ = full.send(Filled::Failed(e));
                break;
            }
            Ok(ReadOutcome::PhaseEnd) => {
                held.push(buf);
                let _ = full.send(Filled::Done(true));
                break;
            }
            Ok(ReadOutcome::Data { len, chunk_end }) => {
                bytes += len as u64;
                Filled::Data {
                    buf,
                    len,
                    chunk_end,
                }
            }
        };
        let last = matches!(
            item,
            Filled::Data {
                chunk_end: true,
                ..
            }
        ) && budget.is_some_and(|b| bytes >= b);
        if let Err(e) = full.send(item) {
            if let Filled::Data { buf, .. } = e.0 {
                held.push(buf);
            }
            break;
        }
        if last {
            let _ = full.send(Filled::Done(false));
            break;
        }
    }
    // The caller drains the queue once every sender is gone (the writer may still be
    // returning a buffer now).
    (held, free)
}
