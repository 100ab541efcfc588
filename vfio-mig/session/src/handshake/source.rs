// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source side of a session: HELLO and the stream header before the device is touched,
//! the switchover wait, the two-phase end (LOADED, COMMIT, RESUMED) and rollback.

use std::io::{self, BufWriter, Write};
use std::net::Shutdown;

use super::message::{read_message, Message, SessionId, FEATURE_SWITCHOVER_ACK};
use crate::error::{Error, Result};
use crate::transport::{Duplex, SOCKET_BUFFER};
use vfio_mig::error::Report;
use vfio_mig::Error as CoreError;
use vfio_mig::{wire::StreamHeader, wire::StreamWriter};
use vfio_mig::{
    workspace::check_unit, workspace::finish_handoff_all, workspace::pre_copy_all,
    workspace::rollback_sources, workspace::stop_copy_all, workspace::SharedWriter,
};
use vfio_mig::{workspace::SaveOptions, MigrationDevice, Observer, SaveReport};

/// How a send ended successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The destination runs the state; the source devices are stopped. One report a device.
    Completed(Vec<SaveReport>),
    /// The destination had already completed this session (a retried handoff): it runs the
    /// state. The source device was not touched by this call and must not be resumed.
    AlreadyCompleted,
}

/// The source's writing half: before every write it checks, without blocking, whether the
/// destination said something. During the transfer the destination only speaks to fail
/// (FAILED, or closing the connection), so the source stops at its next write instead of
/// streaming the rest of the state into a destination that gave up.
pub(super) struct Watched<C: Duplex>(pub(super) C);

impl<C: Duplex> Watched<C> {
    fn check(&self) -> io::Result<()> {
        if self.0.readable_now()? {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the destination ended the session",
            ));
        }
        Ok(())
    }
}

impl<C: Duplex> Write for Watched<C> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check()?;
        self.0.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.check()?;
        self.0.write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

pub(super) fn unexpected(msg: &Message, wanted: &str, step: &str) -> Error {
    Error::protocol(
        step,
        format!("the destination sent {msg} where {wanted} was expected"),
    )
}

/// Reads the destination's answer at `step`: `Ok(())` for a message of kind `wanted` (a
/// [`Message::kind`]) with this session, a [`Error::PeerFailed`] for FAILED, a protocol error
/// for anything else.
pub(super) fn expect(
    rx: &mut impl io::Read,
    session: &SessionId,
    wanted: u8,
    step: &str,
) -> Result<()> {
    let msg = read_message(rx, step)?;
    match &msg {
        m if m.kind() == wanted && m.session() == Some(session) => Ok(()),
        Message::Failed(r) => Err(Error::PeerFailed {
            step: step.to_owned(),
            detail: r.text.clone(),
        }),
        m => Err(Error::protocol(
            step,
            format!("the destination sent {m} (session {:02x?})", m.session()),
        )),
    }
}

/// After a transport error, reads what the destination said, if it said anything: its
/// FAILED reason explains the broken connection better than `EPIPE`; a closed connection is
/// named as such, at the step that found it.
pub(super) fn explain<C: Duplex>(err: Error, rx: &mut C) -> Error {
    let Some(CoreError::Transport { step, .. }) = err.as_core() else {
        return err;
    };
    if !rx.readable_now().unwrap_or(false) {
        return err;
    }
    match read_message(rx, "read the destination's reason") {
        Ok(Message::Failed(r)) | Ok(Message::Refuse(r)) => Error::PeerFailed {
            step: step.clone(),
            detail: r.text,
        },
        Ok(other) => unexpected(&other, "FAILED", step),
        Err(CoreError::Transport { source, .. })
            if source.kind() == io::ErrorKind::UnexpectedEof =>
        {
            Error::transport(
                step.clone(),
                io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the destination closed the connection",
                ),
            )
        }
        Err(_) => err,
    }
}

