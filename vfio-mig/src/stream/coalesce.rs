// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`CoalescingWriter`]: a write buffer that sends a record's header and payload in one call.

use std::io::{self, IoSlice, Write};

/// A buffered writer for a stream's transport (a socket, a file) that keeps small writes and
/// hands a large one to the transport **together with what it holds**, in one
/// `write_vectored` (one `writev(2)` on a socket or a file).
///
/// [`StreamWriter`](super::StreamWriter) writes a DATA record as its 24-byte header and its
/// payload in one vectored write. Stable Rust's `std::io::BufWriter` passes a vectored write
/// on only to a writer that claims vectored writes (`Write::is_write_vectored`, which a
/// wrapper outside `std` cannot implement), so behind it the header left in a `write` of its
/// own before the payload: two system calls per record. Here the header (and any small
/// record before it) joins the buffered bytes, and the payload follows them in the same call.
///
/// Writes that fit the free buffer are copied into it; [`flush`](Write::flush) or
/// [`into_inner`](Self::into_inner) sends them. Unlike `BufWriter`, dropping the writer does
/// not: a stream is complete only once its trailer was flushed, and a dropped (failed) stream
/// is not sent on.
#[derive(Debug)]
pub struct CoalescingWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    capacity: usize,
}

/// Slices passed on in one call at most: what is buffered, then a record's header, payload
/// and tag.
const MAX_SLICES: usize = 4;

