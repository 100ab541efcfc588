// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The checks of a record once its bytes are in memory ([`RecordCheck`], shared by the
//! reading [`super::StreamReader`] and the in-place [`FrameDecoder`]), and the decoder of
//! whole frames that already lie in the caller's memory: a destination fed by pushes decodes
//! records where the bytes arrived instead of copying them into a reader's buffer first.

use std::sync::Arc;

use super::auth::{StreamAuth, TAG_LEN};
use super::format::RECORD_HEADER_LEN as HEAD;
use super::format::{RawRecordHeader, RecordKind, StreamHeader, Totals, Tracker};
use super::reader::Record;
use super::{Phase, StreamReader};
use crate::error::{Error, Result};

/// What a record decoded to, without the borrow of its payload.
pub(crate) enum Decoded {
    Data {
        device: u16,
        phase: Phase,
        len: usize,
        chunk_end: bool,
    },
    EndOfPhase {
        device: u16,
        phase: Phase,
    },
    End(Totals),
}

impl Decoded {
    /// The record, its DATA bytes the first `len` bytes of `payload`.
    pub(crate) fn into_record(self, payload: &[u8]) -> Record<'_> {
        match self {
            Decoded::Data {
                device,
                phase,
                len,
                chunk_end,
            } => Record::Data {
                device,
                phase,
                bytes: payload.get(..len).unwrap_or_default(),
                chunk_end,
            },
            Decoded::EndOfPhase { device, phase } => Record::EndOfPhase { device, phase },
            Decoded::End(totals) => Record::End(totals),
        }
    }
}

/// Where the records of a stream are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Records,
    Ended,
    Failed,
}

/// A stream's header, key and ordering state: everything a record is checked against once
/// its header, payload and tag are in memory.
pub(crate) struct RecordCheck {
    pub(crate) header: StreamHeader,
    /// The stream carries tags (header flag AUTHENTICATED).
    pub(crate) authenticated: bool,
    /// The key the tags are checked with (`None`: tags are skipped, not checked).
    pub(crate) key: Option<Arc<dyn StreamAuth>>,
    pub(crate) tracker: Tracker,
    pub(crate) state: State,
}

impl RecordCheck {
    pub(crate) fn new(
        header: StreamHeader,
        authenticated: bool,
        key: Option<Arc<dyn StreamAuth>>,
    ) -> Self {
        Self {
            tracker: Tracker::new(&header),
            header,
            authenticated,
            key,
            state: State::Records,
        }
    }

    /// The next record's sequence number.
    pub(crate) fn next_sequence(&self) -> u64 {
        self.tracker.totals().records
    }

    /// Records checked so far (the trailer included once it was read).
    pub(crate) fn records_read(&self) -> u64 {
        self.tracker.totals().records + u64::from(self.state == State::Ended)
    }

    /// Fails unless more records may follow.
    pub(crate) fn check_open(&self) -> Result<()> {
        match self.state {
            State::Records => Ok(()),
            State::Ended => Err(Error::stream(
                "read stream record after the trailer",
                "the stream already ended with its trailer",
            )),
            State::Failed => Err(Error::stream(
                format!("read stream record {}", self.next_sequence()),
                "an earlier error left the stream at an unknown position",
            )),
        }
    }

    /// Notes the outcome of a record: the trailer ends the stream, an error leaves it at an
    /// unknown position.
    pub(crate) fn note(&mut self, r: Result<Decoded>) -> Result<Decoded> {
        match &r {
            Ok(Decoded::End(_)) => self.state = State::Ended,
            Ok(_) => {}
            Err(_) => self.state = State::Failed,
        }
        r
    }

