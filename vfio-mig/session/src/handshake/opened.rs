// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the destination needs before it knows what a connection is for: the final
//! REFUSE/FAILED with its bounded drain, a further channel's opening (CHANNEL read, not yet
//! checked), and the binding of the further channels to their session.

use std::io::{BufReader, Read};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use super::message::{write_message, ChannelToken, Message, Reason, ReasonCode, SessionId};
use crate::error::{Error, Result};
use crate::transport::{Duplex, SOCKET_BUFFER};
use vfio_mig::error::Report;

/// Sends a final REFUSE or FAILED, closes the writing direction, and reads what the source
/// still sends until it closes (at most `drain`).
pub(super) fn send_final<C: Duplex>(
    tx: &mut C,
    rx: &mut impl Read,
    msg: &Message,
    drain: Duration,
) {
    if let Err(e) = write_message(tx, msg, "end the session") {
        log::debug!("{}", Report(&e));
        return;
    }
    let _ = tx.shutdown(Shutdown::Write);
    // What `rx` holds is dropped with it; the drain reads the socket through `tx` under a
    // deadline, so a silent peer is let go after `drain`, not after the idle timeout.
    let _ = rx;
    let end = Instant::now() + drain;
    if drain.is_zero() || tx.set_deadline(Some(end)).is_err() {
        return;
    }
    let mut sink = vec![0u8; SOCKET_BUFFER];
    while Instant::now() < end {
        match tx.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// A further connection that opened with CHANNEL: its claimed session, index and token, not
/// yet checked. Read by [`super::open_connection`].
pub struct ChannelOpening<C: Duplex> {
    pub(super) tx: C,
    pub(super) rx: BufReader<C>,
    pub(super) session: SessionId,
    pub(super) index: u16,
    pub(super) token: ChannelToken,
}

impl<C: Duplex> std::fmt::Debug for ChannelOpening<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token stays out of logs.
        f.debug_struct("ChannelOpening")
            .field("session", &self.session)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<C: Duplex> ChannelOpening<C> {
    /// The session the connection claims to belong to.
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    /// The channel index it claims.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The connection (its peer, its TLS identities).
    pub fn connection(&self) -> &C {
        &self.tx
    }

    /// Turns the connection away: REFUSE(unauthorized) with `detail`, then the connection
    /// ends (what it still sends is dropped for at most `drain`).
    pub fn refuse(mut self, detail: String, drain: Duration) -> Error {
        let code = ReasonCode::Unauthorized;
        let msg = Message::Refuse(Reason::new(code, detail.clone()));
        // A silent intruder must not hold the drain (nor the session waiting on it).
        if let Err(e) = self.rx.get_mut().set_deadline(Some(Instant::now() + drain)) {
            log::debug!("set the drain deadline: {e}");
        }
        send_final(&mut self.tx, &mut self.rx, &msg, drain);
        Error::Refused {
            step: "bind a channel".into(),
            code,
            detail,
        }
    }
}

/// The channel opening of a connection whose CHANNEL message `open_connection` read; clears
/// the opening deadline if one was set (the sub-stream's reads wait with the idle timeout).
pub(super) fn channel_opened<C: Duplex>(
    tx: C,
    mut rx: BufReader<C>,
    session: SessionId,
    index: u16,
    token: ChannelToken,
    had_deadline: bool,
) -> Result<ChannelOpening<C>> {
    if had_deadline {
        rx.get_mut()
            .set_deadline(None)
            .map_err(|e| Error::transport("clear the handshake deadline", e))?;
    }
    Ok(ChannelOpening {
        tx,
        rx,
        session,
        index,
        token,
    })
}

/// How long the destination waits for the source's further connections, from its CHANNELS
/// answer: every channel must be bound by then, or the session is refused (no device was
/// touched yet).
pub const BIND_TIME: Duration = Duration::from_secs(10);

/// Equal tokens, compared in constant time (a wrong guess learns nothing from the timing).
fn same_token(a: &ChannelToken, b: &ChannelToken) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
