// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The sending side: [`StreamWriter`].

use std::io::{self, IoSlice, Write};

use super::format::{
    RecordHeader, RecordKind, StreamHeader, Totals, Tracker, HEADER_FLAG_AUTHENTICATED,
    MAX_FRAGMENT, RECORD_HEADER_LEN,
};
use std::sync::Arc;

use super::auth::{StreamAuth, TAG_LEN};
use super::Phase;
use crate::error::{Error, Result};

/// A record encoded for a caller that writes it itself: its header and, for an authenticated
/// stream, its tag (the payload goes between them).
pub(crate) type EncodedRecord = ([u8; RECORD_HEADER_LEN], Option<[u8; TAG_LEN]>);

/// Records whose header and payload together fit in this many bytes are copied into one
/// stack buffer and written with a single `write_all`.
const COALESCE_LEN: usize = 4096;

/// Writes a migration stream: the header, then DATA and END_OF_PHASE records, then the
/// trailer.
///
/// The writer enforces the same ordering rules as [`super::StreamReader`], so the library
/// cannot produce a stream its reader refuses: a call that would break a rule fails before
/// anything is written, and the writer stays usable. A failed write of the transport, on the
/// other hand, leaves an unknown part of a record behind: every later call fails.
///
/// Each record is written with a single `write_all` (small records) or `write_vectored`
/// (header and payload together); buffer a transport in a
/// [`CoalescingWriter`](super::coalesce::CoalescingWriter), which keeps that one call (a
/// `std::io::BufWriter` splits it in two).
pub struct StreamWriter<W: Write> {
    w: W,
    header: StreamHeader,
    key: Option<Arc<dyn StreamAuth>>,
    tracker: Tracker,
    bytes_written: u64,
    failed: bool,
    fragment_limit: usize,
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("header", &self.header)
            .field("records_written", &self.records_written())
            .field("bytes_written", &self.bytes_written)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<W: Write> StreamWriter<W> {
    /// Validates `header` and writes it to `w` (an unauthenticated stream).
    pub fn new(w: W, header: &StreamHeader) -> Result<Self> {
        Self::with_key(w, header, None)
    }

    /// Validates `header` and writes it to `w`; with a `key`, the stream is authenticated:
    /// a tag follows the header and every record (see [`StreamAuth`]).
    pub fn with_key(
        mut w: W,
        header: &StreamHeader,
        key: Option<Arc<dyn StreamAuth>>,
    ) -> Result<Self> {
        let flags = if key.is_some() {
            HEADER_FLAG_AUTHENTICATED
        } else {
            0
        };
        let mut bytes = header.encode_with_flags(flags)?;
        if let Some(k) = &key {
            let tag = k.header_tag(&bytes);
            bytes.extend_from_slice(&tag);
        }
        w.write_all(&bytes)
            .map_err(|e| Error::transport("write stream header", e))?;
        Ok(StreamWriter {
            w,
            header: header.clone(),
            key,
            tracker: Tracker::new(header),
            bytes_written: bytes.len() as u64,
            failed: false,
            fragment_limit: MAX_FRAGMENT,
        })
    }

    /// The header this stream was opened with.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Bytes written so far (header and records), for progress reporting.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Records written so far, which is also the next record's sequence number.
    pub fn records_written(&self) -> u64 {
        self.tracker.totals().records
    }

    /// The running totals (what the trailer would carry if the stream ended now).
    pub fn totals(&self) -> &Totals {
        self.tracker.totals()
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.w
    }

    /// The transport, mutably: for a caller that stages the records in memory and moves them
    /// on between records (the front door's per-round output). Bytes written into it become
    /// part of the stream, so a caller must only take out what was written.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.w
    }

    /// Writes `bytes` of `device`'s migration data for `phase`.
    ///
    /// `bytes` is split into DATA records of at most [`MAX_FRAGMENT`] bytes. If `chunk_end`,
    /// the last of them closes the device chunk (for v1, one `data_size` transaction, which the
    /// destination replays with the same size); a chunk may be passed in several calls, all but
    /// the last with `chunk_end == false`. `bytes` must not be empty.
    pub fn data(&mut self, device: u16, phase: Phase, bytes: &[u8], chunk_end: bool) -> Result<()> {
        self.check_data(device, phase, bytes.len())?;
        let mut fragments = bytes.chunks(self.fragment_limit).peekable();
        while let Some(fragment) = fragments.next() {
            let end = chunk_end && fragments.peek().is_none();
            self.write_record(RecordKind::Data, end, device, Some(phase), fragment)?;
            self.tracker.record_data(device, phase, fragment.len(), end);
        }
        Ok(())
    }

