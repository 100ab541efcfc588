// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A channel's inbox: the start of a frame that earlier reads or pushes brought only part
//! of, in a buffer that is zero-filled once and then reused.
//!
//! The destination reads a record straight into its inbox up to the record's end
//! ([`Destination::read_some`](super::Destination::read_some)). `Read::read` takes an
//! initialised slice, and a `Vec<u8>` grown to the record's end before each read and
//! truncated to what arrived after it zero-fills the whole rest of the record on every read:
//! a 1 MiB record arriving in 200 KiB socket reads was zeroed about three times over, the
//! largest cost the destination had beyond the raw loop's (see docs/benchmarks.md). Here the
//! buffer keeps its initialised length; only the bytes never initialised are zeroed.

use std::ops::Deref;

/// Bytes of an incomplete frame (the slice it derefs to), and room after them.
#[derive(Debug, Default)]
pub(super) struct Inbox {
    /// Initialised bytes: the frame's `len` first, then room from earlier frames.
    buf: Vec<u8>,
    /// The frame's bytes so far.
    len: usize,
}

impl Inbox {
    /// Room for `want` more bytes after the frame's, to read into; zero-fills only what the
    /// buffer never held.
    pub(super) fn room(&mut self, want: usize) -> &mut [u8] {
        let end = self.len + want;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        &mut self.buf[self.len..end]
    }

    /// Adds `n` bytes read into the start of [`room`](Self::room) to the frame (at most the
    /// room there is).
    pub(super) fn filled(&mut self, n: usize) {
        self.len += n.min(self.buf.len() - self.len);
    }

    /// Appends `bytes` to the frame.
    pub(super) fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.room(bytes.len()).copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// Empties the frame; the buffer stays for the next.
    pub(super) fn clear(&mut self) {
        self.len = 0;
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

    #[test]
    fn a_frame_read_in_pieces_holds_exactly_the_bytes_read() {
        let mut inbox = Inbox::default();
        inbox.extend_from_slice(b"head");
        let room = inbox.room(10);
        assert_eq!(room.len(), 10);
        room[..3].copy_from_slice(b"abc");
        inbox.filled(3);
        assert_eq!(&inbox[..], b"headabc");
        inbox.room(7)[..7].copy_from_slice(b"defghij");
        inbox.filled(7);
        assert_eq!(&inbox[..], b"headabcdefghij");
    }

    #[test]
    fn a_cleared_inbox_reuses_its_buffer_and_shows_nothing_of_the_last_frame() {
        let mut inbox = Inbox::default();
        inbox.extend_from_slice(&[7u8; 64]);
        inbox.clear();
        assert!(inbox.is_empty());
        // The room holds the last frame's bytes; the frame holds only what is filled.
        assert_eq!(inbox.room(64).len(), 64);
        inbox.filled(2);
        assert_eq!(inbox.len(), 2);
        inbox.clear();
        inbox.extend_from_slice(b"xy");
        assert_eq!(&inbox[..], b"xy");
    }

    #[test]
    fn filling_more_than_the_room_adds_only_the_room() {
        let mut inbox = Inbox::default();
        inbox.room(4);
        inbox.filled(100);
        assert_eq!(inbox.len(), 4);
    }
}
