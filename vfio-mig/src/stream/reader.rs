// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The receiving side: [`StreamReader`] and [`verify`].

use std::io::{self, Read};

pub use super::decode::Record;
use super::decode::{Decoded, RecordCheck, State};
use super::format::{
    check_descriptor_fixed, check_header_fixed, header_flags, RawRecordHeader, StreamHeader,
    Totals, CRC_LEN, DESCRIPTOR_FIXED_LEN, FORMAT_VERSION, HEADER_FIXED_LEN,
    HEADER_FLAG_AUTHENTICATED, MAX_MODEL_LEN, RECORD_HEADER_LEN,
};
use std::sync::Arc;

use super::auth::{StreamAuth, TAG_LEN};
use super::Phase;
use crate::error::{Error, Result};

/// Reads and checks a migration stream.
///
/// Every record is read whole into one reusable buffer (at most [`super::format::MAX_FRAGMENT`]
/// bytes, allocated as needed) and its CRC checked before it is returned, so no unverified
/// byte reaches a device; every length is checked against its bound before anything is read
/// or allocated, so memory does not grow with the stream. All ordering rules are enforced.
/// After an error the reader is at an unknown position: every later call fails.
pub struct StreamReader<R: Read> {
    r: R,
    /// The header's bytes as read, its tag included.
    header_bytes: Vec<u8>,
    check: RecordCheck,
    buf: Vec<u8>,
    bytes_read: u64,
}

