// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The decoder of whole frames that already lie in the caller's memory: a destination fed by
//! pushes decodes records where the bytes arrived instead of copying them into a reader's
//! buffer first.

use std::sync::Arc;

use super::auth::{StreamAuth, TAG_LEN};
use super::decode::{Decoded, Record, RecordCheck};
use super::format::{RawRecordHeader, SessionId, StreamHeader, RECORD_HEADER_LEN as HEAD};
use super::StreamReader;
use crate::error::{Error, Result};

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

    /// The stream's session id, which every record's CRC covers.
    pub(crate) fn session_id(&self) -> &SessionId {
        &self.check.header.session_id
    }

    /// Whether the stream carries tags (each record's frame ends with one).
    pub(crate) fn is_authenticated(&self) -> bool {
        self.check.authenticated
    }

    /// Decodes one whole record `frame` (exactly the bytes
    /// [`record_frame_len`](super::format::record_frame_len) measured: header, payload and
    /// tag). A DATA record's bytes are a slice of `frame`.
    /// `arrived_crc`: the record's CRC computed over `frame`'s bytes as they arrived
    /// ([`PartialRecordCrc`](super::format::PartialRecordCrc)), `None` to compute it here.
    pub(crate) fn record<'a>(
        &mut self,
        frame: &'a [u8],
        arrived_crc: Option<u32>,
    ) -> Result<Record<'a>> {
        self.check.check_open()?;
        let decoded = self.decode(frame, arrived_crc);
        let payload = frame.get(HEAD..).unwrap_or_default();
        Ok(self.check.note(decoded)?.into_record(payload))
    }

    fn decode(&mut self, frame: &[u8], arrived_crc: Option<u32>) -> Result<Decoded> {
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
        self.check.check(&raw, payload, tag, arrived_crc)
    }
}
