// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Wire format of the session handshake's control messages: pure encoding and decoding, and
//! reading and writing one message. See `docs/stream-format.md`, "Session handshake".

use std::fmt;
use std::io::{self, Read, Write};

use vfio_mig::error::{Error, Result};

/// Magic bytes every control message starts with.
pub const MAGIC: [u8; 4] = *b"VMHS";
/// The handshake version this code speaks (and the only one it reads).
pub const VERSION: u8 = 1;
/// Length of a message's frame header (magic, version, kind, length, CRC).
pub const FRAME_HEADER_LEN: usize = 12;
/// Longest reason text of REFUSE and FAILED, in bytes.
pub const MAX_REASON_LEN: usize = 1024;
/// Longest payload of any message.
pub const MAX_PAYLOAD_LEN: usize = 4 + MAX_REASON_LEN;
/// HELLO feature bit: the source waits for SWITCHOVER_ACK after pre-copy.
pub const FEATURE_SWITCHOVER_ACK: u32 = 1 << 0;
/// HELLO feature bit: the source offers several channels; OFFER_CHANNELS follows HELLO.
pub const FEATURE_CHANNELS: u32 = 1 << 1;
/// Every HELLO feature bit this version knows.
pub const KNOWN_FEATURES: u32 = FEATURE_SWITCHOVER_ACK | FEATURE_CHANNELS;
/// Most channels (connections, the main one included) a session may use.
pub const MAX_CHANNELS: u16 = 16;
/// Length of the secret that binds a further connection to its session.
pub const TOKEN_LEN: usize = 16;

/// The secret a destination hands its source (in CHANNELS, over the main connection) and
/// every further connection of the session presents (in CHANNEL).
pub type ChannelToken = [u8; TOKEN_LEN];

pub use vfio_mig::wire::SessionId;
pub use vfio_mig_fence::ReasonCode;

/// The payload of REFUSE and FAILED: a code and a human-readable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// The machine-readable code.
    pub code: ReasonCode,
    /// One line of text (at most [`MAX_REASON_LEN`] bytes of UTF-8 on the wire).
    pub text: String,
}

impl Reason {
    /// A reason with `code` and `text`.
    pub fn new(code: ReasonCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

/// A control message of the session handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source to destination, first on the connection, right before the stream header.
    Hello {
        /// Feature bits ([`FEATURE_SWITCHOVER_ACK`]).
        features: u32,
    },
    /// The destination accepts the session; the source may start saving.
    Accept {
        /// The session accepted.
        session: SessionId,
    },
    /// The destination refuses the session; neither device was touched.
    Refuse(Reason),
    /// The destination already completed this session: its device runs this state.
    AlreadyCompleted {
        /// The session.
        session: SessionId,
    },
    /// The destination loaded all pre-copy data; the source may stop its device.
    SwitchoverAck {
        /// The session.
        session: SessionId,
    },
    /// After SWITCHOVER_ACK: the destination loaded the pre-copy data of a device whose
    /// pre-copy the source reopened (the device re-initialised, `VFIO_PRECOPY_INFO_REINIT`,
    /// and sent new initial data after its END_OF_PHASE(PRE_COPY)). One per reopened phase;
    /// the source stops no device before it has them all (QEMU 11.1 re-requests the
    /// switchover-ack the same way).
    SwitchoverAckAgain {
        /// The session.
        session: SessionId,
    },
    /// The destination read and checked the whole stream and holds the complete state in
    /// RESUMING; it waits for COMMIT.
    Loaded {
        /// The session.
        session: SessionId,
    },
    /// Source to destination, after LOADED: resume your device.
    Commit {
        /// The session.
        session: SessionId,
    },
    /// The destination device runs with the migrated state.
    Resumed {
        /// The session.
        session: SessionId,
    },
    /// The destination failed after ACCEPT; its device was reset.
    Failed(Reason),
    /// After COMMIT: the destination passed its point of no return (a device entered RUNNING
    /// and runs the migrated state) but not every device runs; the reason names those that
    /// run and those that failed to run and were reset. The source must not run the state
    /// again: it stops its devices as after RESUMED.
    PartlyResumed(Reason),
    /// Source to destination, right after a HELLO with [`FEATURE_CHANNELS`]: how many
    /// channels (connections, the main one included) the source would use.
    OfferChannels {
        /// 1 to [`MAX_CHANNELS`].
        count: u16,
    },
    /// The destination's answer to OFFER_CHANNELS, after its checks and before ACCEPT: the
    /// number of channels it takes and the token the further connections must present.
    Channels {
        /// The session.
        session: SessionId,
        /// 1 to the number offered.
        count: u16,
        /// The secret of [`Message::Channel`].
        token: ChannelToken,
    },
    /// Source to destination, first on a further connection: binds it to a session as
    /// channel `index`.
    Channel {
        /// The session.
        session: SessionId,
        /// 1 to the accepted count - 1 (channel 0 is the main connection).
        index: u16,
        /// The token of the session's CHANNELS.
        token: ChannelToken,
    },
}

impl Message {
    /// The kind byte.
    pub const fn kind(&self) -> u8 {
        match self {
            Message::Hello { .. } => 1,
            Message::Accept { .. } => 2,
            Message::Refuse(_) => 3,
            Message::AlreadyCompleted { .. } => 4,
            Message::SwitchoverAck { .. } => 5,
            Message::Loaded { .. } => 6,
            Message::Commit { .. } => 7,
            Message::Resumed { .. } => 8,
            Message::Failed(_) => 9,
            Message::OfferChannels { .. } => 10,
            Message::Channels { .. } => 11,
            Message::Channel { .. } => 12,
            Message::PartlyResumed(_) => 13,
            Message::SwitchoverAckAgain { .. } => 14,
        }
    }