impl<W: Write> CoalescingWriter<W> {
    /// A writer into `inner` keeping up to `capacity` bytes.
    pub fn with_capacity(capacity: usize, inner: W) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner,
            buf: Vec::with_capacity(capacity),
            capacity,
        }
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The transport, mutably. Writing into it directly puts bytes before the buffered ones.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Sends what is buffered and returns the transport (not flushed itself).
    pub fn into_inner(mut self) -> io::Result<W> {
        self.send_buffered()?;
        Ok(self.inner)
    }

    fn room(&self) -> usize {
        self.capacity - self.buf.len()
    }

    /// Writes out everything buffered.
    fn send_buffered(&mut self) -> io::Result<()> {
        let mut sent = 0;
        let result = loop {
            let Some(rest) = self.buf.get(sent..).filter(|r| !r.is_empty()) else {
                break Ok(());
            };
            match self.inner.write(rest) {
                Ok(0) => break Err(write_zero()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        self.buf.drain(..sent);
        result
    }
}

fn write_zero() -> io::Error {
    io::Error::new(
        io::ErrorKind::WriteZero,
        "the transport accepted no more bytes",
    )
}

impl<W: Write> Write for CoalescingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(data)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total <= self.room() {
            for b in bufs {
                self.buf.extend_from_slice(b);
            }
            return Ok(total);
        }
        // The leading slices that fit (a record's header) join the buffer, so that a
        // transport without vectored writes still sends them with what is buffered.
        let mut absorbed = 0;
        let mut rest = bufs;
        while let [first, tail @ ..] = rest {
            if tail.is_empty() || first.len() > self.room() {
                break;
            }
            self.buf.extend_from_slice(first);
            absorbed += first.len();
            rest = tail;
        }
        loop {
            let buffered = self.buf.len();
            let written = if buffered == 0 {
                self.inner.write_vectored(rest)
            } else if rest.len() < MAX_SLICES {
                let mut slices = [IoSlice::new(&[]); MAX_SLICES];
                slices[0] = IoSlice::new(&self.buf);
                slices[1..=rest.len()].copy_from_slice(rest);
                self.inner.write_vectored(&slices[..=rest.len()])
            } else {
                // More slices than one call takes here: the buffer first, on its own.
                self.send_buffered().map(|()| buffered)
            };
            match written {
                Ok(0) => return Err(write_zero()),
                Ok(n) if n < buffered => {
                    self.buf.drain(..n);
                }
                Ok(n) => {
                    self.buf.clear();
                    let taken = absorbed + (n - buffered);
                    if taken > 0 {
                        return Ok(taken);
                    }
                }
                // Bytes already taken into the buffer count as written; the error comes
                // back on the next call.
                Err(_) if absorbed > 0 => return Ok(absorbed),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if absorbed > 0 {
                return Ok(absorbed);
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()?;
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call; accepts at most `max` bytes per call; `vectored: false` behaves as
    /// a writer without vectored writes (the first non-empty slice only).
    struct Probe {
        out: Vec<u8>,
        calls: usize,
        max: usize,
        vectored: bool,
        fail: bool,
    }

    impl Probe {
        fn new(max: usize, vectored: bool) -> Self {
            Probe {
                out: Vec::new(),
                calls: 0,
                max,
                vectored,
                fail: false,
            }
        }
    }

    impl Write for Probe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.fail {
                return Err(io::Error::other("link down"));
            }
            self.calls += 1;
            let bufs: Vec<&IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).collect();
            let take = if self.vectored { bufs.len() } else { 1 };
            let mut n = 0;
            for b in bufs.into_iter().take(take) {
                let k = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..k]);
                n += k;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(i: usize, len: usize) -> (Vec<u8>, Vec<u8>) {
        let head = vec![i as u8; 24];
        let body = (0..len).map(|j| (i + j) as u8).collect();
        (head, body)
    }

    /// Writes records as the stream writer does (header and payload in one vectored write,
    /// then the rest of the payload) and returns the writer.
    fn write_records(w: &mut CoalescingWriter<Probe>, sizes: &[usize]) -> Vec<u8> {
        let mut want = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let (head, body) = record(i, len);
            want.extend_from_slice(&head);
            want.extend_from_slice(&body);
            let (mut head, mut body) = (&head[..], &body[..]);
            while !head.is_empty() {
                let n = w
                    .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
                    .unwrap();
                assert!(n > 0);
                if n < head.len() {
                    head = &head[n..];
                } else {
                    body = &body[n - head.len()..];
                    head = &[];
                }
            }
            w.write_all(body).unwrap();
        }
        w.flush().unwrap();
        want
    }

    #[test]
    fn a_large_record_leaves_with_what_is_buffered_in_one_call() {
        let mut w = CoalescingWriter::with_capacity(4096, Probe::new(usize::MAX, true));
        // Two small records stay in the buffer; the large one takes them along.
        write_records(&mut w, &[10, 20]);
        let before = w.get_ref().calls;
        assert_eq!(before, 1, "the flush sends the two small records at once");
        let want = write_records(&mut w, &[100_000, 100_000, 100_000]);
        assert_eq!(w.get_ref().calls - before, 3, "one call per large record");
        assert!(w.get_ref().out.ends_with(&want));
    }

    #[test]
    fn short_and_unvectored_writes_keep_every_byte_in_order() {
        let sizes = [1, 5000, 23, 70_000, 4096, 3, 200_000];
        for vectored in [true, false] {
            for max in [1, 7, 24, 25, 4095, 65_536, usize::MAX] {
                let mut w = CoalescingWriter::with_capacity(4096, Probe::new(max, vectored));
                let want = write_records(&mut w, &sizes);
                let got = w.into_inner().unwrap().out;
                assert!(got == want, "max {max}, vectored {vectored}");
            }
        }
    }

    #[test]
    fn a_failed_transport_is_an_error_and_nothing_is_counted_twice() {
        let mut w = CoalescingWriter::with_capacity(64, Probe::new(usize::MAX, true));
        w.write_all(b"kept").unwrap();
        w.get_mut().fail = true;
        // The header joins the buffer (counted as written); the payload's call fails.
        let n = w
            .write_vectored(&[IoSlice::new(&[1; 24]), IoSlice::new(&[2; 1000])])
            .unwrap();
        assert_eq!(n, 24);
        assert!(w.write(&[2; 1000]).is_err());
        assert!(w.flush().is_err());
        w.get_mut().fail = false;
        w.flush().unwrap();
        let mut want = b"kept".to_vec();
        want.extend_from_slice(&[1; 24]);
        assert_eq!(w.get_ref().out, want);
    }
}
