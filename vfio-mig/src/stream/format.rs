// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Wire format of the migration stream: constants, the header and record encoders and
//! decoders, and the ordering rules. Pure code, no I/O: [`super::StreamWriter`] and
//! [`super::StreamReader`] do the reading and writing.
//!
//! See `docs/stream-format.md` for the byte-by-byte description.

use std::fmt;

use crate::error::{Error, Result};

/// The migration protocol of a device: the engine's type, carried in the header.
pub(crate) use crate::migration::Protocol;

/// A 128-bit session id, as in the stream header.
pub type SessionId = [u8; 16];

/// Magic bytes a stream starts with.
pub const MAGIC: [u8; 8] = *b"VFIOMIG\0";
/// The format version this code writes and the only one it reads. Version 2 added the
/// header flags, the binding of every record's CRC to the stream's session id, and the
/// optional authentication tags.
pub(crate) const FORMAT_VERSION: u16 = 2;
/// Largest number of devices a stream may carry.
pub(crate) const MAX_DEVICES: usize = 64;
/// Largest length, in bytes, of a device model name.
pub(crate) const MAX_MODEL_LEN: usize = 256;
/// Largest payload of one DATA record (1 MiB). A reader buffers one record whole, so this
/// also bounds the reader's memory.
pub const MAX_FRAGMENT: usize = 1 << 20;
/// Length of the fixed part of the stream header (magic, version, count, session, epoch,
/// flags).
pub(crate) const HEADER_FIXED_LEN: usize = 40;
/// Header flag: an HMAC-SHA256 tag ([`super::TAG_LEN`] bytes) follows the header and
/// every record ([`super::StreamAuth`]).
pub(crate) const HEADER_FLAG_AUTHENTICATED: u32 = 1 << 0;
/// Length of the fixed part of a device descriptor (before the model name).
pub(crate) const DESCRIPTOR_FIXED_LEN: usize = 12;
/// Length of a CRC32C field.
pub(crate) const CRC_LEN: usize = 4;
/// Length of a record header.
pub(crate) const RECORD_HEADER_LEN: usize = 24;
/// Offset of the CRC within a record header; the CRC covers the stream's session id, the
/// bytes before it and the payload.
pub(crate) const RECORD_CRC_OFFSET: usize = 20;
/// Length of the fixed part of the trailer payload (the record count).
pub(crate) const TRAILER_FIXED_LEN: usize = 8;
/// Length of one device's totals in the trailer payload.
pub(crate) const TRAILER_DEVICE_LEN: usize = 24;
/// Descriptor flag: pre-copy data follows for this device.
pub(crate) const DEVICE_FLAG_LIVE: u8 = 1 << 0;
/// DATA record flag: this fragment closes a device chunk.
pub(crate) const RECORD_FLAG_CHUNK_END: u8 = 1 << 0;

/// Payload length of the trailer of a stream with `device_count` devices.
pub(crate) const fn trailer_len(device_count: usize) -> usize {
    TRAILER_FIXED_LEN + device_count * TRAILER_DEVICE_LEN
}

/// Step name of errors found while decoding the stream header.
const HEADER_STEP: &str = "stream header";

/// The wire byte of a protocol: 1 = v1 migration region, 2 = v2 device feature.
pub(crate) const fn protocol_wire(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::V1 => 1,
        Protocol::V2 => 2,
    }
}

/// The protocol encoded by `byte`, if any.
pub(crate) const fn protocol_from_wire(byte: u8) -> Option<Protocol> {
    match byte {
        1 => Some(Protocol::V1),
        2 => Some(Protocol::V2),
        _ => None,
    }
}

/// A migration phase, as carried by DATA and END_OF_PHASE records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
#[non_exhaustive]
pub enum Phase {
    /// Data read while the device still runs (only for LIVE devices).
    PreCopy,
    /// Data read after the device stopped.
    StopCopy,
}

impl Phase {
    /// The byte that encodes this phase.
    pub const fn wire(self) -> u8 {
        match self {
            Phase::PreCopy => 1,
            Phase::StopCopy => 2,
        }
    }

    /// The phase encoded by `byte`, if any.
    pub const fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Phase::PreCopy),
            2 => Some(Phase::StopCopy),
            _ => None,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::PreCopy => "pre-copy",
            Phase::StopCopy => "stop-copy",
        })
    }
}

/// The kind of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RecordKind {
    /// A fragment of a device's migration data.
    Data,
    /// A device finished a phase.
    EndOfPhase,
    /// The last record: totals of the whole stream.
    Trailer,
}

impl RecordKind {
    /// The byte that encodes this kind.
    pub(crate) const fn wire(self) -> u8 {
        match self {
            RecordKind::Data => 1,
            RecordKind::EndOfPhase => 2,
            RecordKind::Trailer => 3,
        }
    }

    /// The kind encoded by `byte`, if any.
    pub(crate) const fn from_wire(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(RecordKind::Data),
            2 => Some(RecordKind::EndOfPhase),
            3 => Some(RecordKind::Trailer),
            _ => None,
        }
    }
}

impl fmt::Display for RecordKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordKind::Data => "DATA",
            RecordKind::EndOfPhase => "END_OF_PHASE",
            RecordKind::Trailer => "TRAILER",
        })
    }
}