    /// The session id a message carries (ACCEPT, ALREADY_COMPLETED, SWITCHOVER_ACK, LOADED,
    /// COMMIT, RESUMED).
    pub const fn session(&self) -> Option<&SessionId> {
        match self {
            Message::Accept { session }
            | Message::AlreadyCompleted { session }
            | Message::SwitchoverAck { session }
            | Message::SwitchoverAckAgain { session }
            | Message::Loaded { session }
            | Message::Commit { session }
            | Message::Resumed { session }
            | Message::Channels { session, .. }
            | Message::Channel { session, .. } => Some(session),
            Message::Hello { .. }
            | Message::Refuse(_)
            | Message::Failed(_)
            | Message::PartlyResumed(_)
            | Message::OfferChannels { .. } => None,
        }
    }

    /// The message's name, as in the documentation.
    pub const fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// The encoded message, frame header included. A reason text longer than
    /// [`MAX_REASON_LEN`] bytes is cut at a character boundary.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(32);
        match self {
            Message::Hello { features } => payload.extend_from_slice(&features.to_le_bytes()),
            Message::Accept { session }
            | Message::AlreadyCompleted { session }
            | Message::SwitchoverAck { session }
            | Message::SwitchoverAckAgain { session }
            | Message::Loaded { session }
            | Message::Commit { session }
            | Message::Resumed { session } => payload.extend_from_slice(session),
            Message::Refuse(r) | Message::Failed(r) | Message::PartlyResumed(r) => {
                let mut end = r.text.len().min(MAX_REASON_LEN);
                while !r.text.is_char_boundary(end) {
                    end -= 1;
                }
                let text = &r.text.as_bytes()[..end];
                payload.extend_from_slice(&r.code.wire().to_le_bytes());
                payload.extend_from_slice(&(text.len() as u16).to_le_bytes());
                payload.extend_from_slice(text);
            }
            Message::OfferChannels { count } => {
                payload.extend_from_slice(&count.to_le_bytes());
                payload.extend_from_slice(&[0, 0]);
            }
            Message::Channels {
                session,
                count: n,
                token,
            }
            | Message::Channel {
                session,
                index: n,
                token,
            } => {
                payload.extend_from_slice(session);
                payload.extend_from_slice(&n.to_le_bytes());
                payload.extend_from_slice(&[0, 0]);
                payload.extend_from_slice(token);
            }
        }
        let mut out = Vec::with_capacity(FRAME_HEADER_LEN + payload.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.kind());
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out), &payload);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes one message from the start of `bytes`; returns it and its encoded length.
    /// Checks, in order: magic, version, kind, the payload length against the kind's bound,
    /// the CRC, then the payload's fields.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize)> {
        let step = "decode handshake message";
        let head: &[u8; FRAME_HEADER_LEN] = bytes
            .get(..FRAME_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| {
                Error::stream(
                    step,
                    format!(
                        "truncated message: {} of {FRAME_HEADER_LEN} bytes",
                        bytes.len()
                    ),
                )
            })?;
        let len = check_frame(head).map_err(|d| Error::stream(step, d))?;
        let payload = bytes
            .get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len)
            .ok_or_else(|| {
                Error::stream(
                    step,
                    format!(
                        "truncated message: payload of {len} bytes, {} present",
                        bytes.len() - FRAME_HEADER_LEN
                    ),
                )
            })?;
        let msg = decode_payload(head, payload).map_err(|d| Error::stream(step, d))?;
        Ok((msg, FRAME_HEADER_LEN + len))
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Refuse(r) | Message::Failed(r) | Message::PartlyResumed(r) => {
                write!(f, "{}({}: {})", self.name(), r.code, r.text)
            }
            _ => f.write_str(self.name()),
        }
    }
}

