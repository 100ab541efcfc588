// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The migration stream: a versioned, CRC-protected wire format carrying the migration data
//! of one or more devices from a source to a destination.
//!
//! A stream is a header (magic, version, session id, epoch, one descriptor per device), then
//! records, then a trailer:
//!
//! - DATA records carry fragments of a device's migration data (at most [`MAX_FRAGMENT`]
//!   bytes each). A fragment flagged CHUNK_END closes a device *chunk*: for the v1 protocol,
//!   one `data_size` transaction, which the destination must replay with the same size.
//! - END_OF_PHASE records close a device's pre-copy (LIVE devices only) or stop-copy phase.
//! - The TRAILER carries the record count and per-device totals, which the reader checks.
//!
//! Every record carries a sequence number and a CRC32C over the stream's session id, its
//! header and payload (the session id binds a record to its stream); the reader checks a
//! record whole before handing it out, so no unverified byte reaches a device. With a
//! [`StreamAuth`] (the HMAC-SHA256 `StreamKey` of the `vfio-mig-session` crate), a tag
//! follows the header and every record, and a reader with the key refuses any stream the key
//! did not authenticate. [`StreamWriter`] and [`StreamReader`] enforce the same ordering rules,
//! so the library cannot write a stream it would refuse to read. The format is described byte
//! by byte in `docs/stream-format.md`.
//!
//! ```
//! use vfio_mig::wire::{
//!     DeviceDescriptor, Phase, Record, StreamHeader, StreamReader, StreamWriter,
//! };
//! use vfio_mig::Protocol;
//!
//! let header = StreamHeader {
//!     session_id: [0; 16],
//!     epoch: 1,
//!     devices: vec![DeviceDescriptor {
//!         protocol: Protocol::V2,
//!         live: false,
//!         migration_flags: 1,
//!         model: "mock:v1".into(),
//!     }],
//! };
//! let mut w = StreamWriter::new(Vec::new(), &header)?;
//! w.data(0, Phase::StopCopy, b"device state", true)?;
//! w.end_phase(0, Phase::StopCopy)?;
//! let (bytes, _totals) = w.finish()?;
//!
//! let (mut r, got) = StreamReader::open(bytes.as_slice())?;
//! assert_eq!(got, header);
//! loop {
//!     match r.next_record()? {
//!         Record::Data { device, bytes, chunk_end, .. } => {
//!             // Hand `bytes` to `device`; for v1, complete the transaction at `chunk_end`.
//!             let _ = (device, bytes, chunk_end);
//!         }
//!         Record::EndOfPhase { .. } => {}
//!         Record::End(_totals) => break,
//!     }
//! }
//! r.finish()?;
//! # Ok::<(), vfio_mig::Error>(())
//! ```

pub(crate) mod auth;
pub(crate) mod coalesce;
pub mod crc;
pub(crate) mod decode;
pub(crate) mod format;
pub(crate) mod frames;
pub(crate) mod reader;
pub(crate) mod writer;

pub(crate) use auth::StreamAuth;
pub(crate) use format::{DeviceDescriptor, Phase, StreamHeader, MAX_DEVICES};
pub(crate) use frames::FrameDecoder;
pub(crate) use reader::{Record, StreamReader};
pub(crate) use writer::StreamWriter;

#[cfg(test)]
pub(crate) use format::Protocol;
#[cfg(test)]
pub(crate) use reader::verify;

#[cfg(test)]
mod tests {
    use super::*;

    /// The example stream of `docs/stream-format.md`.
    fn example() -> Vec<u8> {
        let header = StreamHeader {
            session_id: *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff",
            epoch: 1,
            devices: vec![DeviceDescriptor {
                protocol: Protocol::V1,
                live: true,
                migration_flags: 0,
                model: "mock:v1".into(),
            }],
        };
        example_with(&header)
    }

    fn example_header(session: u8) -> StreamHeader {
        StreamHeader {
            session_id: [session; 16],
            epoch: 1,
            devices: vec![DeviceDescriptor {
                protocol: Protocol::V1,
                live: true,
                migration_flags: 0,
                model: "mock:v1".into(),
            }],
        }
    }

