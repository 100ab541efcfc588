// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source side of a session: HELLO and the stream header before the device is touched,
//! the switchover wait, the two-phase end (LOADED, COMMIT, RESUMED) and rollback.

use std::io::Write;
use std::net::Shutdown;

use super::answers::{explain, in_doubt, past_no_return, unexpected};
use super::message::{read_message, Message, SessionId};
use super::session_source::{Answer, SessionSource};
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::check_unit;
use vfio_mig::error::Report;
use vfio_mig::wire::DeviceDescriptor;
use vfio_mig::wire::StreamHeader;
use vfio_mig::workspace::finish_handoff_all;
use vfio_mig::workspace::rollback_sources;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig::SaveOptions;
use vfio_mig::SaveReport;
use vfio_mig::{Epoch, Handback, Source, SourceOptions};

/// How a send ended successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The destination runs the state; the source devices are stopped. One report a device.
    Completed(Vec<SaveReport>),
    /// The destination had already completed this session (a retried handoff): it runs the
    /// state. The source device was not touched by this call and must not be resumed.
    AlreadyCompleted,
}

/// Migrates `devs` (stream devices 0.. of `header`, as one unit) to the destination at the
/// other end of `conn`: a [`SessionSource`] whose pre-copy rounds the engine's policy
/// (`opts.policy`) paces. The stream carries `header`'s session id and epoch; its device
/// descriptors are the source's own (live for a device in pre-copy).
///
/// 1. Sends HELLO and the stream header, and waits for the answer **before touching the
///    device**: REFUSE is an [`Error::Refused`], ALREADY_COMPLETED returns
///    [`SendOutcome::AlreadyCompleted`], ACCEPT goes on.
/// 2. With `opts.live`: pre-copy, then waits for SWITCHOVER_ACK (the destination loaded all
///    pre-copy data) before stopping the device; a device that re-initialised its pre-copy
///    data meanwhile (REINIT) sends it first and the destination acknowledges it again
///    (SWITCHOVER_ACK_AGAIN).
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
    let options = SourceOptions::new(Epoch(header.epoch))
        .session(header.session_id)
        .pre_copy(opts.live)
        .allow_non_p2p_unit(opts.allow_non_p2p_unit)
        .buffer(opts.buffer);
    let lent: Vec<&mut dyn MigrationDevice> = devs.iter_mut().map(|d| &mut **d).collect();
    let source = Source::prepare(lent, &options).map_err(from_handback)?;
    // The descriptors are the source's own; `header` must describe the same devices (its
    // live flags aside: a device that cannot pre-copy, or is paused, goes in stop-and-copy).
    let same = |a: &DeviceDescriptor, b: &DeviceDescriptor| {
        (a.protocol, &a.model, a.migration_flags) == (b.protocol, &b.model, b.migration_flags)
    };
    let described = source.header().devices.len() == header.devices.len()
        && source
            .header()
            .devices
            .iter()
            .zip(&header.devices)
            .all(|(a, b)| same(a, b));
    if !described {
        return Err(Error::invalid_input(
            "send: the stream header must describe each device",
        ));
    }
    let mut session = match SessionSource::open(source, conn).map_err(from_handback)? {
        Answer::Accepted(session) => session,
        Answer::AlreadyCompleted(_) => return Ok(SendOutcome::AlreadyCompleted),
    };
    session.pre_copy(&opts.policy, obs)?;
    session.switch_over_observed(obs)?;
    let mut finished = session.commit().map_err(from_handback)?;
    if opts.live {
        // As QEMU: a device without PRE_COPY went in stop-and-copy only.
        for (report, dev) in finished.reports.iter_mut().zip(&finished.devices) {
            report.stop_copy_only = !dev.capabilities().pre_copy;
        }
    }
    Ok(SendOutcome::Completed(finished.reports))
}

/// The session's error of a front-door error, the devices (lent) back with it.
fn from_handback<D>(h: Handback<D>) -> Error {
    Error::from(*h.error)
}

/// The devices' names, for errors.
fn names(devs: &[&mut dyn MigrationDevice]) -> Vec<String> {
    devs.iter().map(|d| d.identity().instance).collect()
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
            Err(past_no_return(&names(devs), &reports, step, &r.text))
        }
        Ok(other) => Err(in_doubt(
            &names(devs),
            &session,
            format!("the destination sent {other} where RESUMED was expected"),
        )),
        Err(e) => Err(in_doubt(&names(devs), &session, Report(&e).to_string())),
    }
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