    /// [`data`](Self::data), but the records go into `out` instead of the writer's own
    /// transport, which must hold nothing unsent (a caller that moves every record on as it
    /// is complete, into a writer it is given per call): the payload goes from `bytes` into
    /// `out` with its header in one vectored write, copied nowhere. Returns the bytes written.
    pub(crate) fn data_to<O: Write + ?Sized>(
        &mut self,
        out: &mut O,
        device: u16,
        phase: Phase,
        bytes: &[u8],
        chunk_end: bool,
    ) -> Result<u64> {
        self.check_data(device, phase, bytes.len())?;
        let before = self.bytes_written;
        let mut fragments = bytes.chunks(self.fragment_limit).peekable();
        while let Some(fragment) = fragments.next() {
            let end = chunk_end && fragments.peek().is_none();
            let (header, tag) =
                self.encode_record(RecordKind::Data, end, device, Some(phase), fragment)?;
            let written = write_record_bytes(out, &header, fragment, tag.as_ref());
            self.account(written, fragment.len())?;
            self.tracker.record_data(device, phase, fragment.len(), end);
        }
        Ok(self.bytes_written - before)
    }

    /// The next DATA record of `device`, one record carrying all of `payload`, encoded (its
    /// CRC32C, and the tag of an authenticated stream, computed here) but not written, and
    /// counted as written: for a caller that writes it itself (header, payload, tag) before
    /// any later record of this writer.
    pub(crate) fn encode_data(
        &mut self,
        device: u16,
        phase: Phase,
        payload: &[u8],
        chunk_end: bool,
    ) -> Result<EncodedRecord> {
        self.check_data(device, phase, payload.len())?;
        if payload.len() > self.fragment_limit {
            return Err(Error::stream(
                self.step(),
                format!(
                    "device {device}: {} bytes of DATA for one record (at most {})",
                    payload.len(),
                    self.fragment_limit
                ),
            ));
        }
        let record =
            self.encode_record(RecordKind::Data, chunk_end, device, Some(phase), payload)?;
        self.account(Ok(()), payload.len())?;
        self.tracker
            .record_data(device, phase, payload.len(), chunk_end);
        Ok(record)
    }

    /// Writes END_OF_PHASE for `device` and `phase`: no more `phase` data for the device.
    /// Pre-copy can only be ended for LIVE devices, and must be ended before their stop-copy
    /// data; the device's last chunk must be closed.
    pub fn end_phase(&mut self, device: u16, phase: Phase) -> Result<()> {
        self.check_end_phase(device, phase)?;
        self.write_record(RecordKind::EndOfPhase, false, device, Some(phase), &[])?;
        self.tracker.record_end_phase(device, phase);
        Ok(())
    }

    /// [`end_phase`](Self::end_phase)'s record, encoded but not written, and counted as
    /// written (see [`encode_data`](Self::encode_data)).
    pub(crate) fn encode_end_phase(&mut self, device: u16, phase: Phase) -> Result<EncodedRecord> {
        self.check_end_phase(device, phase)?;
        let record = self.encode_record(RecordKind::EndOfPhase, false, device, Some(phase), &[])?;
        self.account(Ok(()), 0)?;
        self.tracker.record_end_phase(device, phase);
        Ok(record)
    }

    /// The checks before END_OF_PHASE: usable writer, ordering rules.
    fn check_end_phase(&self, device: u16, phase: Phase) -> Result<()> {
        let step = self.step();
        self.check_usable(&step)?;
        self.tracker
            .check_end_phase(device, phase)
            .map_err(|d| Error::stream(step, d))
    }