/// One device of the stream, as described in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceDescriptor {
    /// The migration protocol of the source device.
    pub protocol: Protocol,
    /// Whether pre-copy data follows for this device.
    pub live: bool,
    /// The v2 `VFIO_MIGRATION_*` flags of the source device (0 for v1).
    pub migration_flags: u64,
    /// The device model, e.g. `mdev:mtty-2` (1 to `MAX_MODEL_LEN` bytes of UTF-8).
    pub model: String,
}

/// The stream header: who sends what.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct StreamHeader {
    /// An opaque 128-bit session identifier chosen by the sender (hex in JSON).
    #[cfg_attr(feature = "serde", serde(serialize_with = "serialize_hex"))]
    pub session_id: SessionId,
    /// The sender's epoch (e.g. a migration attempt counter).
    pub epoch: u64,
    /// The devices, 1 to 64; a record's device index points into this list.
    pub devices: Vec<DeviceDescriptor>,
}

#[cfg(feature = "serde")]
fn serialize_hex<S: serde::Serializer>(
    bytes: &[u8; 16],
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex(bytes))
}

/// Lower-case hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn header_err(detail: impl Into<String>) -> Error {
    Error::stream(HEADER_STEP, detail)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// The length of the stream header that `bytes` begins with (its tag included), or `None`
/// while `bytes` is too short to tell. For a receiver that gets a stream in pieces of any
/// size and hands a [`super::StreamReader`] only whole units: a malformed header answers
/// `bytes.len()` (what there is), so that the reader sees it and refuses it.
pub(crate) fn header_frame_len(bytes: &[u8]) -> Option<usize> {
    let fixed = bytes.get(..HEADER_FIXED_LEN)?;
    let count = usize::from(le_u16(fixed, 10));
    if fixed[..8] != MAGIC || !(1..=MAX_DEVICES).contains(&count) {
        return Some(bytes.len());
    }
    let mut len = HEADER_FIXED_LEN;
    for _ in 0..count {
        let descriptor = bytes.get(len..len + DESCRIPTOR_FIXED_LEN)?;
        let model = usize::from(le_u16(descriptor, 2));
        if !(1..=MAX_MODEL_LEN).contains(&model) {
            return Some(bytes.len());
        }
        len += DESCRIPTOR_FIXED_LEN + model;
    }
    len += CRC_LEN;
    if le_u32(fixed, 36) & HEADER_FLAG_AUTHENTICATED != 0 {
        len += super::auth::TAG_LEN;
    }
    Some(len)
}

/// The length of the record that `bytes` begins with (its tag included, when `authenticated`),
/// or `None` while `bytes` is too short to tell; see [`header_frame_len`]. A payload length
/// beyond any record's answers `bytes.len()`, for the reader to refuse.
pub(crate) fn record_frame_len(bytes: &[u8], authenticated: bool) -> Option<usize> {
    let head = bytes.get(..RECORD_HEADER_LEN)?;
    let payload = le_u32(head, 16) as usize;
    if payload > MAX_FRAGMENT.max(trailer_len(MAX_DEVICES)) {
        return Some(bytes.len());
    }
    let tag = if authenticated {
        super::auth::TAG_LEN
    } else {
        0
    };
    Some(RECORD_HEADER_LEN + payload + tag)
}

/// Checks the fixed part of a header (magic, version, device count) and returns the device
/// count. Run before anything else of the header is read, so a foreign file is refused at
/// once.
pub(crate) fn check_header_fixed(fixed: &[u8; HEADER_FIXED_LEN]) -> Result<usize> {
    if fixed[..8] != MAGIC {
        return Err(header_err(format!(
            "not a vfio-mig stream: bad magic {} (expected {})",
            hex(&fixed[..8]),
            hex(&MAGIC)
        )));
    }
    let version = le_u16(fixed, 8);
    if version != FORMAT_VERSION {
        return Err(header_err(format!(
            "unsupported stream format version {version} (this build reads version {FORMAT_VERSION} only)"
        )));
    }
    let count = usize::from(le_u16(fixed, 10));
    if !(1..=MAX_DEVICES).contains(&count) {
        return Err(header_err(format!(
            "device count {count} out of range 1..={MAX_DEVICES}"
        )));
    }
    let flags = header_flags(fixed);
    if flags & !HEADER_FLAG_AUTHENTICATED != 0 {
        return Err(header_err(format!("unknown header flags {flags:#010x}")));
    }
    Ok(count)
}

/// The header flags of a fixed header part (checked by [`check_header_fixed`]).
pub(crate) fn header_flags(fixed: &[u8; HEADER_FIXED_LEN]) -> u32 {
    le_u32(fixed, 36)
}

/// The CRC32C of a record: the session id, the record header before its CRC, the payload.
/// The session id binds every record to its stream: a record copied from another stream
/// fails its CRC.
pub(crate) fn record_crc(session: &SessionId, head: &[u8], payload: &[u8]) -> u32 {
    let crc = crate::stream::crc::crc32c(session);
    let crc = crate::stream::crc::crc32c_append(crc, head.get(..RECORD_CRC_OFFSET).unwrap_or(head));
    crate::stream::crc::crc32c_append(crc, payload)
}

/// A record's CRC computed piece by piece while its bytes arrive, when they are still in
/// the cache, so that checking the whole record does not read its payload again from memory:
/// the value [`record_crc`] gives over the bytes covered so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartialRecordCrc {
    value: u32,
    /// The bytes of the frame covered: the header first, then payload bytes.
    covered: usize,
}