    fn example_with(header: &StreamHeader) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), header).unwrap();
        w.data(0, Phase::PreCopy, b"hello", true).unwrap();
        w.end_phase(0, Phase::PreCopy).unwrap();
        w.data(0, Phase::StopCopy, b"ab", false).unwrap();
        w.data(0, Phase::StopCopy, b"c", true).unwrap();
        w.end_phase(0, Phase::StopCopy).unwrap();
        w.finish().unwrap().0
    }

    /// `xxd`-style dump: offset, 16 bytes in hex, printable ASCII.
    fn hexdump(bytes: &[u8]) -> String {
        let mut out = String::new();
        for (i, line) in bytes.chunks(16).enumerate() {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            let ascii: String = line
                .iter()
                .map(|&b| {
                    if b.is_ascii_graphic() || b == b' ' {
                        b as char
                    } else {
                        '.'
                    }
                })
                .collect();
            out += &format!("{:08x}  {:<48} {ascii}\n", i * 16, hex.join(" "));
        }
        out
    }

    /// The wire format must not change by accident: this dump is in the documentation.
    /// Print it with `cargo test -p vfio-mig example_stream -- --nocapture`.
    #[test]
    fn example_stream() {
        let bytes = example();
        let dump = hexdump(&bytes);
        println!("{dump}");
        let expected = r#"00000000  56 46 49 4f 4d 49 47 00 02 00 01 00 00 11 22 33  VFIOMIG......."3
00000010  44 55 66 77 88 99 aa bb cc dd ee ff 01 00 00 00  DUfw............
00000020  00 00 00 00 00 00 00 00 01 01 07 00 00 00 00 00  ................
00000030  00 00 00 00 6d 6f 63 6b 3a 76 31 94 0d f9 a5 01  ....mock:v1.....
00000040  01 00 00 01 00 00 00 00 00 00 00 00 00 00 00 05  ................
00000050  00 00 00 70 0c b0 1b 68 65 6c 6c 6f 02 00 00 00  ...p...hello....
00000060  01 00 00 00 01 00 00 00 00 00 00 00 00 00 00 00  ................
00000070  b5 b5 6d 74 01 00 00 00 02 00 00 00 02 00 00 00  ..mt............
00000080  00 00 00 00 02 00 00 00 f7 40 e3 51 61 62 01 01  .........@.Qab..
00000090  00 00 02 00 00 00 03 00 00 00 00 00 00 00 01 00  ................
000000a0  00 00 aa 32 be 3e 63 02 00 00 00 02 00 00 00 04  ...2.>c.........
000000b0  00 00 00 00 00 00 00 00 00 00 00 b6 51 23 93 03  ............Q#..
000000c0  00 00 00 00 00 00 00 05 00 00 00 00 00 00 00 20  ............... 
000000d0  00 00 00 a9 57 8e 61 05 00 00 00 00 00 00 00 05  ....W.a.........
000000e0  00 00 00 00 00 00 00 03 00 00 00 00 00 00 00 02  ................
000000f0  00 00 00 00 00 00 00                             .......
"#;
        assert_eq!(dump, expected);
        // Header 63, six record headers, payloads "hello" "ab" "c" and the 32-byte trailer.
        assert_eq!(bytes.len(), 63 + 6 * 24 + 5 + 2 + 1 + 32);
        let summary = verify(bytes.as_slice()).unwrap();
        assert_eq!(summary.totals.records, 5);
    }

    /// Offsets in the example stream (one device, model "mock:v1").
    const HEADER_LEN: usize = 63;
    /// The first record: header 24 bytes, payload "hello".
    const FIRST_RECORD: std::ops::Range<usize> = HEADER_LEN..HEADER_LEN + 24 + 5;

    /// Records are bound to their stream: the same record (same position, same bytes) from a
    /// stream with another session id fails its CRC, without any key.
    #[test]
    fn a_record_of_another_stream_is_refused_without_a_key() {
        let a = example_with(&example_header(1));
        let b = example_with(&example_header(2));
        let mut spliced = a.clone();
        spliced[FIRST_RECORD].copy_from_slice(&b[FIRST_RECORD]);
        assert_ne!(spliced, a);
        let e = verify(spliced.as_slice()).unwrap_err().to_string();
        assert!(e.contains("read stream record 0: CRC mismatch"), "{e}");
        assert!(e.contains("another stream"), "{e}");
        // And another stream's header in front of these records.
        let mut spliced = a.clone();
        spliced[..HEADER_LEN].copy_from_slice(&b[..HEADER_LEN]);
        assert!(verify(spliced.as_slice()).is_err());
    }
}
