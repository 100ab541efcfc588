// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination side of a session: checks before the device is touched (identity,
//! protocol, features, fencing), the switchover-ack, the two-phase end, and reset on failure.

use std::io::{BufReader, Read};
use std::time::{Duration, Instant};

use super::message::{
    read_message, write_message, Message, Reason, ReasonCode, SessionId, FEATURE_CHANNELS,
    FEATURE_SWITCHOVER_ACK, KNOWN_FEATURES,
};
use super::opened::{channel_opened, send_final, ChannelOpening};
use crate::error::{Error, Result};
use crate::transport::{Duplex, SOCKET_BUFFER};
use vfio_bindings::bindings::vfio::VFIO_MIGRATION_P2P;
use vfio_mig::error::Report;
use vfio_mig::workspace::load_all_gated;
use vfio_mig::Error as CoreError;
use vfio_mig::{wire::StreamHeader, wire::StreamReader};
use vfio_mig::{
    workspace::check_compatible, workspace::LoadGate, LoadReport, MigrationDevice, Observer,
    Protocol,
};
use vfio_mig::{workspace::check_unit, workspace::rollback_destinations};
use vfio_mig_fence::{Admission, Fence};

/// Longest time a failed destination keeps reading (and discarding) what the source still
/// sends, so that the source reads the FAILED reason instead of a reset connection.
pub(super) const DRAIN_TIME: Duration = Duration::from_secs(10);

/// How a receive ended successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecvOutcome {
    /// The devices run the received state.
    Resumed {
        /// The stream header (session, epoch, devices).
        header: StreamHeader,
        /// What was loaded, one report a device.
        reports: Vec<LoadReport>,
        /// Whether RESUMED reached the source. If not, the source reports the outcome as in
        /// doubt and keeps its device stopped; a retry is answered ALREADY_COMPLETED.
        confirmed: bool,
    },
    /// The session was already completed here; the device was not touched.
    AlreadyCompleted {
        /// The stream header.
        header: StreamHeader,
    },
}

/// The code sent in FAILED for an error.
fn reason_code(e: &Error) -> ReasonCode {
    match e {
        Error::Core(core) => core_reason_code(core),
        Error::Refused { code, .. } => *code,
        _ => ReasonCode::Device,
    }
}

/// [`reason_code`] of a core error, and of the session's own error the engine carried out of
/// a hook.
fn core_reason_code(e: &CoreError) -> ReasonCode {
    match e {
        CoreError::RolledBack { source, .. } => core_reason_code(source),
        CoreError::Stream { .. } | CoreError::Transport { .. } => ReasonCode::Stream,
        CoreError::External(inner) => match inner.downcast_ref::<Error>() {
            Some(ours) => reason_code(ours),
            None => match inner.downcast_ref::<vfio_mig_fence::Error>() {
                Some(vfio_mig_fence::Error::Refused { code, .. }) => *code,
                _ => ReasonCode::Device,
            },
        },
        _ => ReasonCode::Device,
    }
}

/// Releases the fence's claim on a session that will not complete here.
pub(super) fn release(fence: &mut dyn Fence, session: &SessionId) {
    if let Err(e) = fence.release(session) {
        log::warn!("release the fencing claim: {e} (it expires with its lease)");
    }
}

pub(super) fn refuse<C: Duplex>(
    tx: &mut C,
    rx: &mut impl Read,
    code: ReasonCode,
    detail: String,
) -> Error {
    send_final(
        tx,
        rx,
        &Message::Refuse(Reason::new(code, detail.clone())),
        DRAIN_TIME,
    );
    Error::Refused {
        step: "handshake".into(),
        code,
        detail,
    }
}

/// The hooks of the load: SWITCHOVER_ACK, then LOADED, COMMIT and the completion record.
pub(super) struct Gate<'a, C: Duplex> {
    pub(super) tx: &'a mut C,
    pub(super) session: SessionId,
    pub(super) ack: bool,
    pub(super) fence: &'a mut dyn Fence,
    pub(super) completed: bool,
}

impl<C: Duplex> LoadGate for Gate<'_, C> {
    fn pre_copy_loaded(&mut self) -> vfio_mig::Result<()> {
        if self.ack {
            let ack = Message::SwitchoverAck {
                session: self.session,
            };
            write_message(self.tx, &ack, "acknowledge the pre-copy data")?;
        }
        Ok(())
    }

    fn before_resume(&mut self, rest: &mut dyn Read) -> vfio_mig::Result<()> {
        let session = self.session;
        write_message(
            self.tx,
            &Message::Loaded { session },
            "report the state loaded",
        )?;
        let step = "wait for the source's COMMIT";
        match read_message(rest, step)? {
            Message::Commit { session: s } if s == session => {}
            other => {
                return Err(CoreError::protocol(
                    step,
                    format!("the source sent {other} where COMMIT was expected"),
                ))
            }
        }
        // Recorded before the device runs: after a crash here, a retry is answered
        // ALREADY_COMPLETED and both devices stay stopped rather than both running.
        self.fence
            .complete(&session)
            .map_err(vfio_mig_fence::Error::into_core)?;
        self.completed = true;
        Ok(())
    }
}