impl PartialRecordCrc {
    /// Covers what `frame` (the start of a record's frame, which only grows between calls)
    /// holds of the payload beyond what `partial` covered; starts once the header is whole.
    pub(crate) fn advance(partial: &mut Option<Self>, session: &SessionId, frame: &[u8]) {
        let Some(end) = payload_end(frame) else {
            return;
        };
        let c = partial.get_or_insert_with(|| Self {
            value: record_crc(session, &frame[..RECORD_HEADER_LEN], &[]),
            covered: RECORD_HEADER_LEN,
        });
        let end = end.min(frame.len());
        if end > c.covered {
            c.value = crate::stream::crc::crc32c_append(c.value, &frame[c.covered..end]);
            c.covered = end;
        }
    }

    /// The record's CRC once it covers the whole payload of the record `frame` holds.
    pub(crate) fn whole(&self, frame: &[u8]) -> Option<u32> {
        let end = payload_end(frame)?;
        (self.covered == end && frame.len() >= end).then_some(self.value)
    }
}

/// Where the payload of the record `frame` begins with ends (its header is whole).
fn payload_end(frame: &[u8]) -> Option<usize> {
    let head = frame.get(..RECORD_HEADER_LEN)?;
    RECORD_HEADER_LEN.checked_add(le_u32(head, 16) as usize)
}

/// Checks the fixed part of descriptor `index` and returns its model length.
pub(crate) fn check_descriptor_fixed(
    fixed: &[u8; DESCRIPTOR_FIXED_LEN],
    index: usize,
) -> Result<usize> {
    let len = usize::from(le_u16(fixed, 2));
    if !(1..=MAX_MODEL_LEN).contains(&len) {
        return Err(header_err(format!(
            "device {index}: model length {len} out of range 1..={MAX_MODEL_LEN}"
        )));
    }
    Ok(len)
}

impl DeviceDescriptor {
    fn validate(&self, index: usize) -> Result<()> {
        let len = self.model.len();
        if !(1..=MAX_MODEL_LEN).contains(&len) {
            return Err(header_err(format!(
                "device {index}: model length {len} out of range 1..={MAX_MODEL_LEN}"
            )));
        }
        if self.protocol == Protocol::V1 && self.migration_flags != 0 {
            return Err(header_err(format!(
                "device {index}: v1 protocol with non-zero migration flags {:#x}",
                self.migration_flags
            )));
        }
        Ok(())
    }
}

impl StreamHeader {
    /// The number of devices, as a record's device index type.
    pub fn device_count(&self) -> u16 {
        u16::try_from(self.devices.len()).unwrap_or(u16::MAX)
    }

    /// Checks that the header can be encoded: 1 to 64 devices, model names of
    /// 1 to `MAX_MODEL_LEN` bytes, no migration flags on v1 devices.
    pub fn validate(&self) -> Result<()> {
        let count = self.devices.len();
        if !(1..=MAX_DEVICES).contains(&count) {
            return Err(header_err(format!(
                "device count {count} out of range 1..={MAX_DEVICES}"
            )));
        }
        for (i, d) in self.devices.iter().enumerate() {
            d.validate(i)?;
        }
        Ok(())
    }

