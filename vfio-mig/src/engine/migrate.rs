// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local migration between two devices of this host, through the same stream a remote
//! migration uses (over a socketpair, so back-pressure and framing are the real ones).

use std::io::{BufReader, BufWriter};
use std::os::unix::net::UnixStream;

use crate::error::{Error, Result};
use crate::stream::{StreamReader, StreamWriter};

use super::events::Observer;
use super::load::{load_with_rollback, LoadReport};
use super::save::{rollback_source, save_with_rollback, SaveOptions, SaveReport};
use super::session::new_header;
use super::MigrationDevice;

/// What a local migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrateReport {
    /// The source side.
    pub save: SaveReport,
    /// The destination side.
    pub load: LoadReport,
}

/// Migrates `src` into `dst`. On success the source is stopped and the destination runs with
/// the source's state. On failure the source runs again (or was reset), the destination was
/// reset, and the error names the step that failed.
pub fn migrate_local(
    src: &mut dyn MigrationDevice,
    dst: &mut dyn MigrationDevice,
    opts: &SaveOptions,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<MigrateReport> {
    let header = new_header(&[&*src], opts.live, 1)?;
    let (tx, rx) = UnixStream::pair().map_err(|e| Error::transport("create socketpair", e))?;
    let (save, load) = std::thread::scope(|s| {
        let saver = s.spawn(|| -> Result<SaveReport> {
            let mut out = StreamWriter::new(BufWriter::with_capacity(1 << 16, tx), &header)?;
            let report = save_with_rollback(&mut *src, &mut out, 0, opts, src_obs)?;
            // The trailer can only fail to go out if the destination is gone; the source has
            // already stopped, so run it again.
            out.finish()
                .map_err(|e| rollback_source(&mut *src, 0, e, src_obs))?;
            Ok(report)
        });
        let loader = s.spawn(|| -> Result<LoadReport> {
            let (mut reader, _header) = StreamReader::open(BufReader::with_capacity(1 << 16, rx))?;
            load_with_rollback(dst, &mut reader, 0, dst_obs)
        });
        let save = saver.join();
        let load = loader.join();
        (save, load)
    });
    let save = save.map_err(|_| Error::protocol("save", "the save thread panicked"))?;
    let load = load.map_err(|_| Error::protocol("load", "the load thread panicked"))?;
    match (save, load) {
        (Ok(save), Ok(load)) => Ok(MigrateReport { save, load }),
        // Both failed: one caused the other. A source that lost its connection failed because
        // the destination gave up, so the destination's error is the cause; otherwise the
        // destination only saw a truncated stream. The source rolled itself back either way.
        (Err(se), Err(de)) => Err(pick_cause(se, de)),
        (Err(se), Ok(_)) => Err(se),
        // The source completed and stopped, but the destination failed: run the source again.
        (Ok(_), Err(e)) => Err(rollback_source(src, 0, e, src_obs)),
    }
}

/// Chooses the error that explains a failed migration when both sides failed, keeping the
/// source's recovery outcome in the message.
fn pick_cause(source_err: Error, dest_err: Error) -> Error {
    match source_err {
        Error::RolledBack {
            source,
            device,
            recovery,
        } if matches!(*source, Error::Transport { .. }) => Error::RolledBack {
            source: Box::new(dest_err),
            device,
            recovery,
        },
        other => other,
    }
}