const fn kind_name(kind: u8) -> &'static str {
    match kind {
        1 => "HELLO",
        2 => "ACCEPT",
        3 => "REFUSE",
        4 => "ALREADY_COMPLETED",
        5 => "SWITCHOVER_ACK",
        6 => "LOADED",
        7 => "COMMIT",
        8 => "RESUMED",
        9 => "FAILED",
        10 => "OFFER_CHANNELS",
        11 => "CHANNELS",
        12 => "CHANNEL",
        13 => "PARTLY_RESUMED",
        14 => "SWITCHOVER_ACK_AGAIN",
        _ => "unknown",
    }
}

/// The payload length rule of `kind`: (smallest, largest), or `None` for an unknown kind.
const fn payload_bounds(kind: u8) -> Option<(usize, usize)> {
    match kind {
        1 => Some((4, 4)),
        2 | 4..=8 | 14 => Some((16, 16)),
        3 | 9 | 13 => Some((4, MAX_PAYLOAD_LEN)),
        10 => Some((4, 4)),
        11 | 12 => Some((36, 36)),
        _ => None,
    }
}

/// How the plain-text notice of a TLS endpoint (`transport::tls::NOT_TLS_NOTICE`) begins.
const PLAIN_TEXT_ANSWER: &[u8] = b"vfio-mig: ";

/// Checks a frame header; returns the payload length.
fn check_frame(head: &[u8; FRAME_HEADER_LEN]) -> std::result::Result<usize, String> {
    if head.starts_with(PLAIN_TEXT_ANSWER) {
        // A TLS listener answers a plain connection with a line of text.
        return Err(format!(
            "the peer answered in plain text ({:?}...), as a vfio-mig TLS endpoint answers a \
             connection without TLS: it accepts TLS 1.3 connections only (connect with TLS, \
             not --insecure)",
            String::from_utf8_lossy(head)
        ));
    }
    if head[..4] != MAGIC {
        return Err(format!(
            "not a vfio-mig handshake message: bad magic {:02x?}",
            &head[..4]
        ));
    }
    if head[4] != VERSION {
        return Err(format!(
            "unsupported handshake version {} (this build speaks version {VERSION})",
            head[4]
        ));
    }
    let kind = head[5];
    let (min, max) = payload_bounds(kind).ok_or_else(|| format!("unknown message kind {kind}"))?;
    let len = usize::from(u16::from_le_bytes([head[6], head[7]]));
    if !(min..=max).contains(&len) {
        return Err(format!(
            "{} with a payload of {len} bytes (allowed {min}..={max})",
            kind_name(kind)
        ));
    }
    Ok(len)
}