    /// The encoded header, CRC included, with no flags (not authenticated).
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_with_flags(0)
    }

    /// The encoded header with header `flags`, CRC included.
    pub(crate) fn encode_with_flags(&self, flags: u32) -> Result<Vec<u8>> {
        self.validate()?;
        let len = HEADER_FIXED_LEN
            + self
                .devices
                .iter()
                .map(|d| DESCRIPTOR_FIXED_LEN + d.model.len())
                .sum::<usize>()
            + CRC_LEN;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.device_count().to_le_bytes());
        out.extend_from_slice(&self.session_id);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        for d in &self.devices {
            out.push(protocol_wire(d.protocol));
            out.push(if d.live { DEVICE_FLAG_LIVE } else { 0 });
            // Validated above: 1..=MAX_MODEL_LEN fits in u16.
            out.extend_from_slice(&(d.model.len() as u16).to_le_bytes());
            out.extend_from_slice(&d.migration_flags.to_le_bytes());
            out.extend_from_slice(d.model.as_bytes());
        }
        let crc = crate::stream::crc::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        Ok(out)
    }

    /// Decodes a header from the start of `bytes`; returns it and its encoded length.
    ///
    /// The magic, version, device count and model lengths are checked first, then the CRC,
    /// then the descriptor fields, so corruption shows as a CRC mismatch.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize)> {
        let truncated = |need: usize| {
            header_err(format!(
                "truncated stream: the header needs at least {need} bytes, only {} present",
                bytes.len()
            ))
        };
        let fixed: &[u8; HEADER_FIXED_LEN] = bytes
            .get(..HEADER_FIXED_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| truncated(HEADER_FIXED_LEN))?;
        let count = check_header_fixed(fixed)?;
        let mut pos = HEADER_FIXED_LEN;
        // (offset of descriptor, model length)
        let mut spans = Vec::with_capacity(count);
        for i in 0..count {
            let need = pos + DESCRIPTOR_FIXED_LEN;
            let d: &[u8; DESCRIPTOR_FIXED_LEN] = bytes
                .get(pos..need)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| truncated(need))?;
            let model_len = check_descriptor_fixed(d, i)?;
            spans.push((pos, model_len));
            pos = need + model_len;
        }
        let end = pos + CRC_LEN;
        let stored_crc = bytes.get(pos..end).ok_or_else(|| truncated(end))?;
        let stored = le_u32(stored_crc, 0);
        let computed = crate::stream::crc::crc32c(bytes.get(..pos).unwrap_or_default());
        if stored != computed {
            return Err(header_err(format!(
                "CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt header"
            )));
        }
        let mut devices = Vec::with_capacity(count);
        for (i, (at, model_len)) in spans.into_iter().enumerate() {
            let d = bytes
                .get(at..at + DESCRIPTOR_FIXED_LEN + model_len)
                .unwrap_or_default();
            let proto_byte = d.first().copied().unwrap_or(0);
            let protocol = protocol_from_wire(proto_byte).ok_or_else(|| {
                header_err(format!(
                    "device {i}: unknown protocol {proto_byte} \
                     (1 = v1 migration region, 2 = v2 device feature)"
                ))
            })?;
            let flags = d.get(1).copied().unwrap_or(0);
            if flags & !DEVICE_FLAG_LIVE != 0 {
                return Err(header_err(format!(
                    "device {i}: unknown descriptor flags {flags:#04x}"
                )));
            }
            let migration_flags = le_u64(d, 4);
            let model_bytes = d.get(DESCRIPTOR_FIXED_LEN..).unwrap_or_default();
            let model = std::str::from_utf8(model_bytes)
                .map_err(|e| header_err(format!("device {i}: model name is not UTF-8: {e}")))?
                .to_owned();
            let desc = DeviceDescriptor {
                protocol,
                live: flags & DEVICE_FLAG_LIVE != 0,
                migration_flags,
                model,
            };
            desc.validate(i)?;
            devices.push(desc);
        }
        let mut session_id = [0u8; 16];
        session_id.copy_from_slice(&fixed[12..28]);
        let header = StreamHeader {
            session_id,
            epoch: le_u64(fixed, 28),
            devices,
        };
        Ok((header, end))
    }
}

/// Totals of one device over the whole stream, as carried by the trailer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceTotals {
    /// Bytes of pre-copy DATA.
    pub pre_copy_bytes: u64,
    /// Bytes of stop-copy DATA.
    pub stop_copy_bytes: u64,
    /// Device chunks (DATA records with CHUNK_END), both phases.
    pub chunks: u64,
}

/// Totals of a stream, as carried by the trailer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Totals {
    /// Number of records before the trailer.
    pub records: u64,
    /// Per-device totals, in header order.
    pub devices: Vec<DeviceTotals>,
}

impl Totals {
    /// All-zero totals for `device_count` devices.
    pub fn new(device_count: usize) -> Self {
        Totals {
            records: 0,
            devices: vec![DeviceTotals::default(); device_count],
        }
    }

    /// The trailer payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(trailer_len(self.devices.len()));
        out.extend_from_slice(&self.records.to_le_bytes());
        for d in &self.devices {
            out.extend_from_slice(&d.pre_copy_bytes.to_le_bytes());
            out.extend_from_slice(&d.stop_copy_bytes.to_le_bytes());
            out.extend_from_slice(&d.chunks.to_le_bytes());
        }
        out
    }

    /// Decodes a trailer payload of a stream with `device_count` devices. The error is a
    /// detail for the caller to put in context.
    pub(crate) fn decode(payload: &[u8], device_count: usize) -> std::result::Result<Self, String> {
        let want = trailer_len(device_count);
        if payload.len() != want {
            return Err(format!(
                "trailer payload is {} bytes, expected {want} for {device_count} devices",
                payload.len()
            ));
        }
        let devices = (0..device_count)
            .map(|i| {
                let at = TRAILER_FIXED_LEN + i * TRAILER_DEVICE_LEN;
                DeviceTotals {
                    pre_copy_bytes: le_u64(payload, at),
                    stop_copy_bytes: le_u64(payload, at + 8),
                    chunks: le_u64(payload, at + 16),
                }
            })
            .collect();
        Ok(Totals {
            records: le_u64(payload, 0),
            devices,
        })
    }

    /// The first difference between `self` (what a trailer claims) and `counted`, if any.
    pub(crate) fn mismatch(&self, counted: &Totals) -> Option<String> {
        if self.records != counted.records {
            return Some(format!(
                "trailer says {} records, the stream has {}",
                self.records, counted.records
            ));
        }
        for (i, (t, c)) in self.devices.iter().zip(&counted.devices).enumerate() {
            let fields = [
                ("pre-copy bytes", t.pre_copy_bytes, c.pre_copy_bytes),
                ("stop-copy bytes", t.stop_copy_bytes, c.stop_copy_bytes),
                ("chunks", t.chunks, c.chunks),
            ];
            for (name, claimed, seen) in fields {
                if claimed != seen {
                    return Some(format!(
                        "device {i}: trailer says {claimed} {name}, the stream has {seen}"
                    ));
                }
            }
        }
        None
    }
}