/// Migrates `devs` (stream devices 0.. of `header`, as one unit) to the destination at the
/// other end of `conn`.
///
/// 1. Sends HELLO and the stream header, and waits for the answer **before touching the
///    device**: REFUSE is an [`Error::Refused`], ALREADY_COMPLETED returns
///    [`SendOutcome::AlreadyCompleted`], ACCEPT goes on.
/// 2. With `opts.live`: pre-copy, then waits for SWITCHOVER_ACK (the destination loaded all
///    pre-copy data) before stopping the device.
/// 3. Stop-and-copy and the trailer; waits for LOADED (the destination verified the whole
///    stream), then sends COMMIT.
/// 4. Waits for RESUMED: success; the device then takes its STOP transition, out of the
///    downtime window.
///
/// Any failure before COMMIT (FAILED, a closed or silent connection, a device error) rolls
/// the device back to RUNNING: the destination cannot resume without COMMIT. FAILED after
/// COMMIT rolls back too: the destination sends it only before its point of no return (no
/// device of the unit ran) and reset its devices. PARTLY_RESUMED (a destination device runs
/// the state, another failed to run) stops the sources as RESUMED does and returns
/// [`vfio_mig::Error::PastNoReturn`]. A lost connection or a timeout
/// after COMMIT leaves the device stopped and returns [`Error::InDoubt`]: the destination may
/// run the state, and resuming here as well would run it twice.
pub fn send<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    conn: C,
    header: &StreamHeader,
    opts: &SaveOptions,
    obs: &dyn Observer,
) -> Result<SendOutcome> {
    let session = header.session_id;
    let (mut rx, ctl) = before_hello(devs, &conn, header, opts)?;
    let features = if opts.live { FEATURE_SWITCHOVER_ACK } else { 0 };

    // 1. HELLO and the header, then the answer; the device is untouched until ACCEPT.
    let mut tx = BufWriter::with_capacity(SOCKET_BUFFER, Watched(conn));
    let opened = tx
        .write_all(&Message::Hello { features }.encode())
        .map_err(|e| CoreError::transport("handshake: send HELLO", e))
        .and_then(|()| StreamWriter::new(tx, header))
        .and_then(|mut out| out.flush().map(|()| out));
    let answer = match opened {
        Ok(out) => {
            read_message(&mut rx, "handshake: wait for the destination's answer").map(|m| (out, m))
        }
        // The destination may have refused (and closed) while we wrote.
        Err(e) if rx.readable_now().unwrap_or(false) => {
            match read_message(&mut rx, "handshake: read the destination's answer") {
                Ok(m @ Message::Refuse(_)) => return refused(&m),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    };
    let (mut out, answer) = answer?;
    match &answer {
        Message::Accept { session: s } if *s == session => {}
        Message::AlreadyCompleted { session: s } if *s == session => {
            log::info!("the destination already completed this session");
            return Ok(SendOutcome::AlreadyCompleted);
        }
        Message::Refuse(_) => return refused(&answer),
        other => return Err(unexpected(other, "ACCEPT", "handshake")),
    }

    // 2-3. Pre-copy, switchover, stop-and-copy, trailer, LOADED. Any failure: roll back.
    let mut reports = vec![SaveReport::default(); devs.len()];
    let sent = (|| -> Result<BufWriter<Watched<C>>> {
        if opts.live {
            let shared = SharedWriter::new(out);
            pre_copy_all(devs, &shared, opts, obs, &mut reports)?;
            out = shared.into_inner();
            out.flush()?;
            let ack = Message::SwitchoverAck { session }.kind();
            expect(
                &mut rx,
                &session,
                ack,
                "wait for the destination's SWITCHOVER_ACK",
            )?;
        }
        // Every device is quiesced (P2P) before any stops, then all stop and copy in parallel.
        let shared = SharedWriter::new(out);
        stop_copy_all(devs, &shared, opts, obs, &mut reports)?;
        let (tx, _totals) = shared.into_inner().finish()?;
        let loaded = Message::Loaded { session }.kind();
        expect(
            &mut rx,
            &session,
            loaded,
            "wait for the destination's LOADED",
        )?;
        Ok(tx)
    })();
    let mut tx = match sent {
        Ok(tx) => tx,
        Err(e) => return Err(rollback_sources(devs, explain(e, &mut rx).into_core(), obs).into()),
    };

    commit(devs, &mut tx, &ctl, &mut rx, session, reports, obs)
}

/// What a sender checks before HELLO (a refused unit touches neither side): the header
/// describes each device, live exactly when the save is, and the unit may migrate as one
/// (P2P). Returns two clones of `conn`: the reader of the destination's answers and the handle
/// that half-closes the connection after COMMIT.
pub(super) fn before_hello<C: Duplex>(
    devs: &[&mut dyn MigrationDevice],
    conn: &C,
    header: &StreamHeader,
    opts: &SaveOptions,
) -> Result<(C, C)> {
    if devs.is_empty()
        || header.devices.len() != devs.len()
        || header.devices.iter().any(|d| d.live != opts.live)
    {
        return Err(Error::invalid_input(
            "send: the stream header must describe each device, live exactly when the save is",
        ));
    }
    check_unit(devs, opts.allow_non_p2p_unit)?;
    let clone = || {
        conn.try_clone()
            .map_err(|e| Error::transport("clone the connection", e))
    };
    Ok((clone()?, clone()?))
}

/// The commit point and its answer, on the main connection: COMMIT, then RESUMED (the
/// sources stop for good), PARTLY_RESUMED (past the destination's point of no return: the
/// sources stop for good and the error says what runs there), FAILED (before that point: the
/// destination reset its devices, the sources run again), or doubt (nothing is undone; the error says how to find out). A COMMIT that did
/// not go out whole cannot be decoded: the destination resets, so a failed write is a
/// definite failure.
pub(super) fn commit<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    tx: &mut impl Write,
    ctl: &C,
    rx: &mut C,
    session: SessionId,
    mut reports: Vec<SaveReport>,
    obs: &dyn Observer,
) -> Result<SendOutcome> {
    let commit = Message::Commit { session }.encode();
    if let Err(e) = tx.write_all(&commit).and_then(|()| tx.flush()) {
        let e = Error::transport("send COMMIT", e);
        return Err(rollback_sources(devs, explain(e, rx).into_core(), obs).into());
    }
    if let Err(e) = ctl.shutdown(Shutdown::Write) {
        log::debug!("shutdown after COMMIT: {e}");
    }
    let step = "wait for the destination's RESUMED";
    match read_message(rx, step) {
        Ok(Message::Resumed { session: s }) if s == session => {
            // Out of the downtime window: the destination already runs.
            finish_handoff_all(devs, &mut reports);
            Ok(SendOutcome::Completed(reports))
        }
        Ok(Message::Failed(r)) => {
            let e = Error::PeerFailed {
                step: step.into(),
                detail: r.text,
            };
            Err(rollback_sources(devs, e.into_core(), obs).into())
        }
        Ok(Message::PartlyResumed(r)) => {
            // Past the destination's point of no return: a device there runs the state, so
            // the sources stop (or are reset) as after RESUMED, and are never resumed.
            finish_handoff_all(devs, &mut reports);
            Err(past_no_return(devs, &reports, step, &r.text))
        }
        Ok(other) => Err(in_doubt(
            devs,
            &session,
            format!("the destination sent {other} where RESUMED was expected"),
        )),
        Err(e) => Err(in_doubt(devs, &session, Report(&e).to_string())),
    }
}

/// The source's error after PARTLY_RESUMED: the destination's account (`what`) and what
/// became of each source device (stopped, or its STOP failure, after which it was reset).
fn past_no_return(
    devs: &[&mut dyn MigrationDevice],
    reports: &[SaveReport],
    step: &str,
    what: &str,
) -> Error {
    let sources: Vec<String> = devs
        .iter()
        .zip(reports)
        .map(|(d, r)| {
            let name = d.identity().instance;
            match &r.after_handoff {
                None => format!("{name} is stopped"),
                Some(why) => format!("{name} failed its STOP ({why})"),
            }
        })
        .collect();
    Error::Core(vfio_mig::Error::PastNoReturn {
        step: step.into(),
        detail: format!(
            "the destination: {what}; not resumed here, the state must not run twice: {}",
            sources.join(", ")
        ),
    })
}

pub(super) fn refused(msg: &Message) -> Result<SendOutcome> {
    match msg {
        Message::Refuse(r) => Err(Error::Refused {
            step: "handshake".into(),
            code: r.code,
            detail: r.text.clone(),
        }),
        other => Err(unexpected(other, "REFUSE", "handshake")),
    }
}

pub(super) fn in_doubt(
    devs: &[&mut dyn MigrationDevice],
    session: &SessionId,
    what: String,
) -> Error {
    let names: Vec<String> = devs.iter().map(|d| d.identity().instance).collect();
    let hex: String = session.iter().map(|b| format!("{b:02x}")).collect();
    Error::InDoubt {
        step: "wait for RESUMED after COMMIT".into(),
        detail: format!(
            "{what}; the destination may be running the state, so {} is left stopped, not \
             resumed; retry with --session {hex} to ask the destination",
            names.join(", ")
        ),
    }
}