    /// Writes the trailer, flushes, and returns the transport and the stream's totals. Every
    /// device must have ended stop-copy.
    pub fn finish(mut self) -> Result<(W, Totals)> {
        let step = format!("write stream trailer (record {})", self.records_written());
        self.check_usable(&step)?;
        self.tracker
            .check_trailer()
            .map_err(|d| Error::stream(step.as_str(), d))?;
        let totals = self.tracker.totals().clone();
        let payload = totals.encode();
        self.write_record(RecordKind::Trailer, false, 0, None, &payload)?;
        self.w
            .flush()
            .map_err(|e| Error::transport(format!("flush stream after {step}"), e))?;
        Ok((self.w, totals))
    }

    /// Flushes the transport, so that the destination sees every record written so far
    /// (before the source waits for its answer).
    pub fn flush(&mut self) -> Result<()> {
        let step = format!("flush stream after record {}", self.records_written());
        self.check_usable(&step)?;
        if let Err(e) = self.w.flush() {
            self.failed = true;
            return Err(Error::transport(step, e));
        }
        Ok(())
    }

    /// The checks before DATA: usable writer, non-empty payload, ordering rules. The step text
    /// is only formatted on failure (this runs once per record on the hot path).
    fn check_data(&self, device: u16, phase: Phase, len: usize) -> Result<()> {
        if self.failed {
            self.check_usable(&self.step())?;
        }
        if len == 0 {
            return Err(Error::stream(
                self.step(),
                format!(
                    "device {device}: empty {phase} DATA (a fragment carries at least one byte)"
                ),
            ));
        }
        self.tracker
            .check_data(device, phase)
            .map_err(|d| Error::stream(self.step(), d))
    }

    fn step(&self) -> String {
        format!("write stream record {}", self.records_written())
    }

    fn check_usable(&self, step: &str) -> Result<()> {
        if self.failed {
            return Err(Error::stream(
                step,
                "an earlier write failed; the stream is incomplete and cannot be continued",
            ));
        }
        Ok(())
    }

    fn write_record(
        &mut self,
        kind: RecordKind,
        chunk_end: bool,
        device: u16,
        phase: Option<Phase>,
        payload: &[u8],
    ) -> Result<()> {
        let (header, tag) = self.encode_record(kind, chunk_end, device, phase, payload)?;
        let written = write_record_bytes(&mut self.w, &header, payload, tag.as_ref());
        self.account(written, payload.len())
    }

    /// The record's header and, for an authenticated stream, its tag.
    fn encode_record(
        &self,
        kind: RecordKind,
        chunk_end: bool,
        device: u16,
        phase: Option<Phase>,
        payload: &[u8],
    ) -> Result<EncodedRecord> {
        let sequence = self.records_written();
        let payload_len = u32::try_from(payload.len()).map_err(|_| {
            Error::stream(
                format!("write stream record {sequence}"),
                format!("payload of {} bytes is too long", payload.len()),
            )
        })?;
        let session = self.header.session_id;
        let header = RecordHeader {
            kind,
            chunk_end,
            device,
            phase,
            sequence,
            payload_len,
        }
        .encode(&session, payload);
        let tag = self
            .key
            .as_ref()
            .map(|k| k.record_tag(&session, &header, payload));
        Ok((header, tag))
    }

    /// Counts a record written, or poisons the writer after a failed write.
    fn account(&mut self, written: io::Result<()>, payload_len: usize) -> Result<()> {
        if let Err(e) = written {
            self.failed = true;
            return Err(Error::transport(
                format!("write stream record {}", self.records_written()),
                e,
            ));
        }
        self.bytes_written += (RECORD_HEADER_LEN + payload_len + self.tag_len()) as u64;
        Ok(())
    }

