// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A migration between two devices of this host: [`send`] and [`receive`] in two threads
//! over a socketpair, so a local migration runs exactly the code path of a remote one.

use std::time::Instant;

use super::channel::receive;
use super::destination::{open_connection, open_session, Opened, RecvOutcome};
use super::opened::ChannelOpening;
use super::session_destination::receive_channels;
use super::source::{send, send_channels, SendOutcome};
use crate::error::{is_peer_loss, Error, Result};
use crate::handshake::ReasonCode;
use crate::transport::Connection;
use vfio_mig::error::Recovery;
use vfio_mig::wire::StreamHeader;
use vfio_mig::Error as CoreError;
use vfio_mig::{LoadReport, MigrationDevice, Observer, SaveOptions, SaveReport};
use vfio_mig_fence::Fence;

/// What a local migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MigrateReport {
    /// The source side.
    pub save: SaveReport,
    /// The destination side.
    pub load: LoadReport,
}

/// Migrates `src` into `dst`. On success the source is stopped and the destination runs with
/// the source's state. On failure the source runs again (or was reset), the destination was
/// reset, and the error names the step that failed.
///
/// Both sides run the session handshake of a remote migration
/// ([`migrate_pair`]) over a socketpair, so back-pressure, framing, the
/// switchover-ack and the two-phase end are the real ones. The source takes its STOP
/// transition only after the destination resumed, outside the downtime window.
pub fn migrate_local(
    src: &mut dyn MigrationDevice,
    dst: &mut dyn MigrationDevice,
    opts: &SaveOptions,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<MigrateReport> {
    let header = StreamHeader::new(&[&*src], opts.live, 1)?;
    migrate_pair(
        src,
        dst,
        &header,
        opts,
        &mut vfio_mig_fence::MemoryFence::new(),
        src_obs,
        dst_obs,
    )
}

/// Migrates `src` into `dst` under `header` (one device, live exactly when `opts.live`), with
/// `fence` as the destination's fencing state. See [`migrate_pairs`].
pub fn migrate_pair(
    src: &mut dyn MigrationDevice,
    dst: &mut dyn MigrationDevice,
    header: &StreamHeader,
    opts: &SaveOptions,
    fence: &mut dyn Fence,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<MigrateReport> {
    let mut reports = migrate_pairs(
        &mut [src],
        &mut [dst],
        header,
        opts,
        fence,
        src_obs,
        dst_obs,
    )?;
    Ok(reports.remove(0))
}

/// Sources and destinations must come in pairs, at least one.
fn check_pairs(srcs: &[&mut dyn MigrationDevice], dsts: &[&mut dyn MigrationDevice]) -> Result<()> {
    if srcs.len() != dsts.len() || srcs.is_empty() {
        return Err(Error::invalid_input(format!(
            "{} source and {} destination devices: give them in pairs",
            srcs.len(),
            dsts.len()
        )));
    }
    Ok(())
}

/// Migrates `srcs[i]` into `dsts[i]` for every `i`, as one unit under `header`, with `fence`
/// as the destination's fencing state. On success the sources are stopped and the
/// destinations run the sources' states; on failure every source runs again (or was reset),
/// every destination was reset, and the error names the failed step and what became of all.
#[allow(clippy::too_many_arguments)]
pub fn migrate_pairs(
    srcs: &mut [&mut dyn MigrationDevice],
    dsts: &mut [&mut dyn MigrationDevice],
    header: &StreamHeader,
    opts: &SaveOptions,
    fence: &mut dyn Fence,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<Vec<MigrateReport>> {
    check_pairs(srcs, dsts)?;
    let (to_dst, to_src) =
        Connection::pair().map_err(|e| Error::transport("create socketpair", e))?;
    let (sent, received) = std::thread::scope(|s| {
        let saver = s.spawn(|| send(&mut *srcs, to_dst, header, opts, src_obs));
        let loader = s.spawn(|| receive(&mut *dsts, to_src, fence, dst_obs));
        (saver.join(), loader.join())
    });
    outcome(sent, received)
}

/// As [`migrate_pairs`], over `channels` socketpairs (see
/// [`crate::handshake::send_channels`]): device `i` travels on channel `i mod n`.
#[allow(clippy::too_many_arguments)]
pub fn migrate_pairs_channels(
    srcs: &mut [&mut dyn MigrationDevice],
    dsts: &mut [&mut dyn MigrationDevice],
    header: &StreamHeader,
    opts: &SaveOptions,
    fence: &mut dyn Fence,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
    channels: u16,
) -> Result<Vec<MigrateReport>> {
    if channels <= 1 {
        return migrate_pairs(srcs, dsts, header, opts, fence, src_obs, dst_obs);
    }
    check_pairs(srcs, dsts)?;
    let pair = || Connection::pair().map_err(|e| Error::transport("create socketpair", e));
    let (to_dst, to_src) = pair()?;
    let mut src_ends = Vec::new();
    let mut dst_ends = Vec::new();
    for _ in 1..channels {
        let (a, b) = pair()?;
        src_ends.push(a);
        dst_ends.push(b);
    }
    let (sent, received) = std::thread::scope(|s| {
        let saver = s.spawn(|| {
            let mut ends = src_ends.into_iter();
            let mut connect = |_: u16| {
                ends.next()
                    .ok_or_else(|| Error::invalid_input("no further socketpair"))
            };
            send_channels(
                &mut *srcs,
                to_dst,
                header,
                opts,
                src_obs,
                channels,
                &mut connect,
            )
        });
        let loader = s.spawn(|| {
            let mut ends = dst_ends.into_iter();
            let mut accept = |deadline: Instant| -> Result<ChannelOpening<Connection>> {
                let conn = ends
                    .next()
                    .ok_or_else(|| Error::invalid_input("no further socketpair"))?;
                match open_connection(conn, Some(deadline))? {
                    Opened::Channel(c) => Ok(c),
                    Opened::Session(_) => Err(Error::protocol(
                        "bind a channel",
                        "a session opened where a CHANNEL was expected",
                    )),
                }
            };
            let opening = open_session(to_src, None)?;
            receive_channels(&mut *dsts, opening, fence, dst_obs, channels, &mut accept)
        });
        (saver.join(), loader.join())
    });
    outcome(sent, received)
}

type Joined<T> = std::thread::Result<Result<T>>;

fn outcome(sent: Joined<SendOutcome>, received: Joined<RecvOutcome>) -> Result<Vec<MigrateReport>> {
    let sent = sent.map_err(|_| Error::protocol("save", "the source thread panicked"))?;
    let received =
        received.map_err(|_| Error::protocol("load", "the destination thread panicked"))?;
    match (sent, received) {
        (Ok(SendOutcome::Completed(saves)), Ok(RecvOutcome::Resumed { reports, .. })) => Ok(saves
            .into_iter()
            .zip(reports)
            .map(|(save, load)| MigrateReport { save, load })
            .collect()),
        (Ok(SendOutcome::AlreadyCompleted), Ok(_))
        | (Ok(SendOutcome::Completed(_)), Ok(RecvOutcome::AlreadyCompleted { .. })) => {
            Err(Error::Refused {
                step: "handshake".into(),
                code: ReasonCode::Protocol,
                detail: "the destination already completed this session; nothing was migrated"
                    .into(),
            })
        }
        // Both failed: one caused the other (see `pick_cause`).
        (Err(se), Err(de)) => Err(pick_cause(se, de)),
        (Err(se), Ok(_)) => Err(se),
        // The source only succeeds on RESUMED (or when the destination had already completed
        // the session): the destination runs the state, so the source must not run it again,
        // whatever the destination reported afterwards.
        (Ok(_), Err(e)) => Err(e),
    }
}

/// Chooses the error that explains a failed migration when both sides failed, keeping the
/// source's recovery outcome in the message: a source that lost its connection or got FAILED
/// failed because of the destination, whose error is then the cause; otherwise the
/// destination only saw a truncated stream. A destination device that could not be recovered
/// is named either way.
fn pick_cause(source_err: Error, dest_err: Error) -> Error {
    let unrecovered = unrecovered(&dest_err);
    let cause = pick_cause_only(source_err, dest_err);
    with_outcomes(cause, unrecovered)
}

/// The devices of a (destination's) error that could not be recovered: a driver whose reset
/// does not leave RESUMING (igb-vfio-pci) must be named in the error whichever side's error
/// explains the failure.
fn unrecovered(e: &Error) -> Vec<(String, Recovery)> {
    let failed = |r: &Recovery| matches!(r, Recovery::Failed(_));
    match e {
        Error::Core(CoreError::RolledBack {
            device, recovery, ..
        }) if failed(recovery) => vec![(device.clone(), recovery.clone())],
        Error::Core(CoreError::RolledBackAll { outcomes, .. }) => outcomes
            .iter()
            .filter(|(_, r)| failed(r))
            .cloned()
            .collect(),
        _ => Vec::new(),
    }
}

/// `cause` with the `extra` outcomes added to the devices it names (those it names already
/// are kept as they are).
fn with_outcomes(cause: Error, extra: Vec<(String, Recovery)>) -> Error {
    if extra.is_empty() {
        return cause;
    }
    let (source, mut outcomes) = match cause {
        Error::Core(CoreError::RolledBack {
            source,
            device,
            recovery,
        }) => (source, vec![(device, recovery)]),
        Error::Core(CoreError::RolledBackAll { source, outcomes }) => (source, outcomes),
        other => (Box::new(other.into_core()), Vec::new()),
    };
    for (device, recovery) in extra {
        if !outcomes.iter().any(|(d, _)| *d == device) {
            outcomes.push((device, recovery));
        }
    }
    Error::Core(CoreError::RolledBackAll { source, outcomes })
}

/// The error of [`pick_cause`], before the unrecovered destination devices are added.
fn pick_cause_only(source_err: Error, dest_err: Error) -> Error {
    match source_err {
        Error::Core(CoreError::RolledBack {
            source,
            device,
            recovery,
        }) if is_peer_loss(&source) => Error::Core(CoreError::RolledBack {
            source: Box::new(dest_err.into_core()),
            device,
            recovery,
        }),
        Error::Core(CoreError::RolledBackAll { source, outcomes }) if is_peer_loss(&source) => {
            Error::Core(CoreError::RolledBackAll {
                source: Box::new(dest_err.into_core()),
                outcomes,
            })
        }
        Error::Refused { .. } => dest_err,
        other => other,
    }
}