    /// Checks record `raw` with its `payload` and `tag` (the CRC, the tag with a key, the
    /// fields, the sequence number and the ordering rules) and counts it.
    pub(crate) fn check(
        &mut self,
        raw: &RawRecordHeader,
        payload: &[u8],
        tag: Option<&[u8; TAG_LEN]>,
    ) -> Result<Decoded> {
        let seq = self.next_sequence();
        let err = |detail: String| Error::stream(format!("read stream record {seq}"), detail);
        let device_count = self.header.devices.len();
        let session = self.header.session_id;
        let (stored, computed) = raw.crc(&session, payload);
        if stored != computed {
            return Err(err(format!(
                "CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt \
                 record, or a record of another stream"
            )));
        }
        if let (Some(k), Some(tag)) = (&self.key, tag) {
            if !k.record_ok(&session, raw.bytes(), payload, tag) {
                return Err(err(
                    "authentication failed: the record's tag does not match the key (a \
                     forged, altered or foreign record)"
                        .into(),
                ));
            }
        }
        let h = raw.validate(device_count).map_err(err)?;
        if h.sequence != seq {
            let why = if h.sequence < seq {
                "duplicate or reordered record"
            } else {
                "missing or reordered record"
            };
            return Err(err(format!(
                "out of sequence: expected sequence number {seq}, got {} ({why})",
                h.sequence
            )));
        }
        let len = payload.len();
        match (h.kind, h.phase) {
            (RecordKind::Data, Some(phase)) => {
                self.tracker.check_data(h.device, phase).map_err(err)?;
                self.tracker.record_data(h.device, phase, len, h.chunk_end);
                Ok(Decoded::Data {
                    device: h.device,
                    phase,
                    len,
                    chunk_end: h.chunk_end,
                })
            }
            (RecordKind::EndOfPhase, Some(phase)) => {
                self.tracker.check_end_phase(h.device, phase).map_err(err)?;
                self.tracker.record_end_phase(h.device, phase);
                Ok(Decoded::EndOfPhase {
                    device: h.device,
                    phase,
                })
            }
            (RecordKind::Trailer, _) => {
                self.tracker.check_trailer().map_err(err)?;
                let claimed = Totals::decode(payload, device_count).map_err(err)?;
                if let Some(m) = claimed.mismatch(self.tracker.totals()) {
                    return Err(err(format!("trailer totals do not match the stream: {m}")));
                }
                Ok(Decoded::End(claimed))
            }
            (kind, None) => Err(err(format!("{kind} record without a phase"))),
        }
    }
}

/// Decodes a stream whose frames (the header, then each record with its tag) the caller
/// already holds whole in memory: every record is checked exactly as
/// [`StreamReader`](super::StreamReader) checks it, and a DATA record's payload is returned
/// as a slice of the caller's frame, copied nowhere.
pub(crate) struct FrameDecoder {
    check: RecordCheck,
}

impl FrameDecoder {
    /// Checks the stream header `frame` (exactly the bytes
    /// [`header_frame_len`](super::format::header_frame_len) measured) and returns the
    /// decoder and the header. With a `key`, the header's tag is checked, as
    /// [`StreamReader::open_keyed`] does.
    pub(crate) fn open(
        frame: &[u8],
        key: Option<Arc<dyn StreamAuth>>,
    ) -> Result<(Self, StreamHeader)> {
        let (reader, header) = StreamReader::open_keyed(frame, key)?;
        let (rest, check) = reader.into_parts();
        if !rest.is_empty() {
            return Err(Error::stream(
                "stream header",
                format!("{} bytes beyond the header's frame", rest.len()),
            ));
        }
        Ok((Self { check }, header))
    }

    /// Whether the stream carries tags (each record's frame ends with one).
    pub(crate) fn is_authenticated(&self) -> bool {
        self.check.authenticated
    }

    /// Decodes one whole record `frame` (exactly the bytes
    /// [`record_frame_len`](super::format::record_frame_len) measured: header, payload and
    /// tag). A DATA record's bytes are a slice of `frame`.
    pub(crate) fn record<'a>(&mut self, frame: &'a [u8]) -> Result<Record<'a>> {
        self.check.check_open()?;
        let decoded = self.decode(frame);
        let payload = frame.get(HEAD..).unwrap_or_default();
        Ok(self.check.note(decoded)?.into_record(payload))
    }

    fn decode(&mut self, frame: &[u8]) -> Result<Decoded> {
        let seq = self.check.next_sequence();
        let err = |detail: String| Error::stream(format!("read stream record {seq}"), detail);
        let head: [u8; HEAD] = frame
            .get(..HEAD)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| err(format!("a record frame of {} bytes", frame.len())))?;
        let raw = RawRecordHeader::new(head);
        let len = raw
            .checked_payload_len(self.check.header.devices.len())
            .map_err(err)?;
        let tag_len = if self.check.authenticated { TAG_LEN } else { 0 };
        if frame.len() != HEAD + len + tag_len {
            return Err(err(format!(
                "a record frame of {} bytes for a payload of {len}",
                frame.len()
            )));
        }
        let payload = frame.get(HEAD..HEAD + len).unwrap_or_default();
        let tag = frame
            .get(HEAD + len..)
            .and_then(|t| <&[u8; TAG_LEN]>::try_from(t).ok());
        self.check.check(&raw, payload, tag)
    }
}
