// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A decoded record ([`Record`]) and the checks of a record once its bytes are in memory
//! ([`RecordCheck`]), shared by the reading [`super::StreamReader`] and the in-place
//! [`super::frames::FrameDecoder`].

use std::sync::Arc;

use super::auth::{StreamAuth, TAG_LEN};
use super::format::{RawRecordHeader, RecordKind, StreamHeader, Totals, Tracker};
use super::Phase;
use crate::error::{Error, Result};

/// One record of a stream, as returned by
/// [`StreamReader::next_record`](super::StreamReader::next_record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A fragment of a device's migration data, CRC-checked.
    Data {
        /// Index of the device in the header.
        device: u16,
        /// The phase the data was read in.
        phase: Phase,
        /// The fragment (1 to [`super::format::MAX_FRAGMENT`] bytes), valid until the next
        /// call.
        bytes: &'a [u8],
        /// This fragment closes a device chunk: for v1, write the chunk to the device as one
        /// `data_size` transaction now.
        chunk_end: bool,
    },
    /// The device finished `phase`.
    EndOfPhase {
        /// Index of the device in the header.
        device: u16,
        /// The phase that ended.
        phase: Phase,
    },
    /// The trailer: the stream is complete and its totals were checked. Call
    /// [`StreamReader::finish`](super::StreamReader::finish) to check that nothing follows.
    End(Totals),
}

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
    /// fields, the sequence number and the ordering rules) and counts it. `arrived_crc` is
    /// the record's CRC as its caller computed it over these very bytes while they arrived
    /// (see [`record_crc`](super::format::record_crc)); `None`: computed here.
    pub(crate) fn check(
        &mut self,
        raw: &RawRecordHeader,
        payload: &[u8],
        tag: Option<&[u8; TAG_LEN]>,
        arrived_crc: Option<u32>,
    ) -> Result<Decoded> {
        let seq = self.next_sequence();
        let err = |detail: String| Error::stream(format!("read stream record {seq}"), detail);
        let device_count = self.header.devices.len();
        let session = self.header.session_id;
        let (stored, computed) = match arrived_crc {
            Some(crc) => (raw.stored_crc(), crc),
            None => raw.crc(&session, payload),
        };
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
