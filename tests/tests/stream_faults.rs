// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A destination fed a damaged stream: truncated at and between every record boundary, bit
//! flips, oversized lengths, another device's identity, duplicate, missing and reordered
//! records. Each must be refused with a clear one-line error, never a panic, and the
//! destination must be left reset, never running with partial state.

use std::io::{self, Read};

use proptest::prelude::*;
use vfio_mig::backend::v1_state::V1State;
use vfio_mig::{
    wire::DeviceDescriptor, wire::StreamHeader, wire::StreamReader, wire::MAX_FRAGMENT, Protocol,
};
use vfio_mig::{PreCopyPolicy, SaveOptions};
use vfio_mig_mock::MockStatus;
use vfio_mig_tests::StatusExt;
use vfio_mig_tests::{assert_destination_safe, handle, load_from_slice, mock, save_to_vec};

/// The record layout as docs/stream-format.md ("Records") gives it, not as the code under
/// test encodes it: a 24-byte record header whose first byte is the kind.
const RECORD_HEADER_LEN: usize = 24;
/// Record kind DATA.
const KIND_DATA: u8 = 1;
/// Record kind END_OF_PHASE.
const KIND_END_OF_PHASE: u8 = 2;

const SPEC: &str = "mock:v1,size=12K,seed=21,chunk=2K,page=1K";

fn live() -> SaveOptions {
    SaveOptions {
        live: true,
        policy: PreCopyPolicy {
            max_rounds: 2,
            ..Default::default()
        },
        buffer: 4096,
        ..Default::default()
    }
}

/// A live stream of [`SPEC`].
fn stream() -> Vec<u8> {
    let mut src = mock(SPEC);
    save_to_vec(&mut src, &live()).unwrap().0
}

/// One record of a stream, by offset.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
}

/// The header length and the records of a valid stream.
fn records(bytes: &[u8]) -> (usize, Vec<Span>) {
    let (_, header_len) = StreamHeader::decode(bytes).unwrap();
    let mut out = Vec::new();
    let mut at = header_len;
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().unwrap()) as usize;
        out.push(Span {
            start: at,
            len: RECORD_HEADER_LEN + len,
        });
        at += RECORD_HEADER_LEN + len;
    }
    assert_eq!(at, bytes.len());
    (header_len, out)
}

/// Loads `bytes` into a fresh destination: the error text and the destination's status.
fn load_fails(bytes: &[u8], context: &str) -> (String, MockStatus) {
    let mut dst = mock(SPEC);
    let err = match load_from_slice(&mut dst, bytes) {
        Ok(r) => panic!("{context}: a damaged stream loaded: {r:?}"),
        Err(e) => vfio_mig::error::Report(&e).to_string(),
    };
    assert!(!err.contains('\n'), "{context}: not one line: {err}");
    let st = handle(&dst).status();
    assert_destination_safe(&st, context);
    (err, st)
}

