// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The session handshake: how a source and a destination agree, over a bidirectional
//! connection, that a device's state may move, and when the handoff is done.
//!
//! The source writes, in order: HELLO, the stream header (the one a file starts with:
//! session id, epoch, device descriptors), then, only after the destination's ACCEPT, the
//! stream's records and trailer, and at last COMMIT. The destination answers on the reverse
//! direction with small, CRC-checked control messages ([`Message`]):
//!
//! ```text
//! source                                        destination
//!   HELLO, stream header  ───────────────────▶    checks identity, protocol, features,
//!                                                 fencing (epoch, completed sessions)
//!                         ◀───────────────────   ACCEPT | REFUSE(reason) | ALREADY_COMPLETED
//!   (device untouched until ACCEPT)
//!   pre-copy records, END_OF_PHASE(PRE_COPY) ─▶   loads them
//!                         ◀───────────────────   SWITCHOVER_ACK            (live only)
//!   (a device re-initialised: its pre-copy reopened with the new initial data,
//!    END_OF_PHASE(PRE_COPY) again) ──────────▶
//!                         ◀───────────────────   SWITCHOVER_ACK_AGAIN      (one per device)
//!   stop device, stop-copy records, trailer ──▶   loads and verifies everything
//!                         ◀───────────────────   LOADED
//!   COMMIT  ─────────────────────────────────▶    records the session completed, resumes
//!                         ◀───────────────────   RESUMED | FAILED(reason)
//! ```
//!
//! The two-phase end (LOADED, COMMIT) makes the handoff's point of no return explicit:
//! before COMMIT, any failure (a closed connection included) leaves the destination reset
//! and the source rolled back to RUNNING; after COMMIT only a lost RESUMED leaves the outcome
//! in doubt, and then the source stays stopped ([`crate::Error::InDoubt`]) rather than risk
//! the same state running on both hosts. A retry with the same session id is answered
//! ALREADY_COMPLETED by a destination that resumed, and the source then exits successfully
//! without resuming its device.
//!
//! Several channels ([`send_channels`], [`receive_channels`]): HELLO carries
//! [`FEATURE_CHANNELS`] and OFFER_CHANNELS follows it; the destination answers CHANNELS (how
//! many it takes, and a secret token) before ACCEPT; each further connection opens with
//! CHANNEL (session, index, token) and carries the sub-stream of its devices; the barrier
//! and the two-phase end stay on the main connection.
//!
//! The format is specified byte by byte in `docs/stream-format.md`, "Session handshake".

mod answers;
mod channel;
mod channel_send;
mod destination;
mod local;
mod message;
mod opened;
mod reinit;
mod session_destination;
mod session_source;
mod source;

pub use channel::{receive, receive_opened};
pub use session_destination::receive_channels;

pub use destination::{load_fenced, open_connection, open_session, Opened, Opening, RecvOutcome};
pub use local::{
    migrate_local, migrate_pair, migrate_pairs, migrate_pairs_channels, MigrateReport,
};
pub use message::{
    read_message, write_message, ChannelToken, Message, Reason, ReasonCode, SessionId,
    FEATURE_CHANNELS, FEATURE_SWITCHOVER_ACK, FRAME_HEADER_LEN, KNOWN_FEATURES, MAGIC,
    MAX_CHANNELS, MAX_PAYLOAD_LEN, MAX_REASON_LEN, TOKEN_LEN, VERSION,
};
pub use opened::{ChannelOpening, BIND_TIME};
pub use session_destination::{Admitted, SessionDestination};
pub use session_source::{Answer, SessionSource};
pub use source::{send, send_channels, SendOutcome};
