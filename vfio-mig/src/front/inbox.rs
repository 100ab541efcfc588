// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A channel's inbox: the start of a frame that earlier reads or pushes brought only part
//! of, in a buffer that is zero-filled once and then reused.
//!
//! The destination reads a record straight into its inbox up to the record's end
//! ([`Destination::read_some`](super::Destination::read_some)). `Read::read` takes an
//! initialised slice, and a `Vec<u8>` grown to the record's end before each read and
//! truncated to what arrived after it zero-fills the whole rest of the record on every read:
//! a record arriving in k reads was zeroed (k + 1) / 2 times over, the largest cost the
//! destination had beyond the raw loop's (see docs/benchmarks.md). Here the
//! buffer keeps its initialised length; only the bytes never initialised are zeroed.

use std::io::Read;
use std::ops::Deref;

use crate::stream::format::{PartialRecordCrc, SessionId};

/// Bytes of an incomplete frame (the slice it derefs to), and room after them.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    /// Initialised bytes: the frame's `len` first, then room from earlier frames.
    buf: Vec<u8>,
    /// The frame's bytes so far.
    len: usize,
    /// The record's CRC over the bytes [`note_arrived`](Self::note_arrived) saw.
    crc: Option<PartialRecordCrc>,
}

impl Inbox {
    /// Room for `want` more bytes after the frame's; zero-fills only what the buffer never
    /// held.
    fn room(&mut self, want: usize) -> &mut [u8] {
        let end = self.len + want;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.len..end]
    }

    /// One `read` of at most `want` more bytes of the frame from `input`; returns what the
    /// read returned. The frame grows by what was read, never by more than `want`, the room
    /// the read was given (as `Read::read`'s contract bounds it; a reader breaking it cannot
    /// grow the frame past that room).
    pub(super) fn read_from<R: Read + ?Sized>(
        &mut self,
        input: &mut R,
        want: usize,
    ) -> std::io::Result<usize> {
        let n = input.read(self.room(want))?;
        self.len += n.min(want);
        Ok(n)
    }

    /// Appends `bytes` to the frame.
    pub(super) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Empties the frame; the buffer stays for the next.
    pub(super) fn clear(&mut self) {
        self.len = 0;
        self.crc = None;
    }

    /// Carries the record's CRC (a record of the stream of `session`) over the bytes that
    /// arrived since the last call, while they are still in the cache: reading a record
    /// whole and then checking it read its first bytes back from memory.
    pub(super) fn note_arrived(&mut self, session: &SessionId) {
        PartialRecordCrc::advance(&mut self.crc, session, &self.buf[..self.len]);
    }

    /// The record's CRC once [`note_arrived`](Self::note_arrived) saw its whole payload;
    /// `None` otherwise (the decoder computes it).
    pub(super) fn arrived_crc(&self) -> Option<u32> {
        self.crc.and_then(|c| c.whole(self))
    }
}

impl Deref for Inbox {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out `bytes` at most `max` at a time, and claims `claim` bytes more than it wrote.
    struct Pieces<'a> {
        bytes: &'a [u8],
        max: usize,
        claim: usize,
    }

    impl Read for Pieces<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.max).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n + self.claim)
        }
    }

    #[test]
    fn a_frame_read_in_pieces_holds_exactly_the_bytes_read() {
        let mut inbox = Inbox::default();
        inbox.extend_from_slice(b"head");
        let mut input = Pieces {
            bytes: b"abcdefghij",
            max: 3,
            claim: 0,
        };
        assert_eq!(inbox.read_from(&mut input, 10).unwrap(), 3);
        assert_eq!(&inbox[..], b"headabc");
        while inbox.len() < 14 {
            let want = 14 - inbox.len();
            inbox.read_from(&mut input, want).unwrap();
        }
        assert_eq!(&inbox[..], b"headabcdefghij");
    }

    /// An inbox emptied after a 64-byte frame: its buffer still holds that frame's bytes.
    fn after_a_frame() -> Inbox {
        let mut inbox = Inbox::default();
        inbox.extend_from_slice(&[7u8; 64]);
        inbox.clear();
        inbox
    }

    #[test]
    fn a_cleared_inbox_shows_nothing_of_the_last_frame() {
        let mut inbox = after_a_frame();
        assert!(inbox.is_empty());
        let mut input = Pieces {
            bytes: b"xy",
            max: 64,
            claim: 0,
        };
        assert_eq!(inbox.read_from(&mut input, 64).unwrap(), 2);
        assert_eq!(&inbox[..], b"xy");
    }

    #[test]
    fn a_reader_claiming_more_than_it_was_given_adds_at_most_what_was_wanted() {
        let mut inbox = after_a_frame();
        let mut input = Pieces {
            bytes: b"ab",
            max: 64,
            claim: 100,
        };
        assert_eq!(inbox.read_from(&mut input, 4).unwrap(), 102);
        assert_eq!(inbox.len(), 4);
        assert_eq!(&inbox[..2], b"ab");
    }
}