/// What a source opened a session with: its HELLO and stream header, read and decoded, the
/// device not yet touched. Made by [`open_session`]; ended by [`receive_opened`](super::receive_opened) (the
/// session) or [`Opening::refuse`] (turned away: busy, not authorized).
pub struct Opening<C: Duplex> {
    pub(super) tx: C,
    pub(super) reader: StreamReader<BufReader<C>>,
    pub(super) features: u32,
    /// The channels the source offered (OFFER_CHANNELS), if it offered any.
    pub(super) offered: Option<u16>,
    pub(super) header: StreamHeader,
}

impl<C: Duplex> std::fmt::Debug for Opening<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opening")
            .field("features", &self.features)
            .field("offered", &self.offered)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

impl<C: Duplex> Opening<C> {
    /// The stream header the source sent.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// How many channels the source offered (1 when it did not offer several).
    pub fn offered_channels(&self) -> u16 {
        self.offered.unwrap_or(1)
    }

    /// The connection (the handle answers go out on): its peer, its TLS identities, or a
    /// clone to shut down.
    pub fn connection(&self) -> &C {
        &self.tx
    }

    /// Turns the source away before anything touched a device: REFUSE with `code` and
    /// `detail`, then the connection ends (what the source still sends is read and dropped
    /// for at most `drain`, so that it reads the reason rather than a reset).
    pub fn refuse(mut self, code: ReasonCode, detail: String, drain: Duration) -> Error {
        let msg = Message::Refuse(Reason::new(code, detail.clone()));
        send_final(&mut self.tx, self.reader.get_mut(), &msg, drain);
        Error::Refused {
            step: "handshake".into(),
            code,
            detail,
        }
    }
}

/// Reads a source's HELLO and stream header from `conn`, all of it before `deadline` (if
/// given) however the source spaces its bytes ([`Duplex::set_deadline`]). Nothing touches a
/// device. A HELLO or header that does not decode is answered REFUSE; a connection closed
/// before its first byte is a transport error of kind [`std::io::ErrorKind::UnexpectedEof`]
/// at step "handshake: wait for HELLO" (a probe, not a session).
pub fn open_session<C: Duplex>(conn: C, deadline: Option<Instant>) -> Result<Opening<C>> {
    match open_connection(conn, deadline)? {
        Opened::Session(o) => Ok(o),
        Opened::Channel(c) => Err(c.refuse(
            "a CHANNEL connection where a session was expected".into(),
            Duration::ZERO,
        )),
    }
}

/// What a new connection turned out to be: a session's main connection (HELLO and the stream
/// header, see [`open_session`]), or a further channel of a session (CHANNEL), to be given to
/// the session it names.
#[derive(Debug)]
pub enum Opened<C: Duplex> {
    /// A session's main connection.
    Session(Opening<C>),
    /// A further channel of a session.
    Channel(ChannelOpening<C>),
}