impl<R: Read> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("header", &self.check.header)
            .field("records_read", &self.records_read())
            .field("bytes_read", &self.bytes_read)
            .field("state", &self.check.state)
            .finish_non_exhaustive()
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read, counted in `count`.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], count: &mut u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let rest = buf.get_mut(n..).unwrap_or_default();
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => {
                let k = k.min(rest.len());
                n += k;
                *count += k as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads exactly `buf.len()` header bytes.
fn read_header_part<R: Read>(r: &mut R, buf: &mut [u8], count: &mut u64) -> Result<()> {
    let n = read_full(r, buf, count).map_err(|e| Error::transport("read stream header", e))?;
    if n < buf.len() {
        return Err(Error::stream(
            "stream header",
            if *count == 0 {
                "truncated stream: no data at all".to_owned()
            } else {
                format!("truncated stream: it ends after {count} bytes, inside the header")
            },
        ));
    }
    Ok(())
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the stream header (magic, version, device count, descriptors, CRC);
    /// returns the reader and a copy of the header (also available as [`Self::header`]).
    /// The tags of an authenticated stream are skipped, not checked (see
    /// [`Self::is_authenticated`] and [`Self::open_keyed`]).
    pub fn open(r: R) -> Result<(Self, StreamHeader)> {
        Self::open_keyed(r, None)
    }

    /// As [`Self::open`]; with a `key`, the stream must be authenticated with it: the
    /// header's tag is checked here and every record's before the record is returned, so no
    /// byte that the key did not authenticate reaches a device.
    pub fn open_keyed(mut r: R, key: Option<Arc<dyn StreamAuth>>) -> Result<(Self, StreamHeader)> {
        let mut count = 0u64;
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_header_part(&mut r, &mut fixed, &mut count)?;
        let devices = check_header_fixed(&fixed)?;
        let mut raw = Vec::with_capacity(HEADER_FIXED_LEN + devices * DESCRIPTOR_FIXED_LEN + 64);
        raw.extend_from_slice(&fixed);
        for i in 0..devices {
            let mut d = [0u8; DESCRIPTOR_FIXED_LEN];
            read_header_part(&mut r, &mut d, &mut count)?;
            raw.extend_from_slice(&d);
            let model_len = check_descriptor_fixed(&d, i)?;
            let mut model = [0u8; MAX_MODEL_LEN];
            let model = model.get_mut(..model_len).unwrap_or_default();
            read_header_part(&mut r, model, &mut count)?;
            raw.extend_from_slice(model);
        }
        let mut crc = [0u8; CRC_LEN];
        read_header_part(&mut r, &mut crc, &mut count)?;
        raw.extend_from_slice(&crc);
        let (header, _) = StreamHeader::decode(&raw)?;
        let authenticated = header_flags(&fixed) & HEADER_FLAG_AUTHENTICATED != 0;
        if authenticated {
            let mut tag = [0u8; TAG_LEN];
            read_header_part(&mut r, &mut tag, &mut count)?;
            if let Some(k) = &key {
                if !k.header_ok(&raw, &tag) {
                    return Err(Error::stream(
                        "stream header",
                        "authentication failed: the header's tag does not match the key (a \
                         forged or altered stream, or another key)",
                    ));
                }
            }
            raw.extend_from_slice(&tag);
        } else if key.is_some() {
            return Err(Error::stream(
                "stream header",
                "the stream is not authenticated, but a key was given: refusing it (it may \
                 have been forged, or saved without --key-file)",
            ));
        }
        let reader = StreamReader {
            r,
            header_bytes: raw,
            check: RecordCheck::new(header.clone(), authenticated, key),
            buf: Vec::new(),
            bytes_read: count,
        };
        Ok((reader, header))
    }

    /// The stream header.
    pub fn header(&self) -> &StreamHeader {
        &self.check.header
    }

    /// The header's bytes as they were read, its tag included: what a
    /// [`Destination`](crate::Destination) that checks the stream's tags must be given first
    /// when this reader took the header and the destination the records.
    pub fn header_bytes(&self) -> &[u8] {
        &self.header_bytes
    }

    /// The key this reader checks the stream's tags with (see [`Self::open_keyed`]).
    pub fn key(&self) -> Option<Arc<dyn StreamAuth>> {
        self.check.key.clone()
    }

    /// Whether the stream carries authentication tags (they are checked only when the
    /// reader was opened with a key).
    pub fn is_authenticated(&self) -> bool {
        self.check.authenticated
    }

    /// Whether the tags were checked against a key.
    pub fn is_verified(&self) -> bool {
        self.check.key.is_some()
    }

    /// Bytes consumed so far (header and records), for progress reporting.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Records returned so far (the trailer included once it was read). Before the trailer,
    /// this is also the next record's sequence number.
    pub fn records_read(&self) -> u64 {
        self.check.records_read()
    }

    /// Reads, checks and returns the next record.
    ///
    /// Errors name the record's sequence number ("read stream record 17: ..."). EOF before
    /// the trailer is a "truncated stream" error naming the last good record.
    pub fn next_record(&mut self) -> Result<Record<'_>> {
        self.check.check_open()?;
        let decoded = self.read_record();
        Ok(self.check.note(decoded)?.into_record(&self.buf))
    }

    /// Exchanges the reader's record buffer for `buf` and returns the old one, whose first
    /// bytes are the payload of the DATA record [`next_record`](Self::next_record) just
    /// returned. A demultiplexer hands that buffer to another thread instead of copying the
    /// payload out; the reader reuses `buf` (grown to a record's size when needed), so a
    /// caller that recycles the buffers it gets back allocates nothing in the steady state.
    pub fn swap_buffer(&mut self, buf: Vec<u8>) -> Vec<u8> {
        std::mem::replace(&mut self.buf, buf)
    }

    /// Reads the next record's header, payload and tag, and checks them.
    fn read_record(&mut self) -> Result<Decoded> {
        let seq = self.check.next_sequence();
        let step = || format!("read stream record {seq}");
        let err = |detail: String| Error::stream(step(), detail);
        let last_good = if seq == 0 {
            "no record was read after the header".to_owned()
        } else {
            format!("the last good record is {}", seq - 1)
        };
        let mut head = [0u8; RECORD_HEADER_LEN];
        let n = read_full(&mut self.r, &mut head, &mut self.bytes_read)
            .map_err(|e| Error::transport(step(), e))?;
        if n == 0 {
            return Err(err(format!(
                "truncated stream: it ends before the trailer; {last_good}"
            )));
        }
        if n < RECORD_HEADER_LEN {
            return Err(err(format!(
                "truncated stream: the record header ends after {n} of {RECORD_HEADER_LEN} bytes; {last_good}"
            )));
        }
        let raw = RawRecordHeader::new(head);
        // Bounded by MAX_FRAGMENT before anything is allocated or read.
        let len = raw
            .checked_payload_len(self.check.header.devices.len())
            .map_err(err)?;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let payload = self.buf.get_mut(..len).unwrap_or_default();
        let got = read_full(&mut self.r, payload, &mut self.bytes_read)
            .map_err(|e| Error::transport(step(), e))?;
        if got < len {
            return Err(err(format!(
                "truncated stream: the payload ends after {got} of {len} bytes; {last_good}"
            )));
        }
        let mut tag = [0u8; TAG_LEN];
        if self.check.authenticated {
            let got = read_full(&mut self.r, &mut tag, &mut self.bytes_read)
                .map_err(|e| Error::transport(step(), e))?;
            if got < TAG_LEN {
                return Err(err(format!(
                    "truncated stream: the record's tag ends after {got} of {TAG_LEN} bytes; \
                     {last_good}"
                )));
            }
        }
        let tag = self.check.authenticated.then_some(&tag);
        let payload = self.buf.get(..len).unwrap_or_default();
        self.check.check(&raw, payload, tag, None)
    }

    /// Checks that the trailer was read and that nothing follows it (EOF). Fails before the
    /// trailer, after an earlier error, or if bytes follow the trailer.
    pub fn finish(&mut self) -> Result<()> {
        match self.check.state {
            State::Ended => {}
            State::Records => {
                return Err(Error::stream(
                    "stream end",
                    format!(
                        "finish before the trailer (after {} records)",
                        self.check.next_sequence()
                    ),
                ))
            }
            State::Failed => {
                return Err(Error::stream(
                    "stream end",
                    "an earlier error left the stream at an unknown position",
                ))
            }
        }
        let mut probe = [0u8; 1];
        loop {
            match self.r.read(&mut probe) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    self.check.state = State::Failed;
                    return Err(Error::stream(
                        "stream end",
                        format!(
                            "trailing bytes after the trailer (at offset {})",
                            self.bytes_read
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::transport("read stream end", e)),
            }
        }
    }

    /// The transport, positioned after the last byte read. Reading from it before the
    /// trailer desynchronizes the stream: use it after [`Record::End`] only (the session
    /// handshake reads its COMMIT there).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }

    /// The transport, positioned after the last byte read.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The transport and the checks, for a decoder that goes on from the header in memory.
    pub(crate) fn into_parts(self) -> (R, RecordCheck) {
        (self.r, self.check)
    }
}

/// Statistics of one phase of one device, from [`verify`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct PhaseSummary {
    /// DATA records.
    pub data_records: u64,
    /// Data bytes.
    pub bytes: u64,
    /// Chunks closed in this phase.
    pub chunks: u64,
    /// Size of the largest chunk (for v1, the largest `data_size` transaction).
    pub largest_chunk: u64,
}