/// A decoded, validated record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    /// The record kind.
    pub kind: RecordKind,
    /// DATA only: this fragment closes a device chunk.
    pub chunk_end: bool,
    /// The device index (0 for the trailer).
    pub device: u16,
    /// The phase (`None` for the trailer).
    pub phase: Option<Phase>,
    /// The record's sequence number.
    pub sequence: u64,
    /// The payload length.
    pub payload_len: u32,
}

impl RecordHeader {
    /// Encodes this header for `payload` of the stream `session`, computing the CRC over the
    /// session id, the header's first `RECORD_CRC_OFFSET` bytes and `payload`.
    /// `payload_len` must equal `payload.len()`.
    pub(crate) fn encode(&self, session: &SessionId, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0] = self.kind.wire();
        h[1] = if self.chunk_end {
            RECORD_FLAG_CHUNK_END
        } else {
            0
        };
        h[2..4].copy_from_slice(&self.device.to_le_bytes());
        h[4] = self.phase.map_or(0, Phase::wire);
        h[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        h[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        let crc = record_crc(session, &h, payload);
        h[RECORD_CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// A record header as read, not yet trusted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RawRecordHeader {
    bytes: [u8; RECORD_HEADER_LEN],
}

impl RawRecordHeader {
    pub(crate) fn new(bytes: [u8; RECORD_HEADER_LEN]) -> Self {
        RawRecordHeader { bytes }
    }

    fn kind_byte(&self) -> u8 {
        self.bytes[0]
    }

    fn payload_len_field(&self) -> u32 {
        le_u32(&self.bytes, 16)
    }

    /// The payload length, checked against the bounds of the record's kind, so it can be
    /// read into a buffer of at most [`MAX_FRAGMENT`] bytes. Run before reading the payload.
    pub(crate) fn checked_payload_len(
        &self,
        device_count: usize,
    ) -> std::result::Result<usize, String> {
        let kind_byte = self.kind_byte();
        let kind = RecordKind::from_wire(kind_byte).ok_or_else(|| {
            format!("unknown record kind {kind_byte} (1 DATA, 2 END_OF_PHASE, 3 TRAILER)")
        })?;
        let len = self.payload_len_field();
        let ok = match kind {
            RecordKind::Data => (1..=MAX_FRAGMENT as u64).contains(&u64::from(len)),
            RecordKind::EndOfPhase => len == 0,
            RecordKind::Trailer => u64::from(len) == trailer_len(device_count) as u64,
        };
        if !ok {
            let bound = match kind {
                RecordKind::Data => format!("1..={MAX_FRAGMENT}"),
                RecordKind::EndOfPhase => "0".to_owned(),
                RecordKind::Trailer => {
                    format!("{} for {device_count} devices", trailer_len(device_count))
                }
            };
            return Err(format!(
                "{kind} record with payload length {len} (allowed: {bound})"
            ));
        }
        // Bounded by MAX_FRAGMENT above, fits any usize of 32 bits or more.
        Ok(len as usize)
    }

    /// The stored and the computed CRC of this header with `payload`.
    pub(crate) fn crc(&self, session: &SessionId, payload: &[u8]) -> (u32, u32) {
        (self.stored_crc(), record_crc(session, &self.bytes, payload))
    }

    /// The CRC the record carries.
    pub(crate) fn stored_crc(&self) -> u32 {
        le_u32(&self.bytes, RECORD_CRC_OFFSET)
    }

    /// The raw bytes (for the tag).
    pub(crate) fn bytes(&self) -> &[u8; RECORD_HEADER_LEN] {
        &self.bytes
    }

    /// Checks the fields other than the length; run after the CRC matched.
    pub(crate) fn validate(
        &self,
        device_count: usize,
    ) -> std::result::Result<RecordHeader, String> {
        let b = &self.bytes;
        let kind_byte = self.kind_byte();
        let kind = RecordKind::from_wire(kind_byte)
            .ok_or_else(|| format!("unknown record kind {kind_byte}"))?;
        let flags = b[1];
        let allowed_flags = if kind == RecordKind::Data {
            RECORD_FLAG_CHUNK_END
        } else {
            0
        };
        if flags & !allowed_flags != 0 {
            return Err(format!("{kind} record with unknown flags {flags:#04x}"));
        }
        if b[5..8] != [0, 0, 0] {
            return Err(format!("{kind} record with non-zero reserved bytes"));
        }
        let device = le_u16(b, 2);
        let phase_byte = b[4];
        let phase = if kind == RecordKind::Trailer {
            if device != 0 || phase_byte != 0 {
                return Err(format!(
                    "TRAILER record with device {device} and phase {phase_byte} (both must be 0)"
                ));
            }
            None
        } else {
            if usize::from(device) >= device_count {
                return Err(format!(
                    "{kind} record for device {device}, but the stream has {device_count} devices"
                ));
            }
            Some(Phase::from_wire(phase_byte).ok_or_else(|| {
                format!("{kind} record with unknown phase {phase_byte} (1 PRE_COPY, 2 STOP_COPY)")
            })?)
        };
        Ok(RecordHeader {
            kind,
            chunk_end: flags & RECORD_FLAG_CHUNK_END != 0,
            device,
            phase,
            sequence: le_u64(b, 8),
            payload_len: self.payload_len_field(),
        })
    }
}

/// Where a device stands in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Pre-copy data may follow (LIVE devices only).
    PreCopy,
    /// A LIVE device's pre-copy ended: stop-copy data may follow, or more pre-copy data,
    /// which reopens its pre-copy (the device re-initialised, `VFIO_PRECOPY_INFO_REINIT`,
    /// and sends its new initial data before it stops).
    PreCopyEnded,
    /// Stop-copy started (or pre-copy never existed): stop-copy data may follow.
    StopCopy,
    /// Stop-copy ended: nothing more for this device.
    Done,
}

#[derive(Debug, Clone, Copy)]
struct DeviceState {
    live: bool,
    stage: Stage,
    chunk_open: bool,
}

/// The ordering rules of a stream, shared by the writer (so it never writes an invalid
/// stream) and the reader (so it refuses one). `check_*` methods do not change anything;
/// `record_*` methods account a record that was checked.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    devices: Vec<DeviceState>,
    totals: Totals,
}

impl Tracker {
    pub(crate) fn new(header: &StreamHeader) -> Self {
        let devices = header
            .devices
            .iter()
            .map(|d| DeviceState {
                live: d.live,
                stage: if d.live {
                    Stage::PreCopy
                } else {
                    Stage::StopCopy
                },
                chunk_open: false,
            })
            .collect();
        Tracker {
            devices,
            totals: Totals::new(header.devices.len()),
        }
    }