/// As [`open_session`], but a connection that starts with CHANNEL is returned as such
/// (its binding not yet checked: [`receive_channels`](super::receive_channels) does that).
pub fn open_connection<C: Duplex>(conn: C, deadline: Option<Instant>) -> Result<Opened<C>> {
    let mut tx = conn
        .try_clone()
        .map_err(|e| Error::transport("clone the connection", e))?;
    let mut conn = conn;
    if deadline.is_some() {
        conn.set_deadline(deadline)
            .map_err(|e| Error::transport("set the handshake deadline", e))?;
    }
    let mut rx = BufReader::with_capacity(SOCKET_BUFFER, conn);

    let features = match read_message(&mut rx, "handshake: wait for HELLO") {
        Ok(Message::Hello { features }) => features,
        Ok(Message::Channel {
            session,
            index,
            token,
        }) => {
            return channel_opened(tx, rx, session, index, token, deadline.is_some())
                .map(Opened::Channel)
        }
        Ok(other) => {
            let detail = format!("the source sent {other} where HELLO was expected");
            return Err(refuse(&mut tx, &mut rx, ReasonCode::Protocol, detail));
        }
        Err(e @ CoreError::Stream { .. }) => {
            return Err(refuse(
                &mut tx,
                &mut rx,
                ReasonCode::Protocol,
                Report(&e).to_string(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let mut offered = None;
    if features & FEATURE_CHANNELS != 0 {
        match read_message(&mut rx, "handshake: wait for OFFER_CHANNELS") {
            Ok(Message::OfferChannels { count }) => offered = Some(count),
            Ok(other) => {
                let detail = format!("the source sent {other} where OFFER_CHANNELS was expected");
                return Err(refuse(&mut tx, &mut rx, ReasonCode::Protocol, detail));
            }
            Err(e @ CoreError::Stream { .. }) => {
                let detail = Report(&e).to_string();
                return Err(refuse(&mut tx, &mut rx, ReasonCode::Protocol, detail));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (mut reader, header) = match StreamReader::open(rx) {
        Ok(r) => r,
        Err(e @ CoreError::Stream { .. }) => {
            // The reader is gone with the stream; refuse without draining.
            let msg = Message::Refuse(Reason::new(ReasonCode::Stream, Report(&e).to_string()));
            let _ = write_message(&mut tx, &msg, "end the session");
            return Err(Error::Refused {
                step: "handshake".into(),
                code: ReasonCode::Stream,
                detail: Report(&e).to_string(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    if deadline.is_some() {
        reader
            .get_mut()
            .get_mut()
            .set_deadline(None)
            .map_err(|e| Error::transport("clear the handshake deadline", e))?;
    }
    Ok(Opened::Session(Opening {
        tx,
        reader,
        features,
        offered,
        header,
    }))
}

/// Runs an opened session that offered no channels (see [`super::receive_opened`]).
pub(super) fn receive_one<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    opening: Opening<C>,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    let Opening {
        mut tx,
        mut reader,
        features,
        header,
        ..
    } = opening;
    let checks = admission_checks(devs, features, &header, fence);
    let session = header.session_id;
    match checks {
        Ok(Admission::Accept) => {}
        Ok(Admission::AlreadyCompleted) => {
            let msg = Message::AlreadyCompleted { session };
            send_final(&mut tx, reader.get_mut(), &msg, DRAIN_TIME);
            return Ok(RecvOutcome::AlreadyCompleted { header });
        }
        Err((code, detail)) => return Err(refuse(&mut tx, reader.get_mut(), code, detail)),
    }
    if let Err(e) = write_message(&mut tx, &Message::Accept { session }, "handshake") {
        release(fence, &session);
        return Err(e.into());
    }
    let mut gate = Gate {
        tx: &mut tx,
        session,
        ack: features & FEATURE_SWITCHOVER_ACK != 0,
        fence,
        completed: false,
    };
    let loaded = load_all_gated(devs, &mut reader, obs, &mut gate);
    let completed = gate.completed;
    finish_session(
        devs,
        header,
        loaded,
        completed,
        fence,
        &mut tx,
        reader.get_mut(),
        obs,
    )
}

/// The checks before a device is touched: one device in the stream per device given, known
/// features, each device's protocol and model, the P2P rule of a unit, and the fencing
/// state. `Err` is the REFUSE to send.
pub(super) fn admission_checks(
    devs: &[&mut dyn MigrationDevice],
    features: u32,
    header: &StreamHeader,
    fence: &mut dyn Fence,
) -> std::result::Result<Admission, (ReasonCode, String)> {
    let checks = (|| -> std::result::Result<Admission, (ReasonCode, String)> {
        if features & !KNOWN_FEATURES != 0 {
            return Err((
                ReasonCode::Unsupported,
                format!("unknown HELLO features {:#x}", features & !KNOWN_FEATURES),
            ));
        }
        if header.devices.len() != devs.len() {
            return Err((
                ReasonCode::Unsupported,
                format!(
                    "the stream carries {} devices; this destination loads {}",
                    header.devices.len(),
                    devs.len()
                ),
            ));
        }
        if features & FEATURE_SWITCHOVER_ACK != 0 && !header.devices.iter().any(|d| d.live) {
            return Err((
                ReasonCode::Protocol,
                "switchover-ack asked for a stream without pre-copy".into(),
            ));
        }
        for (dev, desc) in devs.iter().zip(&header.devices) {
            check_compatible(&**dev, desc)
                .map_err(|e| (ReasonCode::Incompatible, Report(&e).to_string()))?;
        }
        // A unit whose source devices all have P2P was not opted in to devices without it:
        // refuse destination devices that could not honour the P2P barrier either.
        let source_all_p2p = header.devices.iter().all(|d| {
            d.protocol == Protocol::V2 && d.migration_flags & u64::from(VFIO_MIGRATION_P2P) != 0
        });
        check_unit(devs, !source_all_p2p)
            .map_err(|e| (ReasonCode::Incompatible, format!("destination: {e}")))?;
        fence.admit(header).map_err(|e| match e {
            vfio_mig_fence::Error::Refused { code, detail, .. } => (code, detail),
            e => (ReasonCode::Fence, Report(&e).to_string()),
        })
    })();
    checks
}

/// The end of a session after the load: RESUMED on success; PARTLY_RESUMED past the point of
/// no return ([`vfio_mig::Error::PastNoReturn`]: the completion record stays, what runs keeps
/// running); on any other failure the completion record withdrawn, the claim released, every
/// device reset and FAILED sent.
#[allow(clippy::too_many_arguments)]
pub(super) fn finish_session<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    header: StreamHeader,
    loaded: vfio_mig::Result<Vec<LoadReport>>,
    completed: bool,
    fence: &mut dyn Fence,
    tx: &mut C,
    rx: &mut impl Read,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    let session = header.session_id;
    match loaded {
        Ok(reports) => {
            let confirmed = match write_message(tx, &Message::Resumed { session }, "resumed") {
                Ok(()) => true,
                Err(e) => {
                    log::warn!(
                        "the device runs the migrated state, but RESUMED did not reach the \
                         source ({}): the source keeps its device stopped",
                        Report(&e)
                    );
                    false
                }
            };
            Ok(RecvOutcome::Resumed {
                header,
                reports,
                confirmed,
            })
        }
        Err(e @ CoreError::PastNoReturn { .. }) => {
            // A device runs the state: the completion record stays (a retry is answered
            // ALREADY_COMPLETED) and the source is told to stop, never to run it again.
            let msg =
                Message::PartlyResumed(Reason::new(core_reason_code(&e), Report(&e).to_string()));
            send_final(tx, rx, &msg, DRAIN_TIME);
            Err(e.into())
        }
        Err(e) => {
            if completed {
                if let Err(u) = fence.undo_complete(&session) {
                    log::warn!("withdraw the completion record: {u}");
                }
            }
            release(fence, &session);
            let e = rollback_destinations(devs, e, obs);
            let msg = Message::Failed(Reason::new(core_reason_code(&e), Report(&e).to_string()));
            send_final(tx, rx, &msg, DRAIN_TIME);
            Err(e.into())
        }
    }
}

/// The hook of a fenced load from a file: the completion record before the resume.
struct FileGate<'a> {
    session: SessionId,
    fence: &'a mut dyn Fence,
    completed: bool,
}

impl LoadGate for FileGate<'_> {
    fn pre_copy_loaded(&mut self) -> vfio_mig::Result<()> {
        Ok(())
    }

    fn before_resume(&mut self, _rest: &mut dyn Read) -> vfio_mig::Result<()> {
        self.fence
            .complete(&self.session)
            .map_err(vfio_mig_fence::Error::into_core)?;
        self.completed = true;
        Ok(())
    }
}

/// Loads a stream with no control channel (a file) into `dev` under `fence`, with the same
/// checks and records as [`receive`](super::receive): a completed session is not loaded again
/// ([`RecvOutcome::AlreadyCompleted`]), a stale epoch is refused; on failure the device is
/// reset.
pub fn load_fenced<R: Read>(
    devs: &mut [&mut dyn MigrationDevice],
    reader: &mut StreamReader<R>,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    let header = reader.header().clone();
    if header.devices.len() != devs.len() {
        return Err(Error::Refused {
            step: "check the stream".into(),
            code: ReasonCode::Unsupported,
            detail: format!(
                "the stream carries {} devices; {} were given to load it into",
                header.devices.len(),
                devs.len()
            ),
        });
    }
    for (dev, desc) in devs.iter().zip(&header.devices) {
        check_compatible(&**dev, desc)?;
    }
    if fence.admit(&header)? == Admission::AlreadyCompleted {
        return Ok(RecvOutcome::AlreadyCompleted { header });
    }
    let mut gate = FileGate {
        session: header.session_id,
        fence,
        completed: false,
    };
    match load_all_gated(devs, reader, obs, &mut gate) {
        Ok(reports) => Ok(RecvOutcome::Resumed {
            header,
            reports,
            confirmed: true,
        }),
        // A device runs the state: the completion record stays, nothing more is reset.
        Err(e @ CoreError::PastNoReturn { .. }) => Err(e.into()),
        Err(e) => {
            if gate.completed {
                if let Err(u) = gate.fence.undo_complete(&header.session_id) {
                    log::warn!("withdraw the completion record: {u}");
                }
            }
            release(gate.fence, &header.session_id);
            Err(rollback_destinations(devs, e, obs).into())
        }
    }
}

impl RecvOutcome {
    /// The stream header of the session.
    pub fn header(&self) -> &StreamHeader {
        match self {
            RecvOutcome::Resumed { header, .. } | RecvOutcome::AlreadyCompleted { header } => {
                header
            }
        }
    }
}
