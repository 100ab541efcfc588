// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source of a session over several channels: HELLO with the channels feature,
//! OFFER_CHANNELS and the unit's stream header on the main connection; the destination's
//! CHANNELS (how many, and the token); one CHANNEL message on each further connection; after
//! ACCEPT, each channel's sub-stream written in parallel (device `i` on channel `i mod n`);
//! the barrier and the two-phase end on the main connection.

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::answers::{expect, explain, unexpected, Watched};
use super::message::{
    read_message, write_message, Message, FEATURE_CHANNELS, FEATURE_SWITCHOVER_ACK, MAX_CHANNELS,
};
use super::reinit::reack_after_reinit;
use super::source::{before_hello, commit, refused, send, SendOutcome};
use crate::error::{Error, Result};
use crate::transport::{Duplex, SOCKET_BUFFER};
use vfio_mig::wire::CoalescingWriter;
use vfio_mig::wire::StreamHeader;
use vfio_mig::wire::StreamWriter;
use vfio_mig::workspace::channel_header;
use vfio_mig::workspace::pre_copy_channels;
use vfio_mig::workspace::resend_reinit_channels;
use vfio_mig::workspace::rollback_sources;
use vfio_mig::workspace::stop_copy_channels;
use vfio_mig::workspace::SaveOptions;
use vfio_mig::workspace::SharedWriter;
use vfio_mig::Error as CoreError;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig::SaveReport;

/// How long the source waits, after a channel failed, for the destination's reason on the
/// main connection (it usually explains the failure better than the channel's `EPIPE`).
const REASON_WAIT: Duration = Duration::from_secs(2);

type ChannelWriter<C> = StreamWriter<CoalescingWriter<Watched<C>>>;

