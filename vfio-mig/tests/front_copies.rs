// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The front door's copies per byte. Destination: records split anywhere across pushes (a
//! header or a record header at a push's end included) load the bytes the writer wrote, a
//! corrupt record is refused before any of its bytes reach the device, and a record that
//! arrived whole in one push reaches the device from the pushed bytes themselves (no copy).
//! Source: a record leaves in one write with its header, its payload a slice of its own (the
//! device's buffer, not a staging copy).
//!
//! The oracles are the stream written by [`StreamWriter`] from known payloads and the bytes
//! the device handed out; the device is a recorder that keeps every write (its bytes, its
//! `chunk_end`, and where the bytes were) and reads out given payloads.

mod common;

use std::sync::{Arc, Mutex};

use common::recorder::{Log, Recorder, MODEL};
use vfio_mig::error::{Report, Result};
use vfio_mig::wire::{DeviceDescriptor, Phase, StreamHeader, StreamWriter};
use vfio_mig::{Destination, DestinationOptions, Protocol, Status};

/// The record header's size, from docs/stream-format.md ("a 24-byte record header").
const RECORD_HEADER_LEN: usize = 24;

/// The payloads of the test stream, one chunk each: sizes that put record boundaries at
/// many offsets, one byte and a record larger than a typical push among them.
fn payloads() -> Vec<Vec<u8>> {
    [1usize, 100, 23, 24, 25, 4096, 5000, 70_000]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n).map(|j| (j * 31 + i * 7) as u8).collect())
        .collect()
}

/// A one-device stream carrying `payloads` as stop-copy chunks.
fn stream(payloads: &[Vec<u8>]) -> Vec<u8> {
    let header = StreamHeader {
        session_id: [9; 16],
        epoch: 1,
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V2,
            live: false,
            migration_flags: 1,
            model: MODEL.into(),
        }],
    };
    let mut w = StreamWriter::new(Vec::new(), &header).unwrap();
    for p in payloads {
        w.data(0, Phase::StopCopy, p, true).unwrap();
    }
    w.end_phase(0, Phase::StopCopy).unwrap();
    w.finish().unwrap().0
}

fn destination() -> (Destination<Recorder>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let dst = Destination::new(vec![Recorder(log.clone())], &DestinationOptions::new()).unwrap();
    (dst, log)
}

/// Pushes `bytes` in pieces cut at `cuts` and returns the last status.
fn push_cut(dst: &mut Destination<Recorder>, bytes: &[u8], cuts: &[usize]) -> Result<Status> {
    let mut at = 0;
    let mut status = Status::NeedMore;
    for &cut in cuts.iter().chain(std::iter::once(&bytes.len())) {
        status = dst.push(&bytes[at..cut])?;
        at = cut;
    }
    Ok(status)
}

fn assert_loaded_exactly(log: &Log, payloads: &[Vec<u8>], what: &str) {
    let got: Vec<(&[u8], bool)> = log
        .writes
        .iter()
        .map(|(b, end, _)| (b.as_slice(), *end))
        .collect();
    let want: Vec<(&[u8], bool)> = payloads.iter().map(|p| (p.as_slice(), true)).collect();
    assert!(got == want, "{what}: the device got other writes");
    assert!(log.loaded && !log.reset, "{what}: not loaded, or reset");
}

#[test]
fn records_split_at_every_offset_load_what_was_written() {
    let payloads = payloads();
    let bytes = stream(&payloads);
    for cut in 0..=bytes.len() {
        let (mut dst, log) = destination();
        let status = push_cut(&mut dst, &bytes, &[cut]).unwrap();
        assert_eq!(status, Status::Loaded, "cut at {cut}");
        assert_loaded_exactly(&log.lock().unwrap(), &payloads, &format!("cut at {cut}"));
    }
}

#[test]
fn a_stream_pushed_in_small_pieces_loads_what_was_written() {
    let payloads = payloads();
    let bytes = stream(&payloads);
    for piece in [1, 7, 23, 24, 25, 4095, 65_536] {
        let (mut dst, log) = destination();
        let cuts: Vec<usize> = (piece..bytes.len()).step_by(piece).collect();
        assert_eq!(
            push_cut(&mut dst, &bytes, &cuts).unwrap(),
            Status::Loaded,
            "{piece}-byte pushes"
        );
        assert_loaded_exactly(
            &log.lock().unwrap(),
            &payloads,
            &format!("{piece}-byte pushes"),
        );
    }
}

#[test]
fn whole_records_reach_the_device_from_the_pushed_bytes() {
    let payloads = payloads();
    let bytes = stream(&payloads);
    let (mut dst, log) = destination();
    assert_eq!(dst.push(&bytes).unwrap(), Status::Loaded);
    let log = log.lock().unwrap();
    assert_loaded_exactly(&log, &payloads, "one push");
    let pushed = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
    for (i, (data, _, at)) in log.writes.iter().enumerate() {
        assert!(
            pushed.contains(at) && pushed.contains(&(at + data.len() - 1)),
            "record {i} ({} bytes) reached the device from a copy, not the pushed bytes",
            data.len()
        );
    }
}

