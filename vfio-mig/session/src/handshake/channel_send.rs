// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source's further channels of a session: after the destination's CHANNELS (how many,
//! and the token), one CHANNEL message opens each further connection; after a failure, the
//! wait for the destination's reason on the main connection.

use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::message::{write_message, ChannelToken, Message, SessionId};
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::Error as CoreError;

/// How long the source waits, after a channel failed, for the destination's reason on the
/// main connection (it usually explains the failure better than the channel's `EPIPE`).
const REASON_WAIT: Duration = Duration::from_secs(2);

/// Opens channels 1..`count` with `connect(index)` and binds each to `session` with CHANNEL
/// and the destination's `token`.
pub(super) fn bind_channels<C: Duplex>(
    session: SessionId,
    count: u16,
    token: ChannelToken,
    connect: &mut dyn FnMut(u16) -> Result<C>,
) -> Result<Vec<C>> {
    let mut channels = Vec::with_capacity(usize::from(count).saturating_sub(1));
    for index in 1..count {
        let mut c = connect(index).map_err(|e| open_failed(e, index))?;
        let bind = Message::Channel {
            session,
            index,
            token,
        };
        write_message(&mut c, &bind, &format!("bind channel {index}"))?;
        channels.push(c);
    }
    Ok(channels)
}

fn open_failed(e: Error, index: u16) -> Error {
    match e {
        Error::Core(CoreError::Transport { step, source }) => {
            Error::transport(format!("open channel {index}: {step}"), source)
        }
        e => e,
    }
}

/// After a failure, waits (at most [`REASON_WAIT`]) until the main connection has something
/// to read: a destination that failed first sends FAILED there, and its reason is the one
/// to report; once the source closed its channels, a destination that had not failed yet
/// fails on them and answers FAILED too.
pub(super) fn wait_for_reason<C: Duplex>(rx: &C) {
    if rx.readable_now().unwrap_or(false) {
        return;
    }
    let timeout = PollTimeout::try_from(REASON_WAIT).unwrap_or(PollTimeout::ZERO);
    let mut fds = [PollFd::new(rx.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(_) => {}
        Err(e) => log::debug!("wait for the destination's reason: {e}"),
    }
}
