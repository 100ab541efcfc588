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
use vfio_mig::check_compatible;
use vfio_mig::check_unit;
use vfio_mig::error::Report;
use vfio_mig::wire::StreamHeader;
use vfio_mig::wire::StreamReader;
use vfio_mig::LoadReport;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig::Protocol;
use vfio_mig::{Destination, DestinationOptions, Error as CoreError, Status};
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

/// Points of a load where the destination talks to its source (or its fencing store). An
/// error from a hook fails the load, and every device is reset.
pub(super) trait LoadGate {
    /// Every device carried live loaded all its pre-copy data: QEMU's switchover-ack point.
    fn pre_copy_loaded(&mut self) -> vfio_mig::Result<()>;
    /// After [`pre_copy_loaded`](Self::pre_copy_loaded): a device whose pre-copy the source
    /// reopened (new initial data after a `VFIO_PRECOPY_INFO_REINIT`) loaded it up to its next
    /// END_OF_PHASE(PRE_COPY). Called once per reopened phase.
    fn pre_copy_reloaded(&mut self) -> vfio_mig::Result<()>;
    /// The trailer verified and every device took its state; none runs yet. `rest` is the
    /// main connection after the trailer.
    fn before_resume(&mut self, rest: &mut dyn Read) -> vfio_mig::Result<()>;
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

    fn pre_copy_reloaded(&mut self) -> vfio_mig::Result<()> {
        if self.ack {
            let again = Message::SwitchoverAckAgain {
                session: self.session,
            };
            write_message(self.tx, &again, "acknowledge the reopened pre-copy data")?;
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
        Opened::Session(o) => Ok(*o),
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
    Session(Box<Opening<C>>),
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
    Ok(Opened::Session(Box::new(Opening {
        tx,
        reader,
        features,
        offered,
        header,
    })))
}

/// Loads into `dst` through the front door: the header's bytes (already read), the bytes
/// read past it (`buffered`) and then every byte of `input` as it arrives pushed into it;
/// `gate.pre_copy_loaded` once it loaded all pre-copy data (a session's SWITCHOVER_ACK),
/// `gate.before_resume` once the trailer verified and every device took its state (LOADED,
/// COMMIT, the completion record); each device's progress to `obs`. Nothing runs. On failure
/// every device is reset, and the error says so.
pub(super) fn load_into<D: MigrationDevice>(
    dst: &mut Destination<D>,
    header: &[u8],
    buffered: &[u8],
    input: &mut dyn Read,
    gate: &mut dyn LoadGate,
    obs: &dyn Observer,
) -> vfio_mig::Result<Vec<LoadReport>> {
    let mut buf = vec![0u8; SOCKET_BUFFER];
    let mut status = dst.push(header)?;
    if status == Status::NeedMore {
        status = dst.push_observed(buffered, obs)?;
    }
    let mut acked = false;
    while status != Status::Loaded {
        if !acked && dst.pre_copy_loaded() {
            acked = true;
            gate.pre_copy_loaded().map_err(|e| dst.cancel_with(e))?;
        }
        for _ in 0..dst.take_pre_copy_reloaded() {
            gate.pre_copy_reloaded().map_err(|e| dst.cancel_with(e))?;
        }
        status = dst.read_some(input, &mut buf, obs)?;
    }
    gate.before_resume(input).map_err(|e| dst.cancel_with(e))?;
    Ok(dst.reports())
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
/// running); on any other failure (after which every device was reset, as `loaded` says) the
/// completion record withdrawn, the claim released and FAILED sent.
pub(super) fn finish_session<C: Duplex>(
    header: StreamHeader,
    loaded: vfio_mig::Result<Vec<LoadReport>>,
    completed: bool,
    fence: &mut dyn Fence,
    tx: &mut C,
    rx: &mut impl Read,
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
        Err(e) if completion_in_doubt(&e) => Err(reset_in_doubt(e)),
        Err(e) => {
            if completed {
                if let Err(u) = fence.undo_complete(&session) {
                    return Err(withdrawal_failed(e, &u));
                }
            }
            let msg = Message::Failed(Reason::new(core_reason_code(&e), Report(&e).to_string()));
            send_final(tx, rx, &msg, DRAIN_TIME);
            // After FAILED: the source's wait covers the store calls before it, not this
            // one (the claim also ends with its lease).
            release(fence, &session);
            Err(e.into())
        }
    }
}

/// The end of a load whose completion was recorded and could not be withdrawn after the
/// resume failed: the record names this host as the owner of a state its reset devices no
/// longer hold, so the source must not run it either: in doubt, as [`reset_in_doubt`].
fn withdrawal_failed(e: CoreError, withdrawal: &vfio_mig_fence::Error) -> Error {
    Error::InDoubt {
        step: "withdraw the completion record".into(),
        detail: format!(
            "{}; the completion stays recorded ({withdrawal}); neither FAILED nor RESUMED was \
             sent, so the source keeps its devices stopped: read the record in the fencing \
             store before running the state anywhere",
            Report(&e)
        ),
    }
}

/// Whether a load failed because the fencing store could not say whether the completion
/// was recorded ([`vfio_mig_fence::Error::InDoubt`], carried out of the gate).
fn completion_in_doubt(e: &CoreError) -> bool {
    match e {
        CoreError::RolledBack { source, .. } => completion_in_doubt(source),
        CoreError::External(inner) => matches!(
            inner.downcast_ref::<vfio_mig_fence::Error>(),
            Some(vfio_mig_fence::Error::InDoubt { .. })
        ),
        _ => false,
    }
}

/// The end of a load whose completion is in doubt: the devices never ran, and were reset by
/// the failed load;
/// the record is neither withdrawn nor released (the store cannot be reached, and it may
/// name this host as the owner); the source is told nothing, so it stays stopped in doubt
/// rather than run a state the store may give to this host.
fn reset_in_doubt(e: CoreError) -> Error {
    Error::InDoubt {
        step: "record the handoff complete".into(),
        detail: format!(
            "{}; neither FAILED nor RESUMED was sent, so the source keeps its devices stopped: \
             read the record in the fencing store before running the state anywhere",
            Report(&e)
        ),
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

    fn pre_copy_reloaded(&mut self) -> vfio_mig::Result<()> {
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
    let lent: Vec<&mut dyn MigrationDevice> = devs.iter_mut().map(|d| &mut **d).collect();
    // The reader checked the header's tag; the destination checks every record's with the
    // same key, from the header's bytes as they were read.
    let opts = DestinationOptions::new()
        .allow_non_p2p_unit(true)
        .key(reader.key());
    let mut dst = Destination::new(lent, &opts).map_err(vfio_mig::Error::from)?;
    let header_bytes = reader.header_bytes().to_vec();
    let loaded = load_into(
        &mut dst,
        &header_bytes,
        &[],
        reader.get_mut(),
        &mut gate,
        obs,
    )
    .and_then(|reports| dst.run().map(|_| reports).map_err(vfio_mig::Error::from));
    match loaded {
        Ok(reports) => Ok(RecvOutcome::Resumed {
            header,
            reports,
            confirmed: true,
        }),
        // A device runs the state: the completion record stays, nothing more is reset.
        Err(e @ CoreError::PastNoReturn { .. }) => Err(e.into()),
        Err(e) if completion_in_doubt(&e) => Err(reset_in_doubt(e)),
        Err(e) => {
            if gate.completed {
                if let Err(u) = gate.fence.undo_complete(&header.session_id) {
                    return Err(withdrawal_failed(e, &u));
                }
            }
            release(gate.fence, &header.session_id);
            Err(e.into())
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
