// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local migration between two devices of this host, through the same stream a remote
//! migration uses (over a socketpair, so back-pressure and framing are the real ones).

use crate::error::Result;

use super::events::Observer;
use super::load::LoadReport;
use super::save::{SaveOptions, SaveReport};
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
///
/// Both sides run the session handshake of a remote migration
/// ([`crate::handshake::migrate_pair`]) over a socketpair, so back-pressure, framing, the
/// switchover-ack and the two-phase end are the real ones. The source takes its STOP
/// transition only after the destination resumed, outside the downtime window.
pub fn migrate_local(
    src: &mut dyn MigrationDevice,
    dst: &mut dyn MigrationDevice,
    opts: &SaveOptions,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<MigrateReport> {
    let header = new_header(&[&*src], opts.live, 1)?;
    crate::handshake::migrate_pair(
        src,
        dst,
        &header,
        opts,
        &mut crate::fence::MemoryFence::new(),
        src_obs,
        dst_obs,
    )
}