/// Statistics of one device, from [`verify`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceSummary {
    /// Pre-copy data.
    pub pre_copy: PhaseSummary,
    /// Stop-copy data.
    pub stop_copy: PhaseSummary,
}

/// The authentication of a stream, as [`verify_keyed`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum Authentication {
    /// No tags: anybody could have written or changed it (its CRCs only catch accidents).
    None,
    /// Tags present but not checked (no key given).
    NotChecked,
    /// Every tag checked against the key.
    Verified,
}

impl std::fmt::Display for Authentication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authentication::None => "not authenticated",
            Authentication::NotChecked => "authenticated (HMAC-SHA256), not checked: no key given",
            Authentication::Verified => "authenticated (HMAC-SHA256), verified with the key",
        })
    }
}

/// What [`verify`] found in a valid stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StreamSummary {
    /// The stream format version.
    pub format_version: u16,
    /// Whether the stream is authenticated, and whether its tags were checked.
    pub authentication: Authentication,
    /// The header.
    pub header: StreamHeader,
    /// Length of the header in bytes.
    pub header_bytes: u64,
    /// Length of the whole stream in bytes.
    pub total_bytes: u64,
    /// Per-device statistics, in header order.
    pub devices: Vec<DeviceSummary>,
    /// The totals carried by the trailer (checked against the records).
    pub totals: Totals,
}

impl std::fmt::Display for StreamSummary {
    /// A human-readable report, one line per item, for `inspect`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.header;
        let session: String = h.session_id.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "vfio-mig stream, format version {}", self.format_version)?;
        writeln!(f, "{}", self.authentication)?;
        writeln!(f, "session {session}, epoch {}", h.epoch)?;
        writeln!(
            f,
            "{} bytes: header {} bytes, {} records and the trailer",
            self.total_bytes, self.header_bytes, self.totals.records
        )?;
        for (i, (d, s)) in h.devices.iter().zip(&self.devices).enumerate() {
            writeln!(
                f,
                "device {i}: {}, {}, {}, migration flags {:#x}",
                d.model,
                d.protocol,
                if d.live { "live" } else { "not live" },
                d.migration_flags
            )?;
            for (name, p) in [("pre-copy", &s.pre_copy), ("stop-copy", &s.stop_copy)] {
                if name == "pre-copy" && !d.live {
                    continue;
                }
                writeln!(
                    f,
                    "  {name}: {} DATA records, {} bytes, {} chunks (largest {})",
                    p.data_records, p.bytes, p.chunks, p.largest_chunk
                )?;
            }
        }
        Ok(())
    }
}

/// Reads and checks a whole stream without a device (for `inspect`): header, every record's
/// CRC and ordering, the trailer, and EOF after it.
pub fn verify<R: Read>(r: R) -> Result<StreamSummary> {
    verify_keyed(r, None)
}

