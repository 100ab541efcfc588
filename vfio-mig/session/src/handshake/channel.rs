// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a session over several channels: the binding of each further
//! connection (CHANNEL: the session, its index, the token; anything else is refused and
//! touches no device), and the receive functions over [`SessionDestination`].

use std::io::BufReader;
use std::time::{Duration, Instant};

use super::destination::{open_session, Opening, RecvOutcome};
use super::message::{ChannelToken, SessionId};
use super::opened::ChannelOpening;
use super::session_destination::receive_now;
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig_fence::Fence;

/// How long the destination waits for the source's further connections, from its CHANNELS
/// answer: every channel must be bound by then, or the session is refused (no device was
/// touched yet).
pub const BIND_TIME: Duration = Duration::from_secs(10);

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

/// Runs an opened session into `devs`: a [`SessionDestination`] that loads and runs at
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

/// Equal tokens, compared in constant time (a wrong guess learns nothing from the timing).
fn same_token(a: &ChannelToken, b: &ChannelToken) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a session whose source offered several channels (one that offered none is run as by
/// [`receive_opened`]): [`SessionDestination::accept_channels`] (up to `max` channels), the
/// load over all channels at once, and the same end as [`receive_opened`].
///
/// A channel that fails (closed, a bad record, a timeout) stops every channel and fails the
/// unit: every device is reset and FAILED names the channel.
pub fn receive_channels<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    opening: Opening<C>,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
    max: u16,
    accept: &mut dyn FnMut(Instant) -> Result<ChannelOpening<C>>,
) -> Result<RecvOutcome> {
    receive_now(devs, opening, fence, obs, max, accept)
}

/// Binds channels 1..count within [`BIND_TIME`], each as its write handle and its reader;
/// `Err` is the REFUSE detail.
#[allow(clippy::type_complexity)]
pub(super) fn bind<C: Duplex>(
    session: SessionId,
    token: &ChannelToken,
    count: u16,
    accept: &mut dyn FnMut(Instant) -> Result<ChannelOpening<C>>,
) -> std::result::Result<Vec<(C, BufReader<C>)>, String> {
    let deadline = Instant::now() + BIND_TIME;
    let mut slots: Vec<Option<(C, BufReader<C>)>> = (1..count).map(|_| None).collect();
    let mut bound = 0usize;
    while bound + 1 < usize::from(count) {
        let opening = accept(deadline).map_err(|e| {
            format!(
                "{bound} of {} further channels connected within {} s ({})",
                count - 1,
                BIND_TIME.as_secs(),
                vfio_mig::error::Report(&e)
            )
        })?;
        let index = opening.index;
        let why = if opening.session != session {
            Some("it names another session")
        } else if !same_token(&opening.token, token) {
            Some("its token is not this session's")
        } else if index == 0 || index >= count {
            Some("its index is out of range")
        } else if slots[usize::from(index) - 1].is_some() {
            Some("its index is bound already")
        } else {
            None
        };
        if let Some(why) = why {
            let e = opening.refuse(
                format!("CHANNEL {index} refused: {why}"),
                Duration::from_secs(1),
            );
            log::warn!("{}", vfio_mig::error::Report(&e));
            continue;
        }
        slots[usize::from(index) - 1] = Some((opening.tx, opening.rx));
        bound += 1;
    }
    Ok(slots.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_every_byte() {
        let a = [5u8; 16];
        assert!(same_token(&a, &a));
        for i in 0..16 {
            let mut b = a;
            b[i] ^= 0x80;
            assert!(!same_token(&a, &b), "byte {i}");
        }
    }
}