    /// The totals so far; `records` is the number of records so far, i.e. the next
    /// record's sequence number.
    pub(crate) fn totals(&self) -> &Totals {
        &self.totals
    }

    fn device(&self, device: u16) -> std::result::Result<&DeviceState, String> {
        self.devices.get(usize::from(device)).ok_or_else(|| {
            format!(
                "device {device} out of range (the stream has {} devices)",
                self.devices.len()
            )
        })
    }

    pub(crate) fn check_data(&self, device: u16, phase: Phase) -> std::result::Result<(), String> {
        let d = self.device(device)?;
        match (phase, d.stage) {
            (_, Stage::Done) => Err(format!(
                "device {device}: {phase} DATA after the device ended stop-copy"
            )),
            (Phase::PreCopy, _) if !d.live => Err(format!(
                "device {device}: pre-copy DATA for a device not marked LIVE in the header"
            )),
            (Phase::PreCopy, Stage::StopCopy) => Err(format!(
                "device {device}: pre-copy DATA after the device started stop-copy"
            )),
            (Phase::StopCopy, Stage::PreCopy) => Err(format!(
                "device {device}: stop-copy DATA before END_OF_PHASE(pre-copy)"
            )),
            _ => Ok(()),
        }
    }

    pub(crate) fn record_data(&mut self, device: u16, phase: Phase, len: usize, chunk_end: bool) {
        self.totals.records += 1;
        let i = usize::from(device);
        if let Some(d) = self.devices.get_mut(i) {
            d.chunk_open = !chunk_end;
            if d.stage == Stage::PreCopyEnded {
                d.stage = match phase {
                    Phase::PreCopy => Stage::PreCopy,
                    Phase::StopCopy => Stage::StopCopy,
                };
            }
        }
        if let Some(t) = self.totals.devices.get_mut(i) {
            let len = len as u64;
            match phase {
                Phase::PreCopy => t.pre_copy_bytes += len,
                Phase::StopCopy => t.stop_copy_bytes += len,
            }
            if chunk_end {
                t.chunks += 1;
            }
        }
    }

    pub(crate) fn check_end_phase(
        &self,
        device: u16,
        phase: Phase,
    ) -> std::result::Result<(), String> {
        let d = self.device(device)?;
        match (phase, d.stage) {
            (Phase::PreCopy, _) if !d.live => {
                return Err(format!(
                    "device {device}: END_OF_PHASE(pre-copy) for a device not marked LIVE in the header"
                ))
            }
            (Phase::PreCopy, Stage::PreCopy)
            | (Phase::StopCopy, Stage::StopCopy | Stage::PreCopyEnded) => {}
            (Phase::StopCopy, Stage::PreCopy) => {
                return Err(format!(
                    "device {device}: END_OF_PHASE(stop-copy) before END_OF_PHASE(pre-copy)"
                ))
            }
            (_, Stage::PreCopyEnded | Stage::StopCopy | Stage::Done) => {
                return Err(format!("device {device}: {phase} already ended"))
            }
        }
        if d.chunk_open {
            return Err(format!(
                "device {device}: END_OF_PHASE({phase}) while a chunk is open \
                 (the device's last DATA record lacks CHUNK_END)"
            ));
        }
        Ok(())
    }

    pub(crate) fn record_end_phase(&mut self, device: u16, phase: Phase) {
        self.totals.records += 1;
        if let Some(d) = self.devices.get_mut(usize::from(device)) {
            d.stage = match phase {
                Phase::PreCopy => Stage::PreCopyEnded,
                Phase::StopCopy => Stage::Done,
            };
        }
    }