/// A unit of two recorders over two channels: device `i` on channel `i`, each channel's
/// sub-stream a one-device stream of its own (as `Source::set_channels` sends them).
fn two_channel_destination() -> (Destination<Recorder>, [Arc<Mutex<Log>>; 2]) {
    let logs = [0, 1].map(|_| Arc::new(Mutex::new(Log::default())));
    let devs = logs.iter().map(|l| Recorder(l.clone())).collect();
    let mut dst = Destination::new(devs, &DestinationOptions::new()).unwrap();
    dst.set_channels(2).unwrap();
    (dst, logs)
}

#[test]
fn two_channels_pushed_in_interleaved_pieces_load_what_was_written() {
    let payloads = payloads();
    let bytes = stream(&payloads);
    for piece in [1, 7, 24, 25, 4095, 65_536] {
        let (mut dst, logs) = two_channel_destination();
        let mut status = Status::NeedMore;
        for start in (0..bytes.len()).step_by(piece) {
            let end = (start + piece).min(bytes.len());
            for ch in 0..2 {
                assert_eq!(
                    status,
                    Status::NeedMore,
                    "{piece}-byte pushes: loaded early"
                );
                status = dst
                    .push_channel(ch, &bytes[start..end], &vfio_mig::NoObserver)
                    .unwrap();
            }
        }
        assert_eq!(status, Status::Loaded, "{piece}-byte pushes");
        for log in &logs {
            let what = format!("{piece}-byte pushes");
            assert_loaded_exactly(&log.lock().unwrap(), &payloads, &what);
        }
    }
}

#[test]
fn whole_records_of_every_channel_reach_their_device_from_the_pushed_bytes() {
    let payloads = payloads();
    let pushes = [stream(&payloads), stream(&payloads)];
    let (mut dst, logs) = two_channel_destination();
    let obs = vfio_mig::NoObserver;
    assert_eq!(
        dst.push_channel(0, &pushes[0], &obs).unwrap(),
        Status::NeedMore
    );
    assert_eq!(
        dst.push_channel(1, &pushes[1], &obs).unwrap(),
        Status::Loaded
    );
    for (ch, (log, bytes)) in logs.iter().zip(&pushes).enumerate() {
        let log = log.lock().unwrap();
        assert_loaded_exactly(&log, &payloads, &format!("channel {ch}"));
        let pushed = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        for (i, (data, _, at)) in log.writes.iter().enumerate() {
            assert!(
                pushed.contains(at) && pushed.contains(&(at + data.len() - 1)),
                "channel {ch}, record {i} ({} bytes) reached the device from a copy",
                data.len()
            );
        }
    }
}

#[test]
fn a_corrupt_crc_is_refused_before_its_bytes_reach_the_device() {
    let payloads = payloads();
    let clean = stream(&payloads);
    // The stream header is where a stream with records and one without first differ (the
    // first DATA record's kind byte against END_OF_PHASE's).
    let empty = stream(&[]);
    let first = clean.iter().zip(&empty).position(|(a, b)| a != b).unwrap();
    let third =
        first + (RECORD_HEADER_LEN + payloads[0].len()) + (RECORD_HEADER_LEN + payloads[1].len());
    for (what, at) in [
        ("a payload byte", third + RECORD_HEADER_LEN + 5),
        ("a header byte", third + 2),
    ] {
        for cut in [0, third, third + 3, third + RECORD_HEADER_LEN + 10] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            let (mut dst, log) = destination();
            let e = push_cut(&mut dst, &bytes, &[cut]).unwrap_err();
            let e = Report(&e).to_string();
            assert!(
                e.contains("read stream record 2") && e.contains("reset"),
                "{what}, cut {cut}: {e}"
            );
            let log = log.lock().unwrap();
            // Records before the corrupt one may or may not have been applied (a push
            // applies its records in batches); none of the corrupt one's bytes were.
            assert!(log.writes.len() <= 2, "{what}, cut {cut}: {e}");
            for (i, (data, ..)) in log.writes.iter().enumerate() {
                assert_eq!(data, &payloads[i], "{what}, cut {cut}: write {i}");
            }
            assert!(log.reset && !log.loaded, "{what}, cut {cut}: not reset");
        }
    }
}

/// The VMM's writer: keeps every call's slices.
#[derive(Default)]
struct Calls(Vec<Vec<Vec<u8>>>);

