// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The records of a unit's switch-over on their way from the device threads that encode them
//! ([`super::relay::UnitSink`]) to the writers of their channels ([`super::Outputs`]), and
//! the pool their payload buffers return to once written.

use std::io::Write;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use crate::stream::auth::TAG_LEN;
use crate::stream::format::RECORD_HEADER_LEN;
use crate::stream::writer::write_record_bytes;

/// The payload buffers of a unit's records, back from the writer for the device threads to
/// read into again. It holds at most what was in flight at once (the records queued towards
/// the writers, and one being written per channel).
#[derive(Debug, Default)]
pub(super) struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of `size` bytes: a returned one, or a new one while the records in flight
    /// hold every buffer.
    pub(super) fn take(&self, size: usize) -> Vec<u8> {
        let returned = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut buf = returned.unwrap_or_default();
        // A no-op for a returned buffer: every buffer of a unit has the pump's size.
        buf.resize(size, 0);
        buf
    }

    pub(super) fn put(&self, buf: Vec<u8>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    }
}

/// A record of a unit's switch-over on its way from a device thread to the thread that
/// writes it: its encoded header and tag, and its payload in the buffer the device read into,
/// which returns to the unit's pool once the record is written or dropped.
pub(crate) struct Outgoing {
    /// The channel that carries it.
    pub(crate) channel: usize,
    pub(super) head: [u8; RECORD_HEADER_LEN],
    pub(super) tag: Option<[u8; TAG_LEN]>,
    /// `payload[..len]` is the record's payload (none for END_OF_PHASE).
    pub(super) payload: Vec<u8>,
    pub(super) len: usize,
    pub(super) pool: Arc<Pool>,
}

impl Outgoing {
    /// Writes the record into `out`: header, payload and tag in one vectored write (the
    /// writes that follow only when `out` takes less).
    pub(crate) fn write_to<W: Write + ?Sized>(&self, out: &mut W) -> std::io::Result<()> {
        write_record_bytes(
            out,
            &self.head,
            &self.payload[..self.len],
            self.tag.as_ref(),
        )
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        if self.payload.capacity() > 0 {
            self.pool.put(std::mem::take(&mut self.payload));
        }
    }
}

/// The records of a unit's switch-over, in each channel's stream order, as its device threads
/// produce them: what [`super::Outputs::write_records`] writes. Only the library makes and reads
/// them.
pub struct UnitRecords(pub(crate) Receiver<Outgoing>);

impl std::fmt::Debug for UnitRecords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitRecords").finish_non_exhaustive()
    }
}