fn decode_payload(
    head: &[u8; FRAME_HEADER_LEN],
    payload: &[u8],
) -> std::result::Result<Message, String> {
    let stored = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&head[..8]), payload);
    if stored != computed {
        return Err(format!(
            "CRC mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt message"
        ));
    }
    let session = || {
        let mut s = [0u8; 16];
        s.copy_from_slice(payload.get(..16).unwrap_or(&[0; 16]));
        s
    };
    let reason = || -> std::result::Result<Reason, String> {
        let code = ReasonCode::from_wire(u16::from_le_bytes([payload[0], payload[1]]));
        let len = usize::from(u16::from_le_bytes([payload[2], payload[3]]));
        if len != payload.len() - 4 {
            return Err(format!(
                "reason length {len} does not match the payload ({} text bytes)",
                payload.len() - 4
            ));
        }
        let text = std::str::from_utf8(&payload[4..])
            .map_err(|e| format!("reason text is not UTF-8: {e}"))?;
        Ok(Reason::new(code, text))
    };
    Ok(match head[5] {
        1 => Message::Hello {
            features: u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]),
        },
        2 => Message::Accept { session: session() },
        3 => Message::Refuse(reason()?),
        4 => Message::AlreadyCompleted { session: session() },
        5 => Message::SwitchoverAck { session: session() },
        6 => Message::Loaded { session: session() },
        7 => Message::Commit { session: session() },
        8 => Message::Resumed { session: session() },
        9 => Message::Failed(reason()?),
        13 => Message::PartlyResumed(reason()?),
        14 => Message::SwitchoverAckAgain { session: session() },
        10 => {
            let count = u16::from_le_bytes([payload[0], payload[1]]);
            if payload[2..4] != [0, 0] {
                return Err("OFFER_CHANNELS with reserved bytes not 0".into());
            }
            if !(1..=MAX_CHANNELS).contains(&count) {
                return Err(format!(
                    "OFFER_CHANNELS of {count} channels (allowed 1..={MAX_CHANNELS})"
                ));
            }
            Message::OfferChannels { count }
        }
        11 | 12 => {
            let n = u16::from_le_bytes([payload[16], payload[17]]);
            if payload[18..20] != [0, 0] {
                return Err(format!("{} with reserved bytes not 0", kind_name(head[5])));
            }
            let mut token = [0u8; TOKEN_LEN];
            token.copy_from_slice(&payload[20..36]);
            let session = session();
            if head[5] == 11 {
                if !(1..=MAX_CHANNELS).contains(&n) {
                    return Err(format!(
                        "CHANNELS of {n} channels (allowed 1..={MAX_CHANNELS})"
                    ));
                }
                Message::Channels {
                    session,
                    count: n,
                    token,
                }
            } else {
                if !(1..MAX_CHANNELS).contains(&n) {
                    return Err(format!("CHANNEL index {n} (allowed 1..{MAX_CHANNELS})"));
                }
                Message::Channel {
                    session,
                    index: n,
                    token,
                }
            }
        }
        k => return Err(format!("unknown message kind {k}")),
    })
}

/// Reads exactly one message. EOF before its first byte is "the peer closed the connection";
/// lengths are checked before the payload is read, into a fixed stack buffer.
pub fn read_message<R: Read + ?Sized>(r: &mut R, step: &str) -> Result<Message> {
    let mut head = [0u8; FRAME_HEADER_LEN];
    let n = read_full(r, &mut head).map_err(|e| Error::transport(step, e))?;
    if n == 0 {
        return Err(Error::transport(
            step,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection",
            ),
        ));
    }
    if n < FRAME_HEADER_LEN {
        return Err(Error::stream(
            step,
            format!(
                "truncated message: the connection closed after {n} of {FRAME_HEADER_LEN} bytes"
            ),
        ));
    }
    let len = check_frame(&head).map_err(|d| Error::stream(step, d))?;
    let mut buf = [0u8; MAX_PAYLOAD_LEN];
    let payload = &mut buf[..len];
    let got = read_full(r, payload).map_err(|e| Error::transport(step, e))?;
    if got < len {
        return Err(Error::stream(
            step,
            format!("truncated message: the connection closed after {got} of {len} payload bytes"),
        ));
    }
    decode_payload(&head, payload).map_err(|d| Error::stream(step, d))
}

/// Writes one message and flushes.
pub fn write_message<W: Write + ?Sized>(w: &mut W, msg: &Message, step: &str) -> Result<()> {
    w.write_all(&msg.encode())
        .and_then(|()| w.flush())
        .map_err(|e| Error::transport(format!("{step}: send {}", msg.name()), e))
}

fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: SessionId = [7; 16];

    fn all() -> Vec<Message> {
        vec![
            Message::Hello { features: 1 },
            Message::Accept { session: S },
            Message::Refuse(Reason::new(ReasonCode::StaleEpoch, "stale epoch 3 < 5")),
            Message::AlreadyCompleted { session: S },
            Message::SwitchoverAck { session: S },
            Message::SwitchoverAckAgain { session: S },
            Message::Loaded { session: S },
            Message::Commit { session: S },
            Message::Resumed { session: S },
            Message::Failed(Reason::new(ReasonCode::Device, "")),
            Message::PartlyResumed(Reason::new(ReasonCode::Device, "dst0 runs; dst1 was reset")),
            Message::OfferChannels { count: 4 },
            Message::Channels {
                session: S,
                count: 2,
                token: [9; 16],
            },
            Message::Channel {
                session: S,
                index: 1,
                token: [9; 16],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all() {
            let bytes = m.encode();
            assert_eq!(Message::decode(&bytes).unwrap(), (m.clone(), bytes.len()));
            assert_eq!(read_message(&mut bytes.as_slice(), "t").unwrap(), m);
        }
    }

    /// The encoding of the documentation's example (docs/stream-format.md).
    #[test]
    fn example_encoding() {
        let hello = Message::Hello { features: 1 }.encode();
        assert_eq!(
            hello,
            [0x56, 0x4d, 0x48, 0x53, 1, 1, 4, 0, 0xdb, 0xe2, 0x08, 0x67, 1, 0, 0, 0],
            "{hello:02x?}"
        );
        let session = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";
        let accept = Message::Accept { session }.encode();
        assert_eq!(
            &accept[..12],
            &[0x56, 0x4d, 0x48, 0x53, 1, 2, 16, 0, 0x90, 0xcc, 0xd4, 0x01]
        );
        assert_eq!(&accept[12..], &session);
        let refuse =
            Message::Refuse(Reason::new(ReasonCode::StaleEpoch, "stale epoch 3 < 5")).encode();
        assert_eq!(
            &refuse[..12],
            &[0x56, 0x4d, 0x48, 0x53, 1, 3, 21, 0, 0xe2, 0xc8, 0x82, 0x24]
        );
        assert_eq!(&refuse[12..16], &[2, 0, 17, 0]);
        assert_eq!(&refuse[16..], b"stale epoch 3 < 5");
    }

    /// The channel messages of the documentation's example (docs/stream-format.md).
    #[test]
    fn channel_example_encoding() {
        let session = *b"\x00\x11\x22\x33\x44\x55\x66\x77\x88\x99\xaa\xbb\xcc\xdd\xee\xff";
        let token: ChannelToken = std::array::from_fn(|i| 0x10 + i as u8);
        let hello = Message::Hello {
            features: FEATURE_SWITCHOVER_ACK | FEATURE_CHANNELS,
        }
        .encode();
        assert_eq!(
            hello,
            [0x56, 0x4d, 0x48, 0x53, 1, 1, 4, 0, 0x5a, 0xc1, 0x6f, 0xd8, 3, 0, 0, 0]
        );
        let offer = Message::OfferChannels { count: 4 }.encode();
        assert_eq!(
            offer,
            [0x56, 0x4d, 0x48, 0x53, 1, 10, 4, 0, 0x9b, 0xf1, 0x47, 0x37, 4, 0, 0, 0]
        );
        let answer = Message::Channels {
            session,
            count: 2,
            token,
        }
        .encode();
        assert_eq!(
            &answer[..12],
            &[0x56, 0x4d, 0x48, 0x53, 1, 11, 36, 0, 0xd8, 0x9e, 0xb6, 0x57]
        );
        assert_eq!(&answer[12..28], &session);
        assert_eq!(&answer[28..32], &[2, 0, 0, 0]);
        assert_eq!(&answer[32..], &token);
        let bind = Message::Channel {
            session,
            index: 1,
            token,
        }
        .encode();
        assert_eq!(
            &bind[..12],
            &[0x56, 0x4d, 0x48, 0x53, 1, 12, 36, 0, 0x65, 0x80, 0x88, 0xec]
        );
        assert_eq!(&bind[28..32], &[1, 0, 0, 0]);
    }

    #[test]
    fn channel_fields_are_checked() {
        let frame = |kind: u8, payload: &[u8]| {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&[VERSION, kind]);
            out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&out), payload);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(payload);
            out
        };
        let err = |kind, payload: &[u8]| {
            Message::decode(&frame(kind, payload))
                .unwrap_err()
                .to_string()
        };
        assert!(err(10, &[0, 0, 0, 0]).contains("OFFER_CHANNELS of 0"));
        assert!(err(10, &[17, 0, 0, 0]).contains("OFFER_CHANNELS of 17"));
        assert!(err(10, &[2, 0, 1, 0]).contains("reserved"));
        let mut p = vec![0u8; 36];
        assert!(err(11, &p).contains("CHANNELS of 0"));
        assert!(err(12, &p).contains("CHANNEL index 0"));
        p[16] = 16;
        assert!(err(12, &p).contains("CHANNEL index 16"));
        p[16] = 1;
        p[19] = 1;
        assert!(err(12, &p).contains("reserved"));
    }

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let text = "é".repeat(MAX_REASON_LEN);
        let m = Message::Failed(Reason::new(ReasonCode::Device, text));
        let (back, _) = Message::decode(&m.encode()).unwrap();
        let Message::Failed(r) = back else { panic!() };
        assert_eq!(r.text.len(), MAX_REASON_LEN);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn the_tls_endpoints_notice_is_recognised() {
        let notice = crate::transport::tls::NOT_TLS_NOTICE;
        assert!(notice.starts_with(PLAIN_TEXT_ANSWER));
        let e = Message::decode(notice).unwrap_err().to_string();
        assert!(e.contains("accepts TLS 1.3 connections only"), "{e}");
    }

    #[test]
    fn bad_frames_are_refused_before_the_payload() {
        let good = Message::Accept { session: S }.encode();
        let with = |i: usize, v: u8| {
            let mut b = good.clone();
            b[i] = v;
            Message::decode(&b).unwrap_err().to_string()
        };
        assert!(with(0, b'X').contains("bad magic"));
        assert!(with(4, 2).contains("unsupported handshake version 2"));
        assert!(with(5, 0).contains("unknown message kind 0"));
        assert!(with(5, 15).contains("unknown message kind 15"));
        assert!(with(6, 17).contains("ACCEPT with a payload of 17 bytes"));
        assert!(with(7, 0xff).contains("payload of"));
        assert!(with(20, 0).contains("CRC mismatch"));
        assert!(Message::decode(&good[..11])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        assert!(Message::decode(&good[..20])
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let e =
            vfio_mig::error::Report(&read_message(&mut &b""[..], "wait for ACCEPT").unwrap_err())
                .to_string();
        assert_eq!(e, "wait for ACCEPT: the peer closed the connection");
        let e =
            vfio_mig::error::Report(&read_message(&mut &good[..5], "x").unwrap_err()).to_string();
        assert!(e.contains("after 5 of 12 bytes"), "{e}");
    }

    #[test]
    fn reason_length_and_utf8_are_checked() {
        let mut payload = vec![1, 0, 3, 0, b'a', b'b'];
        let frame = |payload: &[u8]| {
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&[VERSION, 3]);
            out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            let crc = crc32c::crc32c_append(crc32c::crc32c(&out), payload);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(payload);
            out
        };
        let e = Message::decode(&frame(&payload)).unwrap_err().to_string();
        assert!(e.contains("reason length 3"), "{e}");
        payload = vec![1, 0, 2, 0, 0xff, 0xfe];
        let e = Message::decode(&frame(&payload)).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
        payload = vec![0x34, 0x12, 0, 0];
        let (m, _) = Message::decode(&frame(&payload)).unwrap();
        assert_eq!(
            m,
            Message::Refuse(Reason::new(ReasonCode::Unknown(0x1234), ""))
        );
    }

    proptest! {
        #[test]
        fn every_single_bit_flip_is_detected(which in 0usize..12, bit in 0usize..(8 * 48)) {
            let bytes = all()[which].encode();
            let bit = bit % (8 * bytes.len());
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Message::decode(&bad).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Message::decode(&bytes);
            let _ = read_message(&mut bytes.as_slice(), "fuzz");
        }
    }
}