    pub(crate) fn check_trailer(&self) -> std::result::Result<(), String> {
        match self.devices.iter().position(|d| d.stage != Stage::Done) {
            Some(i) => Err(format!(
                "TRAILER before device {i} ended stop-copy (missing END_OF_PHASE records)"
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header of `n` devices, device `i` LIVE if `live(i)`.
    /// The session of the test headers.
    pub(crate) const TEST_SESSION: SessionId = *b"0123456789abcdef";

    pub(crate) fn header(n: usize, live: impl Fn(usize) -> bool) -> StreamHeader {
        StreamHeader {
            session_id: TEST_SESSION,
            epoch: 7,
            devices: (0..n)
                .map(|i| DeviceDescriptor {
                    protocol: if i % 2 == 0 {
                        Protocol::V2
                    } else {
                        Protocol::V1
                    },
                    live: live(i),
                    migration_flags: if i % 2 == 0 { 0x5 } else { 0 },
                    model: format!("mock:v{i}"),
                })
                .collect(),
        }
    }

    /// An encoded record with any field values (the CRC is right).
    pub(crate) fn raw_record(
        kind: u8,
        flags: u8,
        device: u16,
        phase: u8,
        seq: u64,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0] = kind;
        h[1] = flags;
        h[2..4].copy_from_slice(&device.to_le_bytes());
        h[4] = phase;
        h[8..16].copy_from_slice(&seq.to_le_bytes());
        h[16..20].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        let crc = record_crc(&TEST_SESSION, &h, payload);
        h[20..].copy_from_slice(&crc.to_le_bytes());
        let mut v = h.to_vec();
        v.extend_from_slice(payload);
        v
    }

    /// Recomputes the CRC at the end of an encoded header.
    pub(crate) fn fix_header_crc(h: &mut [u8]) {
        let n = h.len() - CRC_LEN;
        let crc = crate::stream::crc::crc32c(&h[..n]);
        h[n..].copy_from_slice(&crc.to_le_bytes());
    }

    fn detail(e: Error) -> String {
        e.to_string()
    }

    #[test]
    fn header_round_trip() {
        let h = header(3, |i| i != 1);
        let bytes = h.encode().unwrap();
        let (back, len) = StreamHeader::decode(&bytes).unwrap();
        assert_eq!(back, h);
        assert_eq!(len, bytes.len());
        assert_eq!(
            len,
            HEADER_FIXED_LEN + 3 * (DESCRIPTOR_FIXED_LEN + 7) + CRC_LEN
        );
    }

    #[test]
    fn header_refuses_bad_fields() {
        let good = header(1, |_| true).encode().unwrap();

        let mut b = good.clone();
        b[0] = b'X';
        assert!(detail(StreamHeader::decode(&b).unwrap_err()).contains("bad magic"));

        let mut b = good.clone();
        b[8] = 3;
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("unsupported stream format version 3"), "{e}");

        for count in [0u16, 65] {
            let mut b = good.clone();
            b[10..12].copy_from_slice(&count.to_le_bytes());
            let e = detail(StreamHeader::decode(&b).unwrap_err());
            assert!(
                e.contains(&format!("device count {count} out of range")),
                "{e}"
            );
        }

        let mut b = good.clone();
        b[36] = 2; // an unknown header flag
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("unknown header flags 0x00000002"), "{e}");

        let mut b = good.clone();
        b[40] = 3;
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("device 0: unknown protocol 3"), "{e}");

        let mut b = good.clone();
        b[41] = 0x3;
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("unknown descriptor flags 0x03"), "{e}");

        let mut b = good.clone();
        b[40] = 1; // v1 with the v2 flags of device 0
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(
            e.contains("v1 protocol with non-zero migration flags 0x5"),
            "{e}"
        );

        let mut b = good.clone();
        b[52] = 0xff; // first model byte
        fix_header_crc(&mut b);
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("not UTF-8"), "{e}");