/// Re-encodes record `span` of `bytes` with `sequence`, keeping its CRC valid: the sequence
/// number at record bytes 8..16, the CRC at 20..24 over the stream's session id (header bytes
/// 12..28), the record's bytes 0..20 and its payload (docs/stream-format.md, "Records").
fn renumber(bytes: &[u8], span: Span, sequence: u64) -> Vec<u8> {
    let mut out = bytes[span.start..span.start + span.len].to_vec();
    out[8..16].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[12..28]);
    let crc = crc32c::crc32c_append(crc, &out[..20]);
    let crc = crc32c::crc32c_append(crc, &out[RECORD_HEADER_LEN..]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

#[test]
fn the_undamaged_stream_loads() {
    let bytes = stream();
    let mut dst = mock(SPEC);
    load_from_slice(&mut dst, &bytes).unwrap();
    assert!(handle(&dst).status().resumed_ok);
}

#[test]
fn truncation_at_every_record_boundary_and_inside_every_record_is_refused() {
    let bytes = stream();
    let (header_len, spans) = records(&bytes);
    assert!(spans.len() > 8, "{spans:?}");
    let mut cuts = vec![0, 1, 8, header_len - 1];
    for s in &spans {
        // At the boundary, inside the record header, at the payload's start, inside it and
        // one byte short of the record's end.
        cuts.extend([s.start, s.start + 1, s.start + RECORD_HEADER_LEN - 1]);
        if s.len > RECORD_HEADER_LEN {
            cuts.extend([
                s.start + RECORD_HEADER_LEN,
                s.start + RECORD_HEADER_LEN + (s.len - RECORD_HEADER_LEN) / 2,
            ]);
        }
        cuts.push(s.start + s.len - 1);
    }
    for cut in cuts {
        let (err, _) = load_fails(&bytes[..cut], &format!("cut at {cut}"));
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every corruption of one to four random bits is detected (by a CRC, a bound, the
    /// ordering rules or the trailer) before the destination runs.
    #[test]
    fn random_bit_flips_are_refused(flips in proptest::collection::vec(any::<prop::sample::Index>(), 1..5)) {
        let mut bytes = stream();
        let bits = bytes.len() * 8;
        let mut picked: Vec<usize> = flips.iter().map(|i| i.index(bits)).collect();
        picked.sort_unstable();
        picked.dedup();
        for bit in &picked {
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        load_fails(&bytes, &format!("bits {picked:?}"));
    }
}

/// A reader that counts what it hands out.
struct Counting<'a> {
    inner: &'a [u8],
    read: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n;
        Ok(n)
    }
}

#[test]
fn oversized_lengths_are_refused_before_anything_is_read_or_allocated() {
    let bytes = stream();
    let (header_len, spans) = records(&bytes);
    let first = spans[0];
    let end_phase = spans
        .iter()
        .copied()
        .find(|s| bytes[s.start] == KIND_END_OF_PHASE)
        .unwrap();
    let trailer = *spans.last().unwrap();
    let cases = [
        (first, MAX_FRAGMENT as u32 + 1, "DATA"),
        (first, u32::MAX, "DATA"),
        (end_phase, 1, "END_OF_PHASE"),
        (trailer, 1 << 30, "TRAILER"),
    ];
    for (span, len, kind) in cases {
        let mut bad = bytes.clone();
        bad[span.start + 16..span.start + 20].copy_from_slice(&len.to_le_bytes());
        // The reader stops right after the 24-byte record header.
        let mut counting = Counting {
            inner: &bad[..],
            read: 0,
        };
        let (mut reader, _) = StreamReader::open(&mut counting).unwrap();
        let err = loop {
            match reader.next_record() {
                Ok(_) => continue,
                Err(e) => break vfio_mig::error::Report(&e).to_string(),
            }
        };
        assert!(err.contains("length"), "{kind} {len}: {err}");
        drop(reader);
        assert_eq!(
            counting.read,
            span.start + RECORD_HEADER_LEN,
            "{kind} {len}"
        );
        let (err, _) = load_fails(&bad, &format!("{kind} length {len}"));
        assert!(err.contains("length"), "{err}");
    }
    // Header bounds: the device count and the model length, checked before the CRC.
    let mut bad = bytes.clone();
    bad[10..12].copy_from_slice(&65u16.to_le_bytes());
    let (err, st) = load_fails(&bad, "65 devices");
    assert!(err.contains("device count 65 out of range"), "{err}");
    assert_eq!(st.resets, 0);
    let mut bad = bytes.clone();
    bad[42..44].copy_from_slice(&300u16.to_le_bytes());
    let (err, _) = load_fails(&bad, "model length 300");
    assert!(err.contains("model length 300 out of range"), "{err}");
    assert!(header_len < 100);
}

/// `bytes` with its header replaced by `header`, encoded with a valid CRC.
fn with_header(bytes: &[u8], header: &StreamHeader) -> Vec<u8> {
    let (_, len) = StreamHeader::decode(bytes).unwrap();
    let mut out = header.encode().unwrap();
    out.extend_from_slice(&bytes[len..]);
    out
}

#[test]
fn another_device_identity_is_refused_before_the_device_is_touched() {
    let bytes = stream();
    let (header, _) = StreamHeader::decode(&bytes).unwrap();
    let other_model = StreamHeader {
        devices: vec![DeviceDescriptor {
            model: "mdev:other-gpu-1".into(),
            ..header.devices[0].clone()
        }],
        ..header.clone()
    };
    let other_protocol = StreamHeader {
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V2,
            migration_flags: 7,
            ..header.devices[0].clone()
        }],
        ..header.clone()
    };
    for (forged, expect) in [
        (
            other_model,
            "stream holds state of a mdev:other-gpu-1 device",
        ),
        (other_protocol, "stream was saved from a v2"),
    ] {
        let (err, st) = load_fails(&with_header(&bytes, &forged), expect);
        assert!(err.contains(expect), "{err}");
        // Refused before RESUMING: nothing loaded, nothing reset, still running.
        assert_eq!(
            (st.resets, st.transactions_loaded, st.v1_state()),
            (0, 0, V1State::Running),
            "{st:?}"
        );
    }
}

#[test]
fn duplicate_missing_and_reordered_records_are_refused() {
    let bytes = stream();
    let (header_len, spans) = records(&bytes);
    let rec = |i: usize| &bytes[spans[i].start..spans[i].start + spans[i].len];
    let assemble = |order: &[usize]| {
        let mut out = bytes[..header_len].to_vec();
        for &i in order {
            out.extend_from_slice(rec(i));
        }
        out
    };
    let all: Vec<usize> = (0..spans.len()).collect();
    for k in [0, 1, spans.len() / 2, spans.len() - 2] {
        // Duplicate: record k twice.
        let mut dup = all.clone();
        dup.insert(k + 1, k);
        let (err, _) = load_fails(&assemble(&dup), &format!("duplicate {k}"));
        assert!(
            err.contains(&format!(
                "expected sequence number {}, got {k} (duplicate or reordered record)",
                k + 1
            )),
            "{err}"
        );
        // Missing: record k dropped.
        let mut missing = all.clone();
        missing.remove(k);
        let (err, _) = load_fails(&assemble(&missing), &format!("missing {k}"));
        assert!(
            err.contains(&format!(
                "expected sequence number {k}, got {} (missing or reordered record)",
                k + 1
            )),
            "{err}"
        );
        // Reordered: records k and k+1 swapped.
        let mut swapped = all.clone();
        swapped.swap(k, k + 1);
        let (err, _) = load_fails(&assemble(&swapped), &format!("swap {k}"));
        assert!(err.contains("out of sequence"), "{err}");
    }
    // A duplicated DATA record renumbered so that every sequence number is right: the device
    // data is then wrong (the mock rejects a repeated transaction) or the trailer's totals
    // disagree. Either way it is refused.
    let data = (0..spans.len())
        .find(|&i| bytes[spans[i].start] == KIND_DATA && bytes[spans[i].start + 1] & 1 != 0)
        .unwrap();
    let mut out = bytes[..header_len].to_vec();
    let mut seq = 0u64;
    for (i, &span) in spans.iter().enumerate() {
        let copies = if i == data { 2 } else { 1 };
        for _ in 0..copies {
            out.extend_from_slice(&renumber(&bytes, span, seq));
            seq += 1;
        }
    }
    let (err, _) = load_fails(&out, "renumbered duplicate");
    assert!(
        err.contains("trailer totals") || err.contains("data_size"),
        "{err}"
    );
}