impl std::io::Write for Calls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(vec![buf.to_vec()]);
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let call: Vec<Vec<u8>> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| b.to_vec())
            .collect();
        let n = call.iter().map(Vec::len).sum();
        self.0.push(call);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_source_record_leaves_with_its_header_in_one_write_unstaged() {
    // Larger than the writer's stack copy of small records (4 KiB).
    let payloads: Vec<Vec<u8>> = payloads().into_iter().filter(|p| p.len() > 4096).collect();
    let log = Arc::new(Mutex::new(Log::default()));
    log.lock().unwrap().to_read = payloads.iter().cloned().collect();
    let opts = vfio_mig::SourceOptions::new(vfio_mig::Epoch(1)).buffer(1 << 20);
    let mut source = vfio_mig::Source::start(vec![Recorder(log.clone())], &opts).unwrap();
    let mut out = Calls::default();
    source.switch_over(&mut out).unwrap();
    for p in &payloads {
        let call = out
            .0
            .iter()
            .find(|call| call.iter().any(|s| s.ends_with(&p[p.len() - 64..])))
            .expect("the payload was written");
        let lens: Vec<usize> = call.iter().map(Vec::len).collect();
        assert!(
            call.len() == 2 && call[0].len() == RECORD_HEADER_LEN && &call[1] == p,
            "a {}-byte record left in slices of {lens:?}, not its header and its payload \
             from the device's buffer",
            p.len()
        );
    }
    drop(source.finish());
}

/// Returns at most `max` bytes per read.
struct Trickle<'a> {
    bytes: &'a [u8],
    max: usize,
}

impl std::io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.max).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

#[test]
fn a_stream_read_in_pieces_loads_and_leaves_what_follows_the_trailer() {
    let payloads = payloads();
    let mut bytes = stream(&payloads);
    let after = b"the session's next message";
    bytes.extend_from_slice(after);
    for max in [1, 7, 24, 25, 4096, 65_536, usize::MAX] {
        let (mut dst, log) = destination();
        let mut input = Trickle { bytes: &bytes, max };
        let mut buf = vec![0u8; 64 << 10];
        while dst
            .read_some(&mut input, &mut buf, &vfio_mig::NoObserver)
            .unwrap()
            != Status::Loaded
        {}
        assert_loaded_exactly(
            &log.lock().unwrap(),
            &payloads,
            &format!("{max}-byte reads"),
        );
        assert_eq!(
            input.bytes, after,
            "{max}-byte reads: bytes after the trailer consumed"
        );
    }
}

/// Reads `bytes` with `read_some` in reads of at most `max` bytes until it stops: the status
/// or error it stopped with (the stream's end reads as a truncated stream).
fn read_in_pieces(dst: &mut Destination<Recorder>, bytes: &[u8], max: usize) -> Result<Status> {
    let mut input = Trickle { bytes, max };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match dst.read_some(&mut input, &mut buf, &vfio_mig::NoObserver)? {
            Status::NeedMore if !input.bytes.is_empty() => {}
            status => return Ok(status),
        }
    }
}

/// The destination checks a record's CRC piece by piece as its bytes arrive by `read_some`;
/// a byte changed anywhere in the record (its payload's first, middle or last byte, a header
/// byte) is still refused by the CRC before any of the record's bytes reach the device,
/// whatever the read sizes, and when the record's end comes by a push instead.
#[test]
fn a_corrupt_record_read_in_pieces_is_refused_by_its_crc() {
    let payloads = payloads();
    let clean = stream(&payloads);
    let empty = stream(&[]);
    let first = clean.iter().zip(&empty).position(|(a, b)| a != b).unwrap();
    let start = |k: usize| -> usize {
        first
            + payloads[..k]
                .iter()
                .map(|p| RECORD_HEADER_LEN + p.len())
                .sum::<usize>()
    };
    for k in [2usize, 7] {
        let (head, len) = (start(k), payloads[k].len());
        let payload = head + RECORD_HEADER_LEN;
        for (what, at) in [
            ("the sequence number", head + 4),
            ("the first payload byte", payload),
            ("a middle payload byte", payload + len / 2),
            ("the last payload byte", payload + len - 1),
        ] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x40;
            // Read whole by read_some, or its first half read and the rest pushed.
            let ways: Vec<(String, Option<usize>, usize)> = [1, 7, 24, 25, 4096, usize::MAX]
                .iter()
                .map(|&max| (format!("{max}-byte reads"), None, max))
                .chain(std::iter::once((
                    "half read, half pushed".to_string(),
                    Some(payload + len / 2),
                    4096,
                )))
                .collect();
            for (how, split, max) in ways {
                let context = format!("record {k}, {what} changed, {how}");
                let (mut dst, log) = destination();
                let end = split.unwrap_or(bytes.len());
                let got =
                    read_in_pieces(&mut dst, &bytes[..end], max).and_then(|status| match split {
                        Some(split) => dst.push(&bytes[split..]),
                        None => Ok(status),
                    });
                let e = Report(&got.expect_err(&context)).to_string();
                assert!(
                    e.contains(&format!("read stream record {k}")) && e.contains("CRC mismatch"),
                    "{context}: {e}"
                );
                let log = log.lock().unwrap();
                assert!(
                    log.writes.len() <= k,
                    "{context}: the record's bytes were written"
                );
                for (i, (data, ..)) in log.writes.iter().enumerate() {
                    assert_eq!(data, &payloads[i], "{context}: write {i}");
                }
                assert!(log.reset && !log.loaded, "{context}: not reset");
            }
        }
    }
}
