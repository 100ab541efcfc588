// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A migration between two devices of this host: [`send`] and [`receive`] in two threads
//! over a socketpair, so a local migration runs exactly the code path of a remote one.

use super::destination::{receive, RecvOutcome};
use super::source::{send, SendOutcome};
use crate::engine::save::rollback_source;
use crate::engine::{MigrateReport, MigrationDevice, Observer, SaveOptions};
use crate::error::{Error, Result};
use crate::fence::Fence;
use crate::handshake::ReasonCode;
use crate::stream::StreamHeader;
use crate::transport::Connection;

/// Migrates `src` into `dst` under `header` (one device, live exactly when `opts.live`), with
/// `fence` as the destination's fencing state. On success the source is stopped and the
/// destination runs the source's state; on failure the source runs again (or was reset), the
/// destination was reset, and the error names the failed step and what became of both.
pub fn migrate_pair(
    src: &mut dyn MigrationDevice,
    dst: &mut dyn MigrationDevice,
    header: &StreamHeader,
    opts: &SaveOptions,
    fence: &mut dyn Fence,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<MigrateReport> {
    let (to_dst, to_src) =
        Connection::pair().map_err(|e| Error::transport("create socketpair", e))?;
    let (sent, received) = std::thread::scope(|s| {
        let saver = s.spawn(|| send(&mut *src, to_dst, header, opts, src_obs));
        let loader = s.spawn(|| receive(&mut *dst, to_src, fence, dst_obs));
        (saver.join(), loader.join())
    });
    let sent = sent.map_err(|_| Error::protocol("save", "the source thread panicked"))?;
    let received = received.map_err(|_| Error::protocol("load", "the destination thread panicked"))?;
    match (sent, received) {
        (Ok(SendOutcome::Completed(save)), Ok(RecvOutcome::Resumed { report, .. })) => {
            Ok(MigrateReport { save, load: report })
        }
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
        // The source only succeeds on RESUMED, so this cannot happen; if it did, the
        // destination did not resume: run the source again.
        (Ok(_), Err(e)) => Err(rollback_source(src, 0, e, src_obs)),
    }
}

/// Chooses the error that explains a failed migration when both sides failed, keeping the
/// source's recovery outcome in the message: a source that lost its connection or got FAILED
/// failed because of the destination, whose error is then the cause; otherwise the
/// destination only saw a truncated stream.
fn pick_cause(source_err: Error, dest_err: Error) -> Error {
    match source_err {
        Error::RolledBack {
            source,
            device,
            recovery,
        } if matches!(
            *source,
            Error::Transport { .. } | Error::PeerFailed { .. }
        ) =>
        {
            Error::RolledBack {
                source: Box::new(dest_err),
                device,
                recovery,
            }
        }
        Error::Refused { .. } => dest_err,
        other => other,
    }
}