/// As [`verify`]; with a `key`, the stream must also be authenticated with it.
pub fn verify_keyed<R: Read>(r: R, key: Option<Arc<dyn StreamAuth>>) -> Result<StreamSummary> {
    let (mut reader, header) = StreamReader::open_keyed(r, key)?;
    let header_bytes = reader.bytes_read();
    let mut devices = vec![DeviceSummary::default(); header.devices.len()];
    let mut open_chunk = vec![0u64; header.devices.len()];
    let totals = loop {
        match reader.next_record()? {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                let i = usize::from(device);
                let (Some(d), Some(open)) = (devices.get_mut(i), open_chunk.get_mut(i)) else {
                    continue;
                };
                let p = match phase {
                    Phase::PreCopy => &mut d.pre_copy,
                    Phase::StopCopy => &mut d.stop_copy,
                };
                p.data_records += 1;
                p.bytes += bytes.len() as u64;
                *open += bytes.len() as u64;
                if chunk_end {
                    p.chunks += 1;
                    p.largest_chunk = p.largest_chunk.max(*open);
                    *open = 0;
                }
            }
            Record::EndOfPhase { .. } => {}
            Record::End(totals) => break totals,
        }
    };
    let total_bytes = reader.bytes_read();
    reader.finish()?;
    Ok(StreamSummary {
        format_version: FORMAT_VERSION,
        authentication: match (reader.is_authenticated(), reader.is_verified()) {
            (false, _) => Authentication::None,
            (true, false) => Authentication::NotChecked,
            (true, true) => Authentication::Verified,
        },
        header,
        header_bytes,
        total_bytes,
        devices,
        totals,
    })
}

#[cfg(test)]
mod tests {
    use super::super::format::tests::{header, raw_record};
    use super::super::format::{trailer_len, MAX_FRAGMENT};
    use super::super::StreamWriter;
    use super::*;
    use proptest::prelude::*;