/// Migrates `devs` as one unit over up to `offer` channels: the main connection `conn` and
/// further connections made by `connect(index)` (to the same destination, over the same
/// transport: the caller verifies TLS identities exactly as for `conn`). With `offer` 1 (or
/// one device) this is [`send`]; otherwise the destination chooses how many channels it
/// takes (1 to `offer`).
///
/// No device is touched before the destination accepted the session with every channel
/// bound. After that, as [`send`]: any failure before COMMIT, on any channel, rolls every
/// device back to RUNNING; a lost RESUMED leaves them stopped ([`Error::InDoubt`]).
pub fn send_channels<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    conn: C,
    header: &StreamHeader,
    opts: &SaveOptions,
    obs: &dyn Observer,
    offer: u16,
    connect: &mut dyn FnMut(u16) -> Result<C>,
) -> Result<SendOutcome> {
    let offer = offer.min(MAX_CHANNELS).min(devs.len() as u16);
    if offer <= 1 {
        return send(devs, conn, header, opts, obs);
    }
    let session = header.session_id;
    let (mut rx, ctl) = before_hello(devs, &conn, header, opts)?;
    let features = FEATURE_CHANNELS | if opts.live { FEATURE_SWITCHOVER_ACK } else { 0 };

    // 1. HELLO, OFFER_CHANNELS and the unit's header; the devices are untouched until ACCEPT.
    let mut main = CoalescingWriter::with_capacity(SOCKET_BUFFER, Watched(conn));
    let mut opening = Message::Hello { features }.encode();
    opening.extend_from_slice(&Message::OfferChannels { count: offer }.encode());
    let written = header.encode().and_then(|h| {
        opening.extend_from_slice(&h);
        main.write_all(&opening)
            .and_then(|()| main.flush())
            .map_err(|e| CoreError::transport("handshake: send HELLO", e))
    });
    let answer = match written {
        Ok(()) => read_message(&mut rx, "handshake: wait for the destination's answer"),
        Err(e) if rx.readable_now().unwrap_or(false) => {
            match read_message(&mut rx, "handshake: read the destination's answer") {
                Ok(m @ Message::Refuse(_)) => return refused(&m),
                _ => Err(e),
            }
        }
        Err(e) => Err(e),
    }?;
    let (count, token) = match &answer {
        Message::Channels {
            session: s,
            count,
            token,
        } if *s == session && (1..=offer).contains(count) => (*count, *token),
        Message::AlreadyCompleted { session: s } if *s == session => {
            log::info!("the destination already completed this session");
            return Ok(SendOutcome::AlreadyCompleted);
        }
        Message::Refuse(_) => return refused(&answer),
        other => return Err(unexpected(other, "CHANNELS", "handshake")),
    };

    // 2. The further channels, each bound by CHANNEL; then ACCEPT (or REFUSE).
    let mut channels = Vec::with_capacity(usize::from(count) - 1);
    for index in 1..count {
        let mut c = connect(index).map_err(|e| open_failed(e, index))?;
        write_message(
            &mut c,
            &Message::Channel {
                session,
                index,
                token,
            },
            &format!("bind channel {index}"),
        )?;
        channels.push(c);
    }
    match read_message(&mut rx, "handshake: wait for ACCEPT")? {
        Message::Accept { session: s } if s == session => {}
        m @ Message::Refuse(_) => return refused(&m),
        other => return Err(unexpected(&other, "ACCEPT", "handshake")),
    }
    log::info!("session bound on {count} channels");
    let mut shutdowns = Vec::with_capacity(channels.len());
    for c in &channels {
        shutdowns.push(
            c.try_clone()
                .map_err(|e| Error::transport("clone a channel", e))?,
        );
    }
    let conns: Vec<CoalescingWriter<Watched<C>>> = std::iter::once(main)
        .chain(
            channels
                .into_iter()
                .map(|c| CoalescingWriter::with_capacity(SOCKET_BUFFER, Watched(c))),
        )
        .collect();

    // 3. Pre-copy, switchover, stop-and-copy, the trailers, LOADED. Any failure: roll back.
    let mut reports = vec![SaveReport::default(); devs.len()];
    let sent = (|| -> Result<CoalescingWriter<Watched<C>>> {
        let mut writers: Vec<ChannelWriter<C>> = Vec::with_capacity(conns.len());
        for (ch, w) in conns.into_iter().enumerate() {
            let sub = channel_header(header, ch, usize::from(count));
            writers.push(StreamWriter::new(w, &sub).map_err(|e| on_channel(ch, e))?);
        }
        if opts.live {
            let shared: Vec<_> = writers.into_iter().map(SharedWriter::new).collect();
            pre_copy_channels(devs, &shared, opts, obs, &mut reports)?;
            writers = shared.into_iter().map(SharedWriter::into_inner).collect();
            for (ch, w) in writers.iter_mut().enumerate() {
                w.flush().map_err(|e| on_channel(ch, e))?;
            }
            let ack = Message::SwitchoverAck { session }.kind();
            expect(
                &mut rx,
                &session,
                ack,
                "wait for the destination's SWITCHOVER_ACK",
            )?;
            writers = reack_after_reinit(&mut rx, &session, opts, writers, |writers| {
                let shared: Vec<_> = writers.into_iter().map(SharedWriter::new).collect();
                let reopened = resend_reinit_channels(devs, &shared, opts, obs, &mut reports);
                let mut writers: Vec<_> =
                    shared.into_iter().map(SharedWriter::into_inner).collect();
                let reopened = reopened?;
                for (ch, w) in writers.iter_mut().enumerate() {
                    w.flush().map_err(|e| on_channel(ch, e))?;
                }
                Ok((writers, reopened))
            })?;
        }
        let shared: Vec<_> = writers.into_iter().map(SharedWriter::new).collect();
        stop_copy_channels(devs, &shared, opts, obs, &mut reports)?;
        let mut main = None;
        for (ch, w) in shared.into_iter().enumerate() {
            let (mut tx, _) = w.into_inner().finish().map_err(|e| on_channel(ch, e))?;
            tx.flush()
                .map_err(|e| Error::transport(format!("channel {ch}: flush"), e))?;
            if ch == 0 {
                main = Some(tx);
            }
        }
        // The further channels end after their trailers; the destination checks that.
        for s in &shutdowns {
            let _ = s.shutdown(Shutdown::Write);
        }
        let loaded = Message::Loaded { session }.kind();
        expect(
            &mut rx,
            &session,
            loaded,
            "wait for the destination's LOADED",
        )?;
        main.ok_or_else(|| Error::protocol("send", "no main channel"))
    })();
    let mut tx = match sent {
        Ok(tx) => tx,
        Err(e) => {
            for s in &shutdowns {
                let _ = s.shutdown(Shutdown::Both);
            }
            wait_for_reason(&rx);
            return Err(rollback_sources(devs, explain(e, &mut rx).into_core(), obs).into());
        }
    };

    // 4. COMMIT and RESUMED on the main connection, exactly as with one channel.
    commit(devs, &mut tx, &ctl, &mut rx, session, reports, obs)
}

/// Names the channel in a transport or stream error of its writer.
fn on_channel(ch: usize, e: CoreError) -> CoreError {
    match e {
        CoreError::Transport { step, source } => CoreError::Transport {
            step: format!("channel {ch}: {step}"),
            source,
        },
        CoreError::Stream { step, detail } => CoreError::Stream {
            step: format!("channel {ch}: {step}"),
            detail,
        },
        e => e,
    }
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
fn wait_for_reason<C: Duplex>(rx: &C) {
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