    /// Bytes of tag after each record (0 for an unauthenticated stream).
    fn tag_len(&self) -> usize {
        if self.key.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// Splits DATA at `limit` bytes instead of [`MAX_FRAGMENT`] (tests only: exercises the
    /// splitting without megabytes of data).
    #[cfg(test)]
    pub(crate) fn set_fragment_limit(&mut self, limit: usize) {
        self.fragment_limit = limit.clamp(1, MAX_FRAGMENT);
    }
}

/// Writes `head`, `body` and `tag`: one `write_all` of a stack copy if they are small, else
/// vectored writes until `head` is out, then `write_all` of the rest of `body`, then `tag`.
pub(crate) fn write_record_bytes<W: Write + ?Sized>(
    w: &mut W,
    head: &[u8],
    body: &[u8],
    tag: Option<&[u8; TAG_LEN]>,
) -> io::Result<()> {
    let tag: &[u8] = tag.map_or(&[], |t| t);
    let total = head.len() + body.len() + tag.len();
    if total <= COALESCE_LEN {
        let mut buf = [0u8; COALESCE_LEN];
        buf[..head.len()].copy_from_slice(head);
        buf[head.len()..head.len() + body.len()].copy_from_slice(body);
        buf[head.len() + body.len()..total].copy_from_slice(tag);
        return w.write_all(&buf[..total]);
    }
    let (mut head, mut body) = (head, body);
    while !head.is_empty() {
        match w.write_vectored(&[IoSlice::new(head), IoSlice::new(body), IoSlice::new(tag)]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the transport accepted no more bytes",
                ))
            }
            Ok(n) if n < head.len() => head = &head[n..],
            Ok(n) if n - head.len() <= body.len() => {
                body = &body[n - head.len()..];
                head = &[];
            }
            Ok(n) => {
                // Header, payload and part of the tag are out.
                let sent = n - head.len() - body.len();
                return w.write_all(tag.get(sent..).unwrap_or_default());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    w.write_all(body)?;
    w.write_all(tag)
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::header;
    use super::*;

    /// Counts write calls; fails after `fail_after` bytes if set; accepts at most `max` bytes
    /// per call.
    struct Probe {
        out: Vec<u8>,
        writes: usize,
        fail_after: Option<usize>,
        max: usize,
    }

    impl Probe {
        fn new() -> Self {
            Probe {
                out: Vec::new(),
                writes: 0,
                fail_after: None,
                max: usize::MAX,
            }
        }
    }

    impl Write for Probe {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.writes += 1;
            if let Some(limit) = self.fail_after {
                if self.out.len() >= limit {
                    return Err(io::Error::other("link down"));
                }
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                self.out.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_write_per_record() {
        let mut w = StreamWriter::new(Probe::new(), &header(1, |_| false)).unwrap();
        assert_eq!(w.get_ref().writes, 1);
        w.data(0, Phase::StopCopy, &[1; 100], true).unwrap();
        assert_eq!(w.get_ref().writes, 2);
        w.data(0, Phase::StopCopy, &[2; 100_000], true).unwrap();
        assert_eq!(w.get_ref().writes, 3);
        w.end_phase(0, Phase::StopCopy).unwrap();
        assert_eq!(w.get_ref().writes, 4);
        let written = w.bytes_written();
        let (probe, totals) = w.finish().unwrap();
        assert_eq!(probe.writes, 5);
        assert_eq!(written + 24 + 8 + 24, probe.out.len() as u64);
        assert_eq!(totals.records, 3);
        assert_eq!(totals.devices[0].stop_copy_bytes, 100_100);
    }

    /// Records encoded apart (and written by the caller) are the bytes `data` and
    /// `end_phase` write, plain and keyed, and count in the totals the same.
    #[test]
    fn records_encoded_apart_are_the_records_written() {
        #[derive(Debug)]
        struct Key;
        impl StreamAuth for Key {
            fn header_tag(&self, header: &[u8]) -> [u8; TAG_LEN] {
                [header.len() as u8; TAG_LEN]
            }
            fn header_ok(&self, _: &[u8], _: &[u8]) -> bool {
                true
            }
            fn record_tag(&self, _: &[u8; 16], head: &[u8], payload: &[u8]) -> [u8; TAG_LEN] {
                let crc =
                    crate::stream::crc::crc32c_append(crate::stream::crc::crc32c(head), payload);
                [crc as u8; TAG_LEN]
            }
            fn record_ok(&self, _: &[u8; 16], _: &[u8], _: &[u8], _: &[u8]) -> bool {
                true
            }
        }
        let payloads: [&[u8]; 3] = [&[3; 1], &[4; 5000], &[5; 70_000]];
        for key in [None, Some(Arc::new(Key) as Arc<dyn StreamAuth>)] {
            let h = header(1, |_| false);
            let mut written = StreamWriter::with_key(Vec::new(), &h, key.clone()).unwrap();
            let mut apart = StreamWriter::with_key(Vec::new(), &h, key.clone()).unwrap();
            for p in payloads {
                written.data(0, Phase::StopCopy, p, true).unwrap();
                let (head, tag) = apart.encode_data(0, Phase::StopCopy, p, true).unwrap();
                write_record_bytes(apart.get_mut(), &head, p, tag.as_ref()).unwrap();
            }
            written.end_phase(0, Phase::StopCopy).unwrap();
            let (head, tag) = apart.encode_end_phase(0, Phase::StopCopy).unwrap();
            write_record_bytes(apart.get_mut(), &head, &[], tag.as_ref()).unwrap();
            assert_eq!(written.bytes_written(), apart.bytes_written());
            let (written, written_totals) = written.finish().unwrap();
            let (apart, apart_totals) = apart.finish().unwrap();
            assert_eq!(written_totals, apart_totals);
            assert!(written == apart, "keyed {}: other bytes", key.is_some());
        }
    }

    #[test]
    fn short_vectored_writes() {
        for max in [1, 7, 24, 25, 5000] {
            let mut p = Probe::new();
            p.max = max;
            let mut w = StreamWriter::new(p, &header(1, |_| false)).unwrap();
            let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            w.data(0, Phase::StopCopy, &data, true).unwrap();
            w.end_phase(0, Phase::StopCopy).unwrap();
            let mut reference = StreamWriter::new(Vec::new(), &header(1, |_| false)).unwrap();
            reference.data(0, Phase::StopCopy, &data, true).unwrap();
            reference.end_phase(0, Phase::StopCopy).unwrap();
            assert_eq!(
                w.finish().unwrap().0.out,
                reference.finish().unwrap().0,
                "max {max}"
            );
        }
    }

    #[test]
    fn splits_at_max_fragment() {
        let mut w = StreamWriter::new(Vec::new(), &header(1, |_| false)).unwrap();
        w.data(0, Phase::StopCopy, &vec![7; 2 * MAX_FRAGMENT + 1], true)
            .unwrap();
        assert_eq!(w.records_written(), 3);
        assert_eq!(w.totals().devices[0].chunks, 1);
        w.data(0, Phase::StopCopy, &vec![7; MAX_FRAGMENT], false)
            .unwrap();
        assert_eq!(w.records_written(), 4);
        assert_eq!(w.totals().devices[0].chunks, 1);
    }

    #[test]
    fn refuses_rule_violations_without_writing() {
        let mut w = StreamWriter::new(Vec::new(), &header(2, |i| i == 0)).unwrap();
        let before = w.bytes_written();
        let e = w
            .data(1, Phase::PreCopy, b"x", true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("write stream record 0") && e.contains("not marked LIVE"),
            "{e}"
        );
        assert!(w.data(0, Phase::StopCopy, b"x", true).is_err());
        assert!(w
            .data(2, Phase::StopCopy, b"x", true)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert!(w
            .data(0, Phase::PreCopy, b"", true)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(w.end_phase(1, Phase::PreCopy).is_err());
        assert_eq!(w.bytes_written(), before);
        w.data(0, Phase::PreCopy, b"abc", false).unwrap();
        let e = w.end_phase(0, Phase::PreCopy).unwrap_err().to_string();
        assert!(
            e.contains("write stream record 1") && e.contains("chunk is open"),
            "{e}"
        );
        w.data(0, Phase::PreCopy, b"d", true).unwrap();
        w.end_phase(0, Phase::PreCopy).unwrap();
        assert!(w.end_phase(0, Phase::PreCopy).is_err());
        w.data(0, Phase::StopCopy, b"s", true).unwrap();
        assert!(w.data(0, Phase::PreCopy, b"x", true).is_err());
        w.end_phase(0, Phase::StopCopy).unwrap();
        // Device 1 has not ended stop-copy.
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("TRAILER before device 1"), "{e}");
    }

    #[test]
    fn transport_failure_poisons() {
        let mut p = Probe::new();
        p.fail_after = Some(1);
        let mut w = StreamWriter::new(p, &header(1, |_| false)).unwrap();
        let e = w.data(0, Phase::StopCopy, &[0; 200], true).unwrap_err();
        assert!(matches!(e, Error::Transport { .. }), "{e}");
        assert!(e.to_string().contains("write stream record 0"), "{e}");
        let e = w.end_phase(0, Phase::StopCopy).unwrap_err().to_string();
        assert!(e.contains("earlier write failed"), "{e}");
        assert!(w.finish().is_err());
    }
}