    /// An owned copy of a record.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Owned {
        Data(u16, Phase, Vec<u8>, bool),
        End(u16, Phase),
        Trailer(Totals),
    }

    /// Reads a whole stream, `finish` included.
    fn read_all(r: impl Read) -> Result<(StreamHeader, Vec<Owned>)> {
        let (mut reader, header) = StreamReader::open(r)?;
        let mut out = Vec::new();
        loop {
            match reader.next_record()? {
                Record::Data {
                    device,
                    phase,
                    bytes,
                    chunk_end,
                } => out.push(Owned::Data(device, phase, bytes.to_vec(), chunk_end)),
                Record::EndOfPhase { device, phase } => out.push(Owned::End(device, phase)),
                Record::End(t) => {
                    out.push(Owned::Trailer(t));
                    break;
                }
            }
        }
        reader.finish()?;
        Ok((header, out))
    }

    fn err_of(bytes: &[u8]) -> String {
        match read_all(bytes) {
            Ok(r) => panic!("stream accepted: {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A small valid stream: device 0 LIVE, device 1 not.
    fn small_stream() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), &header(2, |i| i == 0)).unwrap();
        w.data(0, Phase::PreCopy, b"pre", false).unwrap();
        w.data(1, Phase::StopCopy, b"b", true).unwrap();
        w.data(0, Phase::PreCopy, b"!", true).unwrap();
        w.end_phase(0, Phase::PreCopy).unwrap();
        w.data(0, Phase::StopCopy, b"stop", true).unwrap();
        w.end_phase(0, Phase::StopCopy).unwrap();
        w.end_phase(1, Phase::StopCopy).unwrap();
        w.finish().unwrap().0
    }

    /// Header bytes of `header(n, live)`.
    fn head(n: usize, live: impl Fn(usize) -> bool) -> Vec<u8> {
        header(n, live).encode().unwrap()
    }

    /// Concatenates a header and records.
    fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
        parts.concat()
    }

    fn trailer(seq: u64, t: &Totals) -> Vec<u8> {
        raw_record(3, 0, 0, 0, seq, &t.encode())
    }

    #[test]
    fn round_trip_multi_device_live() {
        let h = header(3, |i| i != 1);
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        let big: Vec<u8> = (0..2 * MAX_FRAGMENT + 3).map(|i| (i * 7) as u8).collect();
        w.data(0, Phase::PreCopy, &big[..10], true).unwrap();
        w.data(2, Phase::PreCopy, &big[..MAX_FRAGMENT], false)
            .unwrap();
        w.data(2, Phase::PreCopy, &big[..1], true).unwrap();
        w.end_phase(0, Phase::PreCopy).unwrap();
        w.data(1, Phase::StopCopy, &big, true).unwrap();
        w.end_phase(2, Phase::PreCopy).unwrap();
        w.data(0, Phase::StopCopy, &big[5..MAX_FRAGMENT + 5], true)
            .unwrap();
        for d in 0..3 {
            w.end_phase(d, Phase::StopCopy).unwrap();
        }
        let written = w.bytes_written();
        let (bytes, totals) = w.finish().unwrap();
        assert_eq!(
            written + (RECORD_HEADER_LEN + trailer_len(3)) as u64,
            bytes.len() as u64
        );

        let (back, records) = read_all(bytes.as_slice()).unwrap();
        assert_eq!(back, h);
        use Owned::*;
        use Phase::*;
        let m = MAX_FRAGMENT;
        let expected = vec![
            Data(0, PreCopy, big[..10].to_vec(), true),
            Data(2, PreCopy, big[..m].to_vec(), false),
            Data(2, PreCopy, big[..1].to_vec(), true),
            End(0, PreCopy),
            Data(1, StopCopy, big[..m].to_vec(), false),
            Data(1, StopCopy, big[m..2 * m].to_vec(), false),
            Data(1, StopCopy, big[2 * m..].to_vec(), true),
            End(2, PreCopy),
            Data(0, StopCopy, big[5..m + 5].to_vec(), true),
            End(0, StopCopy),
            End(1, StopCopy),
            End(2, StopCopy),
            Trailer(totals.clone()),
        ];
        assert_eq!(records, expected);
        assert_eq!(totals.records, 12);
        assert_eq!(totals.devices[1].stop_copy_bytes, big.len() as u64);
        assert_eq!(totals.devices[2].chunks, 1);

        let summary = verify(bytes.as_slice()).unwrap();
        assert_eq!(summary.total_bytes, bytes.len() as u64);
        assert_eq!(summary.devices[1].stop_copy.data_records, 3);
        assert_eq!(summary.devices[1].stop_copy.largest_chunk, big.len() as u64);
        assert_eq!(summary.devices[2].pre_copy.largest_chunk, m as u64 + 1);
        assert_eq!(summary.totals, totals);
        let text = summary.to_string();
        assert!(
            text.contains("device 1: mock:v1, v1 (migration region), not live"),
            "{text}"
        );
        assert!(
            text.contains("stop-copy: 3 DATA records, 2097155 bytes, 1 chunks (largest 2097155)"),
            "{text}"
        );
    }

    #[test]
    fn truncation_at_every_offset() {
        let bytes = small_stream();
        read_all(bytes.as_slice()).unwrap();
        for cut in 0..bytes.len() {
            let e = err_of(&bytes[..cut]);
            assert!(e.contains("truncated stream"), "cut {cut}: {e}");
        }
        let header_len = head(2, |i| i == 0).len();
        let e = err_of(&bytes[..header_len + 24 + 3 + 1]);
        assert!(
            e.starts_with("read stream record 1: truncated") && e.contains("last good record is 0"),
            "{e}"
        );
        let e = err_of(&bytes[..header_len]);
        assert!(e.contains("no record was read"), "{e}");
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = small_stream();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    read_all(b.as_slice()).is_err(),
                    "flip of byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn sequence_errors() {
        let h = head(1, |_| false);
        let d0 = raw_record(1, 1, 0, 2, 0, b"a");
        let d1 = raw_record(1, 1, 0, 2, 1, b"b");
        let d1_as_0 = raw_record(1, 1, 0, 2, 0, b"b");
        let d2 = raw_record(1, 1, 0, 2, 2, b"c");
        let d0_as_1 = raw_record(1, 1, 0, 2, 1, b"a");

        let e = err_of(&cat(&[h.clone(), d0.clone(), d1_as_0]));
        assert!(
            e.contains("read stream record 1: out of sequence: expected sequence number 1, got 0 (duplicate"),
            "{e}"
        );
        let e = err_of(&cat(&[h.clone(), d0.clone(), d2.clone()]));
        assert!(
            e.contains("expected sequence number 1, got 2 (missing"),
            "{e}"
        );
        let e = err_of(&cat(&[h.clone(), d1.clone(), d0_as_1]));
        assert!(
            e.contains("record 0: out of sequence: expected sequence number 0, got 1"),
            "{e}"
        );
        // The same record twice, byte for byte.
        let e = err_of(&cat(&[h.clone(), d0.clone(), d0.clone()]));
        assert!(e.contains("expected sequence number 1, got 0"), "{e}");
    }

    #[test]
    fn oversized_length_refused_before_reading_or_allocating() {
        let h = head(1, |_| false);
        for len in [MAX_FRAGMENT as u32 + 1, u32::MAX] {
            let mut rec = raw_record(1, 1, 0, 2, 0, b"");
            rec[16..20].copy_from_slice(&len.to_le_bytes());
            // An endless supply of payload: reading it would never end.
            let src = cat(&[h.clone(), rec]);
            let (mut reader, _) = StreamReader::open(src.as_slice().chain(io::repeat(0))).unwrap();
            let e = reader.next_record().unwrap_err().to_string();
            assert!(
                e.contains(&format!("DATA record with payload length {len}")),
                "{e}"
            );
            assert_eq!(reader.bytes_read(), (h.len() + RECORD_HEADER_LEN) as u64);
            assert_eq!(reader.buf.capacity(), 0);
        }
        // Wrong lengths of the other kinds.
        let e = err_of(&cat(&[h.clone(), raw_record(2, 0, 0, 2, 0, b"x")]));
        assert!(
            e.contains("END_OF_PHASE record with payload length 1"),
            "{e}"
        );
        let e = err_of(&cat(&[h.clone(), raw_record(3, 0, 0, 0, 0, &[0; 8])]));
        assert!(
            e.contains("TRAILER record with payload length 8 (allowed: 32"),
            "{e}"
        );
    }

    #[test]
    fn bad_headers() {
        let good = small_stream();
        let mut b = good.clone();
        b[..8].copy_from_slice(b"QEVM\0\0\0\x03");
        assert!(err_of(&b).contains("stream header: not a vfio-mig stream"));
        let mut b = good.clone();
        b[8] = 9;
        assert!(err_of(&b).contains("unsupported stream format version 9"));
        let mut hb = head(1, |_| false);
        hb[HEADER_FIXED_LEN] = 7;
        super::super::format::tests::fix_header_crc(&mut hb);
        assert!(err_of(&hb).contains("device 0: unknown protocol 7"));
        assert!(err_of(b"").contains("no data at all"));
    }

    #[test]
    fn record_field_errors() {
        let h = head(2, |i| i == 0);
        let cases: [(Vec<u8>, &str); 7] = [
            (raw_record(9, 0, 0, 2, 0, b""), "unknown record kind 9"),
            (
                raw_record(1, 2, 0, 2, 0, b"a"),
                "DATA record with unknown flags 0x02",
            ),
            (
                raw_record(2, 1, 0, 2, 0, b""),
                "END_OF_PHASE record with unknown flags 0x01",
            ),
            (
                raw_record(1, 1, 2, 2, 0, b"a"),
                "DATA record for device 2, but the stream has 2",
            ),
            (raw_record(1, 1, 0, 3, 0, b"a"), "unknown phase 3"),
            (raw_record(1, 1, 0, 0, 0, b"a"), "unknown phase 0"),
            (
                raw_record(3, 0, 1, 0, 0, &[0; 56]),
                "TRAILER record with device 1 and phase 0",
            ),
        ];
        for (rec, want) in cases {
            let e = err_of(&cat(&[h.clone(), rec]));
            assert!(e.contains(want), "want {want:?}, got {e}");
        }
        let mut rec = raw_record(1, 1, 0, 1, 0, b"a");
        rec[6] = 1;
        // Fix the CRC over the changed reserved byte.
        let crc = super::super::format::record_crc(
            &super::super::format::tests::TEST_SESSION,
            &rec[..24],
            b"a",
        );
        rec[20..24].copy_from_slice(&crc.to_le_bytes());
        assert!(err_of(&cat(&[h.clone(), rec])).contains("non-zero reserved"));
    }

    #[test]
    fn ordering_errors() {
        let h = head(2, |i| i == 0);
        let pre = |seq, dev, end| raw_record(1, end, dev, 1, seq, b"p");
        let stop = |seq, dev, end| raw_record(1, end, dev, 2, seq, b"s");
        let eop = |seq, dev, phase| raw_record(2, 0, dev, phase, seq, b"");
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (
                vec![pre(0, 1, 1)],
                "record 0: device 1: pre-copy DATA for a device not marked LIVE",
            ),
            (
                vec![eop(0, 1, 1)],
                "END_OF_PHASE(pre-copy) for a device not marked LIVE",
            ),
            (
                vec![stop(0, 0, 1)],
                "stop-copy DATA before END_OF_PHASE(pre-copy)",
            ),
            (
                vec![eop(0, 0, 2)],
                "END_OF_PHASE(stop-copy) before END_OF_PHASE(pre-copy)",
            ),
            (
                vec![pre(0, 0, 0), eop(1, 0, 1)],
                "record 1: device 0: END_OF_PHASE(pre-copy) while a chunk is open",
            ),
            (
                vec![stop(0, 1, 1), stop(1, 1, 0), eop(2, 1, 2)],
                "record 2: device 1: END_OF_PHASE(stop-copy) while a chunk is open",
            ),
            (
                vec![eop(0, 0, 1), stop(1, 0, 1), pre(2, 0, 1)],
                "record 2: device 0: pre-copy DATA after the device started stop-copy",
            ),
            (
                vec![eop(0, 0, 1), eop(1, 0, 1)],
                "record 1: device 0: pre-copy already ended",
            ),
            (
                vec![eop(0, 1, 2), stop(1, 1, 1)],
                "record 1: device 1: stop-copy DATA after the device ended stop-copy",
            ),
            (vec![eop(0, 1, 2), eop(1, 1, 2)], "stop-copy already ended"),
            (
                vec![eop(0, 1, 2), trailer(1, &Totals::new(2))],
                "record 1: TRAILER before device 0 ended stop-copy",
            ),
        ];
        for (records, want) in cases {
            let mut parts = vec![h.clone()];
            parts.extend(records);
            let e = err_of(&cat(&parts));
            assert!(e.contains(want), "want {want:?}, got {e}");
        }
    }

    #[test]
    fn trailer_totals_mismatch() {
        let h = head(1, |_| false);
        let recs = [
            raw_record(1, 1, 0, 2, 0, b"abc"),
            raw_record(2, 0, 0, 2, 1, b""),
        ];
        let mut t = Totals::new(1);
        t.records = 2;
        t.devices[0].stop_copy_bytes = 3;
        t.devices[0].chunks = 1;
        let ok = cat(&[h.clone(), recs.concat(), trailer(2, &t)]);
        read_all(ok.as_slice()).unwrap();

        let mut bad = t.clone();
        bad.devices[0].stop_copy_bytes = 4;
        let e = err_of(&cat(&[h.clone(), recs.concat(), trailer(2, &bad)]));
        assert!(
            e.contains("record 2: trailer totals do not match the stream: device 0: trailer says 4 stop-copy bytes, the stream has 3"),
            "{e}"
        );
        let mut bad = t.clone();
        bad.records = 3;
        let e = err_of(&cat(&[h.clone(), recs.concat(), trailer(2, &bad)]));
        assert!(
            e.contains("trailer says 3 records, the stream has 2"),
            "{e}"
        );
        let mut bad = t.clone();
        bad.devices[0].chunks = 0;
        assert!(err_of(&cat(&[h.clone(), recs.concat(), trailer(2, &bad)])).contains("chunks"));
    }

    #[test]
    fn trailing_garbage_and_misuse() {
        let mut b = small_stream();
        b.push(0);
        let e = err_of(&b);
        assert!(
            e.contains("stream end: trailing bytes after the trailer"),
            "{e}"
        );

        let b = small_stream();
        let (mut reader, _) = StreamReader::open(b.as_slice()).unwrap();
        reader.next_record().unwrap();
        let e = reader.finish().unwrap_err().to_string();
        assert!(
            e.contains("finish before the trailer (after 1 records)"),
            "{e}"
        );
        let (mut reader, _) = StreamReader::open(b.as_slice()).unwrap();
        while !matches!(reader.next_record().unwrap(), Record::End(_)) {}
        assert_eq!(reader.records_read(), 8);
        assert_eq!(reader.bytes_read(), b.len() as u64);
        assert!(reader
            .next_record()
            .unwrap_err()
            .to_string()
            .contains("already ended"));
        reader.finish().unwrap();
        assert!(reader.into_inner().is_empty());

        // Errors are sticky.
        let mut b = small_stream();
        let last = b.len() - 1;
        b[last] ^= 0x10;
        let (mut reader, _) = StreamReader::open(b.as_slice()).unwrap();
        let e = loop {
            if let Err(e) = reader.next_record() {
                break e.to_string();
            }
        };
        assert!(e.contains("record 7: CRC mismatch"), "{e}");
        assert!(reader
            .next_record()
            .unwrap_err()
            .to_string()
            .contains("unknown position"));
        assert!(reader.finish().is_err());
    }

    /// Returns at most 3 bytes per read, and `Interrupted` every other call.
    struct Trickle<'a> {
        data: &'a [u8],
        interrupt: bool,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            let n = buf.len().min(3).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn short_and_interrupted_reads() {
        let b = small_stream();
        let expected = read_all(b.as_slice()).unwrap();
        let got = read_all(Trickle {
            data: &b,
            interrupt: false,
        })
        .unwrap();
        assert_eq!(got, expected);
    }

    #[test]
    fn transport_errors_name_the_step() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("link down"))
            }
        }
        let b = small_stream();
        let header_len = head(2, |i| i == 0).len();
        let (mut reader, _) = StreamReader::open(b[..header_len].chain(Broken)).unwrap();
        let e = reader.next_record().unwrap_err();
        assert!(matches!(e, Error::Transport { .. }));
        assert_eq!(e.to_string(), "read stream record 0");
        assert_eq!(
            crate::error::Report(&e).to_string(),
            "read stream record 0: link down"
        );
        let e = StreamReader::open(Broken).unwrap_err();
        assert_eq!(
            crate::error::Report(&e).to_string(),
            "read stream header: link down"
        );
    }

    /// One device's plan: chunks of pre-copy data (if LIVE) and of stop-copy data, each chunk
    /// passed to `data` in the given pieces.
    #[derive(Debug, Clone)]
    struct DevicePlan {
        live: bool,
        pre: Vec<Vec<usize>>,
        stop: Vec<Vec<usize>>,
    }

    fn device_plan() -> impl Strategy<Value = DevicePlan> {
        let chunks = prop::collection::vec(prop::collection::vec(1usize..200, 1..4), 0..4);
        (any::<bool>(), chunks.clone(), chunks).prop_map(|(live, pre, stop)| DevicePlan {
            live,
            pre: if live { pre } else { Vec::new() },
            stop,
        })
    }

    /// The operations of one device, in order: (phase, Some(piece sizes) | None = end phase).
    fn device_ops(p: &DevicePlan) -> Vec<(Phase, Option<Vec<usize>>)> {
        let mut ops = Vec::new();
        if p.live {
            ops.extend(p.pre.iter().map(|c| (Phase::PreCopy, Some(c.clone()))));
            ops.push((Phase::PreCopy, None));
        }
        ops.extend(p.stop.iter().map(|c| (Phase::StopCopy, Some(c.clone()))));
        ops.push((Phase::StopCopy, None));
        ops
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn prop_round_trip(
            plans in prop::collection::vec(device_plan(), 1..4),
            fragment in 1usize..64,
            schedule in prop::collection::vec(any::<prop::sample::Index>(), 0..64),
            seed in any::<u8>(),
        ) {
            let h = StreamHeader {
                session_id: [seed; 16],
                epoch: u64::from(seed),
                devices: plans.iter().enumerate().map(|(i, p)| super::super::DeviceDescriptor {
                    protocol: super::super::format::Protocol::V2,
                    live: p.live,
                    migration_flags: 0,
                    model: format!("mock:{i}"),
                }).collect(),
            };
            let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
            w.set_fragment_limit(fragment);
            let mut ops: Vec<_> = plans.iter().map(|p| device_ops(p).into_iter()).collect();
            // Expected chunks per device and phase.
            let mut expected = vec![(Vec::new(), Vec::new()); plans.len()];
            let mut counter = seed;
            let mut apply = |w: &mut StreamWriter<Vec<u8>>, dev: usize, op: (Phase, Option<Vec<usize>>)| {
                match op {
                    (phase, Some(pieces)) => {
                        let mut chunk = Vec::new();
                        for (k, len) in pieces.iter().enumerate() {
                            let piece: Vec<u8> = (0..*len).map(|_| { counter = counter.wrapping_add(31); counter }).collect();
                            w.data(dev as u16, phase, &piece, k + 1 == pieces.len()).unwrap();
                            chunk.extend(piece);
                        }
                        let e: &mut (Vec<Vec<u8>>, Vec<Vec<u8>>) = &mut expected[dev];
                        if phase == Phase::PreCopy { e.0.push(chunk) } else { e.1.push(chunk) }
                    }
                    (phase, None) => w.end_phase(dev as u16, phase).unwrap(),
                }
            };
            // Interleave devices following the schedule, then drain in order.
            for pick in &schedule {
                let dev = pick.index(plans.len());
                if let Some(op) = ops[dev].next() { apply(&mut w, dev, op); }
            }
            for (dev, rest) in ops.iter_mut().enumerate() {
                for op in rest { apply(&mut w, dev, op); }
            }
            let (bytes, totals) = w.finish().unwrap();

            let (mut reader, back) = StreamReader::open(bytes.as_slice()).unwrap();
            prop_assert_eq!(reader.header(), &h);
            prop_assert_eq!(&back, &h);
            let mut got = vec![(Vec::new(), Vec::new()); plans.len()];
            let mut open: Vec<Vec<u8>> = vec![Vec::new(); plans.len()];
            let end = loop {
                match reader.next_record().unwrap() {
                    Record::Data { device, phase, bytes, chunk_end } => {
                        prop_assert!(bytes.len() <= fragment);
                        let d = usize::from(device);
                        open[d].extend_from_slice(bytes);
                        if chunk_end {
                            let c = std::mem::take(&mut open[d]);
                            let g: &mut (Vec<Vec<u8>>, Vec<Vec<u8>>) = &mut got[d];
                            if phase == Phase::PreCopy { g.0.push(c) } else { g.1.push(c) }
                        }
                    }
                    Record::EndOfPhase { device, .. } => prop_assert!(open[usize::from(device)].is_empty()),
                    Record::End(t) => break t,
                }
            };
            prop_assert_eq!(reader.bytes_read(), bytes.len() as u64);
            reader.finish().unwrap();
            prop_assert_eq!(&end, &totals);
            prop_assert_eq!(got, expected);
            let summary = verify(bytes.as_slice()).unwrap();
            prop_assert_eq!(summary.totals, totals);
        }

        #[test]
        fn prop_garbage_never_panics(tail in prop::collection::vec(any::<u8>(), 0..256), cut in 0usize..400) {
            // A valid header followed by garbage, and a valid stream cut and mutated.
            let mut b = head(2, |i| i == 0);
            b.extend_from_slice(&tail);
            prop_assert!(read_all(b.as_slice()).is_err());
            let mut s = small_stream();
            let at = cut % s.len();
            s[at] = s[at].wrapping_add(tail.first().copied().unwrap_or(1).max(1));
            prop_assert!(read_all(s.as_slice()).is_err());
        }
    }
}
