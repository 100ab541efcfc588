// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a session over several channels: the binding of each further
//! connection (CHANNEL: the session, its index, the token; anything else is refused and
//! touches no device), and the receive functions over [`SessionDestination`].

use super::destination::{open_session, Opening, RecvOutcome};
use super::session_destination::receive_channels;
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig_fence::Fence;

/// Receives a migration into `dev` from the source at the other end of `conn`:
/// [`open_session`] without a deadline, then [`receive_opened`].
pub fn receive<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    conn: C,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    receive_opened(devs, open_session(conn, None)?, fence, obs)
}

/// Runs an opened session into `devs`: a [`SessionDestination`](super::SessionDestination) that loads and runs at
/// once.
///
/// Checks, before the device is touched: one device in the stream per device given, known
/// features, the device's protocol and model, and the fencing state ([`Fence::admit`]: a
/// completed session is answered ALREADY_COMPLETED, a stale epoch REFUSE). Then ACCEPT, the
/// load (SWITCHOVER_ACK after the pre-copy data, LOADED after the trailer), COMMIT from the
/// source, the completion record, the resume, and RESUMED.
///
/// On any failure after ACCEPT the device is reset (it never runs with partial state), a
/// completion record is withdrawn, and FAILED tells the source why.
/// A source that offered several channels is run on one: the main connection
/// ([`receive_channels`] with a bound of 1).
pub fn receive_opened<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    opening: Opening<C>,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    receive_channels(devs, opening, fence, obs, 1, &mut |_| {
        Err(Error::invalid_input("no further channels here"))
    })
}
