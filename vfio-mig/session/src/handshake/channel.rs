// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a session over several channels: the answer to OFFER_CHANNELS (how
//! many it takes, and the token), the binding of each further connection (CHANNEL: the
//! session, its index, the token; anything else is refused and touches no device), ACCEPT
//! once every channel is bound, then the load over all channels
//! ([`vfio_mig::workspace::load_channels_gated`]) and the two-phase end on the main
//! connection.

use std::io::BufReader;
use std::net::Shutdown;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::destination::{
    admission_checks, finish_session, open_session, refuse, release, Gate, Opening, RecvOutcome,
    DRAIN_TIME,
};
use super::message::{
    write_message, ChannelToken, Message, ReasonCode, SessionId, FEATURE_SWITCHOVER_ACK,
    MAX_CHANNELS,
};
use super::opened::{send_final, ChannelOpening};
use super::session_destination::receive_one;
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::new_session_id;
use vfio_mig::workspace::load_channels_gated;
use vfio_mig::workspace::rollback_destinations;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig_fence::{Admission, Fence};

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

/// Runs an opened session into `devs`.
///
/// Checks, before the device is touched: one device in the stream per device given, known
/// features, the device's protocol and model ([`check_compatible`](vfio_mig::workspace::check_compatible)), and the fencing state
/// ([`Fence::admit`]: a completed session is answered ALREADY_COMPLETED, a stale epoch
/// REFUSE). Then ACCEPT, the load (SWITCHOVER_ACK after the pre-copy data, LOADED after the
/// trailer), COMMIT from the source, the completion record, the resume, and RESUMED.
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
    if opening.offered.is_none() {
        return receive_one(devs, opening, fence, obs);
    }
    receive_channels(devs, opening, fence, obs, 1, &mut |_| {
        Err(Error::invalid_input("no further channels here"))
    })
}

/// Equal tokens, compared in constant time (a wrong guess learns nothing from the timing).
fn same_token(a: &ChannelToken, b: &ChannelToken) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a session whose source offered several channels (one that offered none is run as by
/// [`receive_opened`]): takes `min(offered, max, devices)`
/// of them (at least 1, at most [`MAX_CHANNELS`]), answers CHANNELS with a fresh random
/// token, and binds each further connection `accept` returns (it is called with the bind
/// deadline and must fail once that passed). A connection with another session, a wrong
/// token, an index out of range or already bound is refused, logged and does not count; the
/// session then keeps waiting for its own. Once every channel is bound: ACCEPT, the load
/// over all channels, and the same end as [`receive_opened`].
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
    if opening.offered.is_none() {
        // A source that offered no channels speaks the one-connection handshake.
        return receive_one(devs, opening, fence, obs);
    }
    let Opening {
        mut tx,
        reader,
        features,
        offered,
        header,
    } = opening;
    let mut rx = reader.into_inner();
    let session = header.session_id;
    match admission_checks(devs, features, &header, fence) {
        Ok(Admission::Accept) => {}
        Ok(Admission::AlreadyCompleted) => {
            let msg = Message::AlreadyCompleted { session };
            send_final(&mut tx, &mut rx, &msg, DRAIN_TIME);
            return Ok(RecvOutcome::AlreadyCompleted { header });
        }
        Err((code, detail)) => return Err(refuse(&mut tx, &mut rx, code, detail)),
    }
    let count = offered
        .unwrap_or(1)
        .min(max)
        .min(MAX_CHANNELS)
        .min(header.devices.len() as u16)
        .max(1);
    let token = match new_session_id() {
        Ok(t) => t,
        Err(e) => {
            release(fence, &session);
            return Err(refuse(
                &mut tx,
                &mut rx,
                ReasonCode::Device,
                vfio_mig::error::Report(&e).to_string(),
            ));
        }
    };
    let answer = Message::Channels {
        session,
        count,
        token,
    };
    if let Err(e) = write_message(&mut tx, &answer, "handshake") {
        release(fence, &session);
        return Err(e.into());
    }
    let mut channels = match bind(session, &token, count, accept) {
        Ok(c) => c,
        Err(detail) => {
            release(fence, &session);
            return Err(refuse(&mut tx, &mut rx, ReasonCode::Protocol, detail));
        }
    };
    if let Err(e) = write_message(&mut tx, &Message::Accept { session }, "handshake") {
        release(fence, &session);
        return Err(e.into());
    }
    log::info!("session bound on {count} channels");

    // Handles to stop every channel's reads at once when one fails.
    let mut stops = Vec::with_capacity(count as usize);
    let mut readers = Vec::with_capacity(count as usize);
    match rx.get_ref().try_clone() {
        Ok(c) => stops.push(c),
        Err(e) => {
            release(fence, &session);
            return Err(Error::transport("clone the connection", e));
        }
    }
    readers.push(rx);
    for c in channels.iter_mut() {
        match c.tx.try_clone() {
            Ok(h) => stops.push(h),
            Err(e) => {
                release(fence, &session);
                return Err(Error::transport("clone a channel", e));
            }
        }
    }
    // Channel 0 (the main connection) reads COMMIT after its trailer; keep a reader handle
    // of it for the drain after a failure, and the channels' write handles until the end.
    let mut rest = stops[0]
        .try_clone()
        .map_err(|e| Error::transport("clone the connection", e))?;
    let mut kept = Vec::with_capacity(channels.len());
    for c in channels {
        kept.push(c.tx);
        readers.push(c.rx);
    }
    let stops = Mutex::new(stops);
    let stop = || {
        for s in stops.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = s.shutdown(Shutdown::Read);
        }
    };
    let mut gate = Gate {
        tx: &mut tx,
        session,
        ack: features & FEATURE_SWITCHOVER_ACK != 0,
        fence,
        completed: false,
    };
    let loaded = load_channels_gated(devs, &header, readers, &stop, obs, &mut gate);
    let completed = gate.completed;
    let loaded = loaded.map_err(|e| match e {
        e @ vfio_mig::Error::PastNoReturn { .. } => e,
        e => rollback_destinations(devs, e, obs),
    });
    let outcome = finish_session(header, loaded, completed, fence, &mut tx, &mut rest);
    for k in &kept {
        let _ = k.shutdown(Shutdown::Both);
    }
    outcome
}

/// A bound further channel.
struct Bound<C: Duplex> {
    tx: C,
    rx: BufReader<C>,
}

/// Binds channels 1..count within [`BIND_TIME`]; `Err` is the REFUSE detail.
fn bind<C: Duplex>(
    session: SessionId,
    token: &ChannelToken,
    count: u16,
    accept: &mut dyn FnMut(Instant) -> Result<ChannelOpening<C>>,
) -> std::result::Result<Vec<Bound<C>>, String> {
    let deadline = Instant::now() + BIND_TIME;
    let mut slots: Vec<Option<Bound<C>>> = (1..count).map(|_| None).collect();
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
        slots[usize::from(index) - 1] = Some(Bound {
            tx: opening.tx,
            rx: opening.rx,
        });
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