        let mut b = good.clone();
        b[42..44].copy_from_slice(&0u16.to_le_bytes());
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("model length 0 out of range"), "{e}");

        let mut b = good.clone();
        b[40] ^= 1;
        let e = detail(StreamHeader::decode(&b).unwrap_err());
        assert!(e.contains("CRC mismatch"), "{e}");
    }

    #[test]
    fn header_encode_validates() {
        let mut h = header(1, |_| true);
        h.devices[0].model = String::new();
        assert!(h.encode().is_err());
        h.devices[0].model = "x".repeat(MAX_MODEL_LEN + 1);
        assert!(h.encode().is_err());
        h.devices[0].model = "x".repeat(MAX_MODEL_LEN);
        assert!(h.encode().is_ok());
        h.devices.clear();
        assert!(h.encode().is_err());
        let h = header(MAX_DEVICES + 1, |_| false);
        assert!(h.encode().is_err());
        let h = header(MAX_DEVICES, |_| false);
        assert_eq!(
            h.encode().unwrap().len(),
            HEADER_FIXED_LEN + CRC_LEN + MAX_DEVICES * DESCRIPTOR_FIXED_LEN + (10 * 7 + 54 * 8)
        );
    }

    #[test]
    fn record_header_round_trip_and_bounds() {
        let payload = b"hello";
        let h = RecordHeader {
            kind: RecordKind::Data,
            chunk_end: true,
            device: 1,
            phase: Some(Phase::StopCopy),
            sequence: 42,
            payload_len: 5,
        };
        let raw = RawRecordHeader::new(h.encode(&TEST_SESSION, payload));
        assert_eq!(raw.checked_payload_len(2), Ok(5));
        let (stored, computed) = raw.crc(&TEST_SESSION, payload);
        assert_eq!(stored, computed);
        assert_eq!(raw.validate(2), Ok(h));
        assert!(raw.validate(1).unwrap_err().contains("device 1"));

        for (kind, len, ok) in [
            (1u8, 0u32, false),
            (1, MAX_FRAGMENT as u32, true),
            (1, MAX_FRAGMENT as u32 + 1, false),
            (1, u32::MAX, false),
            (2, 0, true),
            (2, 1, false),
            (3, trailer_len(2) as u32, true),
            (3, trailer_len(2) as u32 + 1, false),
            (4, 0, false),
            (0, 0, false),
        ] {
            let mut b = [0u8; RECORD_HEADER_LEN];
            b[0] = kind;
            b[16..20].copy_from_slice(&len.to_le_bytes());
            assert_eq!(
                RawRecordHeader::new(b).checked_payload_len(2).is_ok(),
                ok,
                "kind {kind} len {len}"
            );
        }
    }

    #[test]
    fn trailer_round_trip() {
        let mut t = Totals::new(2);
        t.records = 9;
        t.devices[1] = DeviceTotals {
            pre_copy_bytes: 1,
            stop_copy_bytes: 2,
            chunks: 3,
        };
        let b = t.encode();
        assert_eq!(b.len(), trailer_len(2));
        assert_eq!(Totals::decode(&b, 2), Ok(t.clone()));
        assert!(Totals::decode(&b, 1).is_err());
        assert_eq!(t.mismatch(&t), None);
        let mut other = t.clone();
        other.devices[1].chunks = 4;
        assert!(t
            .mismatch(&other)
            .unwrap()
            .contains("device 1: trailer says 3 chunks"));
    }

    #[test]
    fn tracker_rules() {
        let h = header(2, |i| i == 0);
        let mut t = Tracker::new(&h);
        // Device 1 is not LIVE.
        assert!(t
            .check_data(1, Phase::PreCopy)
            .unwrap_err()
            .contains("not marked LIVE"));
        assert!(t
            .check_end_phase(1, Phase::PreCopy)
            .unwrap_err()
            .contains("not marked LIVE"));
        assert!(t
            .check_data(0, Phase::StopCopy)
            .unwrap_err()
            .contains("before END_OF_PHASE"));
        assert!(t.check_end_phase(0, Phase::StopCopy).is_err());
        assert!(t
            .check_data(2, Phase::StopCopy)
            .unwrap_err()
            .contains("out of range"));
        t.check_data(0, Phase::PreCopy).unwrap();
        t.record_data(0, Phase::PreCopy, 10, false);
        assert!(t
            .check_end_phase(0, Phase::PreCopy)
            .unwrap_err()
            .contains("chunk is open"));
        t.record_data(0, Phase::PreCopy, 10, true);
        t.check_end_phase(0, Phase::PreCopy).unwrap();
        t.record_end_phase(0, Phase::PreCopy);
        assert!(t
            .check_end_phase(0, Phase::PreCopy)
            .unwrap_err()
            .contains("already ended"));
        // More pre-copy data reopens the device's pre-copy (a REINIT), which ends again.
        t.check_data(0, Phase::PreCopy).unwrap();
        t.record_data(0, Phase::PreCopy, 10, true);
        t.check_end_phase(0, Phase::PreCopy).unwrap();
        t.record_end_phase(0, Phase::PreCopy);
        // Once stop-copy data came, pre-copy is over for good.
        t.check_data(0, Phase::StopCopy).unwrap();
        t.record_data(0, Phase::StopCopy, 10, true);
        assert!(t
            .check_data(0, Phase::PreCopy)
            .unwrap_err()
            .contains("after the device started stop-copy"));
        assert!(t.check_trailer().is_err());
        t.record_end_phase(0, Phase::StopCopy);
        assert!(t
            .check_data(0, Phase::StopCopy)
            .unwrap_err()
            .contains("ended stop-copy"));
        assert!(t.check_trailer().unwrap_err().contains("device 1"));
        t.record_end_phase(1, Phase::StopCopy);
        t.check_trailer().unwrap();
        assert_eq!(t.totals().records, 8);
        assert_eq!(t.totals().devices[0].pre_copy_bytes, 30);
        assert_eq!(t.totals().devices[0].chunks, 3);
    }

    /// A record's CRC carried over its pieces as they arrive is the CRC docs/stream-format.md
    /// defines (CRC32C of the session id, header bytes 0..20, then the payload; computed here
    /// with the `crc32c` crate in one call over the concatenation), and it is offered only
    /// once the whole payload was seen.
    #[test]
    fn a_crc_carried_over_pieces_is_the_records_crc() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        let frame = raw_record(0, 1, 0, 1, 9, &payload);
        let mut defined = TEST_SESSION.to_vec();
        defined.extend_from_slice(&frame[..RECORD_CRC_OFFSET]);
        defined.extend_from_slice(&payload);
        let defined = crc32c::crc32c(&defined);
        for piece in [1, 3, 24, 25, 1000, frame.len()] {
            let mut partial = None;
            let mut seen = 0;
            while seen < frame.len() {
                let whole = partial.and_then(|p: PartialRecordCrc| p.whole(&frame[..seen]));
                assert_eq!(whole, None, "{piece}-byte pieces: offered at {seen} bytes");
                seen = (seen + piece).min(frame.len());
                PartialRecordCrc::advance(&mut partial, &TEST_SESSION, &frame[..seen]);
            }
            let whole = partial.and_then(|p| p.whole(&frame));
            assert_eq!(whole, Some(defined), "{piece}-byte pieces");
        }
    }
}
