// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seam of authenticated streams: with a [`StreamAuth`], a [`super::StreamWriter`] writes
//! a tag after the header and after every record, and a [`super::StreamReader`] checks them
//! before any byte reaches a device. The format fixes where the tags stand and how long they
//! are ([`TAG_LEN`]); the keyed MAC itself (HMAC-SHA256, `StreamKey`) is the
//! `vfio-mig-session` crate's, so that a VMM that does not authenticate streams does not build
//! it.

use std::fmt;

/// Bytes of a tag.
pub const TAG_LEN: usize = 32;

/// A keyed MAC over the stream's header and records.
///
/// A record's tag covers the stream's session id, the record header and the payload, so that
/// a record cannot be moved to another stream or position; the trailer is a record, so its
/// tag covers the record count and totals.
pub trait StreamAuth: Send + Sync + fmt::Debug {
    /// The tag of the encoded header `header`.
    fn header_tag(&self, header: &[u8]) -> [u8; TAG_LEN];
    /// Whether `tag` is the tag of `header` (compared in constant time).
    fn header_ok(&self, header: &[u8], tag: &[u8]) -> bool;
    /// The tag of a record of stream `session`: its encoded header `head` and `payload`.
    fn record_tag(&self, session: &[u8; 16], head: &[u8], payload: &[u8]) -> [u8; TAG_LEN];
    /// Whether `tag` is the tag of that record (compared in constant time).
    fn record_ok(&self, session: &[u8; 16], head: &[u8], payload: &[u8], tag: &[u8]) -> bool;
}
