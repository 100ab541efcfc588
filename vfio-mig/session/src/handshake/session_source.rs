// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source of a session around a VMM-paced [`Source`]: the session adds only what is its
//! own (HELLO and the destination's answer before any device moves, the switchover-ack, the
//! two-phase end LOADED / COMMIT / RESUMED), and the VMM keeps the schedule: it calls the
//! rounds, with its own byte budgets, and the switch-over when its own memory rounds say so.
//!
//! ```no_run
//! use vfio_mig::{Epoch, MigrationDevice, Source, SourceOptions};
//! use vfio_mig_session::handshake::{Answer, SessionSource};
//! use vfio_mig_session::transport::Connection;
//! # fn demo(devs: Vec<Box<dyn MigrationDevice>>, conn: Connection) -> vfio_mig_session::Result<()> {
//! // A handback (the devices with the error) gives the devices back; here they are dropped.
//! let source = Source::prepare(devs, &SourceOptions::new(Epoch(1))).map_err(vfio_mig::Error::from)?;
//! let mut session = match SessionSource::open(source, conn).map_err(vfio_mig::Error::from)? {
//!     Answer::Accepted(session) => session,
//!     Answer::AlreadyCompleted(_devices) => return Ok(()), // runs there already
//! };
//! while session.round(Some(4 << 20))?.estimate.pending > 64 << 10 {
//!     // ... the VMM's own memory round ...
//! }
//! session.switch_over()?; // devices in STOP_COPY: the VMM reads its last dirty pages
//! let finished = session.commit().map_err(vfio_mig::Error::from)?; // LOADED, COMMIT, RESUMED
//! # drop(finished); Ok(()) }
//! ```

use std::io::Write;
use std::net::Shutdown;
use std::time::Duration;

use super::answers::{expect, explain, in_doubt, past_no_return, unexpected, Watched};
use super::channel_send::{bind_channels, wait_for_reason};
use super::message::{
    read_message, Message, SessionId, FEATURE_CHANNELS, FEATURE_SWITCHOVER_ACK, MAX_CHANNELS,
};
use super::reinit::reack_passes;
use crate::error::{Error, Result};
use crate::transport::{Duplex, SOCKET_BUFFER};
use vfio_mig::error::Report;
use vfio_mig::wire::CoalescingWriter;
use vfio_mig::Channels;
use vfio_mig::Error as CoreError;
use vfio_mig::NoObserver;
use vfio_mig::Observer;
use vfio_mig::PreCopyPolicy;
use vfio_mig::SwitchReason;
use vfio_mig::{Estimate, Finished, Handback, MigrationDevice, Round, Source};

/// The destination's answer to a session's opening.
#[derive(Debug)]
pub enum Answer<C: Duplex, D: MigrationDevice> {
    /// ACCEPT: the devices entered pre-copy (those that were running and support it); the
    /// VMM now paces the rounds. (Boxed: the session holds the connection's buffers.)
    Accepted(Box<SessionSource<C, D>>),
    /// ALREADY_COMPLETED: the destination runs this session's state already (a retried
    /// handoff). The devices were not touched and must not run that state here: they come
    /// back as they were.
    AlreadyCompleted(Vec<D>),
}

/// A session's source: a [`Source`] the VMM prepared, on a connection to the destination.
///
/// Any failure before COMMIT (a device, the connection, FAILED from the destination) returns
/// every device to the state it had when the migration began, or resets it, and says which
/// ([`into_devices`](Self::into_devices) gives them back); the destination cannot run without
/// COMMIT. After COMMIT, see [`commit`](Self::commit).
pub struct SessionSource<C: Duplex, D: MigrationDevice> {
    source: Source<D>,
    /// The stream's writers, one per channel: the main connection first.
    outs: Vec<CoalescingWriter<Watched<C>>>,
    /// Handles on the further channels, to end them.
    further: Vec<C>,
    /// The reader of the destination's answers.
    rx: C,
    /// The handle that half-closes the connection after COMMIT.
    ctl: C,
    session: SessionId,
    /// Whether the destination acknowledges the pre-copy data before the switch-over.
    ack: bool,
    /// Bounds the re-acknowledgements after a device re-initialised its pre-copy data: the
    /// policy of [`pre_copy`](Self::pre_copy), else the default.
    reack_policy: PreCopyPolicy,
}

impl<C: Duplex, D: MigrationDevice> std::fmt::Debug for SessionSource<C, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionSource")
            .field("source", &self.source)
            .field("ack", &self.ack)
            .finish_non_exhaustive()
    }
}

impl<C: Duplex, D: MigrationDevice> SessionSource<C, D> {
    /// Opens a session for `source` (made by [`Source::prepare`], its header not yet written)
    /// on `conn`: HELLO and the stream header, then the destination's answer, **before any
    /// device moves**. On ACCEPT the source begins (running devices enter pre-copy).
    ///
    /// A refusal, a broken connection or a failure to begin hands the devices back with the
    /// error, each in its start state (or reset, the error says so). The error is the core's;
    /// [`crate::Error::from`] turns it back into the session's own ([`Error::Refused`]).
    pub fn open(source: Source<D>, conn: C) -> std::result::Result<Answer<C, D>, Handback<D>> {
        Self::open_channels(source, conn, 1, &mut |_| {
            Err(Error::invalid_input("no further channels here"))
        })
    }

    /// [`open`](Self::open) over up to `offer` channels: the main connection `conn` and
    /// further connections made by `connect(index)` (to the same destination, over the same
    /// transport: the caller verifies TLS identities exactly as for `conn`). HELLO offers the
    /// channels with the unit's header; the destination answers how many it takes (1 to
    /// `offer`), each further connection is bound to the session by its token, and on ACCEPT
    /// the source begins with device `i` on channel `i mod n` ([`Source::set_channels`]).
    /// With `offer` 1 (or one device) this is the one-connection session.
    ///
    /// The unit stays one: a failure on any channel rolls every device back, as
    /// [`open`](Self::open) says.
    pub fn open_channels(
        mut source: Source<D>,
        conn: C,
        offer: u16,
        connect: &mut dyn FnMut(u16) -> Result<C>,
    ) -> std::result::Result<Answer<C, D>, Handback<D>> {
        let offer = offer
            .min(MAX_CHANNELS)
            .min(source.header().devices.len() as u16);
        match hello(&mut source, conn, offer, connect) {
            Ok(Some((outs, further, rx, ctl))) => match source.begin() {
                Ok(()) => Ok(Answer::Accepted(Box::new(Self {
                    session: source.header().session_id,
                    ack: source.live().iter().any(|&l| l),
                    reack_policy: PreCopyPolicy::default(),
                    source,
                    outs,
                    further,
                    rx,
                    ctl,
                }))),
                Err(e) => Err(hand_back(source, e)),
            },
            Ok(None) => Ok(Answer::AlreadyCompleted(source.into_devices())),
            // No device moved yet: the error alone says what happened.
            Err(e) => Err(hand_back(source, e.into_core())),
        }
    }

    /// One pre-copy round within `budget` stream bytes ([`Source::round`]), sent to the
    /// destination. Returns what it sent and what the devices still hold.
    pub fn round(&mut self, budget: Option<u64>) -> Result<Round> {
        let sent = self.source.round(&mut Channels(&mut self.outs), budget);
        let sent = sent.and_then(|round| self.flush().map(|()| round));
        sent.map_err(|e| self.failed(e))
    }

    /// Pre-copy rounds until `policy` switches over ([`Source::pre_copy`]), for a caller that
    /// does not pace the rounds itself.
    pub fn pre_copy(
        &mut self,
        policy: &PreCopyPolicy,
        obs: &dyn Observer,
    ) -> Result<Option<SwitchReason>> {
        self.reack_policy = *policy;
        let r = self
            .source
            .pre_copy(&mut Channels(&mut self.outs), policy, obs);
        let r = r.and_then(|reason| self.flush().map(|()| reason));
        r.map_err(|e| self.failed(e))
    }

    /// What the devices hold now ([`Source::estimate`]).
    pub fn estimate(&mut self) -> Result<Estimate> {
        self.source.estimate().map_err(Error::from)
    }

    /// Waits for pre-copy data after an empty round ([`Source::wait_for_data`]).
    pub fn wait_for_data(&mut self, timeout: Duration) -> Result<bool> {
        self.source.wait_for_data(timeout).map_err(Error::from)
    }

    /// The source, for what the session does not cover (its devices' DMA logs, its header,
    /// its reports). Its rounds and switch-over go through the session, which carries them.
    pub fn source(&mut self) -> &mut Source<D> {
        &mut self.source
    }

    /// The switch-over ([`Source::switch_over`]), with the vCPUs stopped: ends pre-copy and
    /// waits for the destination's SWITCHOVER_ACK (it loaded all pre-copy data), then
    /// quiesces and stops the devices and sends the rest of their state and the trailer. The
    /// devices stay in stop-and-copy while the VMM reads its last dirty pages; then
    /// [`commit`](Self::commit).
    pub fn switch_over(&mut self) -> Result<()> {
        self.switch_over_observed(&NoObserver)
    }

    /// [`switch_over`](Self::switch_over), reporting each device's stop-and-copy to `obs`.
    pub fn switch_over_observed(&mut self, obs: &dyn Observer) -> Result<()> {
        let r = self.switched_over(obs);
        r.map_err(|e| self.failed(e))
    }

    fn switched_over(&mut self, obs: &dyn Observer) -> vfio_mig::Result<()> {
        if self.ack {
            self.source.end_pre_copy(&mut Channels(&mut self.outs))?;
            let ack = Message::SwitchoverAck {
                session: self.session,
            }
            .kind();
            let step = "wait for the destination's SWITCHOVER_ACK";
            expect(&mut self.rx, &self.session, ack, step).map_err(Error::into_core)?;
            // A device that re-initialised its pre-copy data after the acknowledgement sends
            // it anew, and the destination acknowledges it again (QEMU 11.1).
            let (source, outs) = (&mut self.source, &mut self.outs);
            reack_passes(&mut self.rx, &self.session, &self.reack_policy, || {
                Ok(source.resend_reinit(&mut Channels(outs), obs)?)
            })
            .map_err(Error::into_core)?;
        }
        self.source
            .switch_over_observed(&mut Channels(&mut self.outs), obs)?;
        // The further channels end after their trailers; the destination reads no further.
        for c in &self.further {
            let _ = c.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// The two-phase end: waits for LOADED (the destination verified the whole stream), sends
    /// COMMIT and waits for RESUMED, after which the devices stop for good and come back in
    /// [`Finished`].
    ///
    /// Before COMMIT went out whole, and on FAILED (the destination's devices were reset
    /// before any ran), every device returns to its start state. PARTLY_RESUMED (a
    /// destination device runs the state, another failed to run) stops them as RESUMED does
    /// and returns [`vfio_mig::Error::PastNoReturn`]; a lost connection or anything else
    /// after COMMIT leaves them stopped and returns [`Error::InDoubt`]: the destination may
    /// run the state, and running it here as well would run it twice. The devices come back
    /// with every error.
    pub fn commit(mut self) -> std::result::Result<Finished<D>, Handback<D>> {
        let session = self.session;
        let loaded = Message::Loaded { session }.kind();
        let step = "wait for the destination's LOADED";
        let committed = expect(&mut self.rx, &session, loaded, step).and_then(|()| {
            let main = &mut self.outs[0];
            main.write_all(&Message::Commit { session }.encode())
                .and_then(|()| main.flush())
                .map_err(|e| Error::transport("send COMMIT", e))
        });
        if let Err(e) = committed {
            // A COMMIT that did not go out whole cannot be decoded: the destination resets.
            let e = self.failed(e).into_core();
            return Err(hand_back(self.source, e));
        }
        if let Err(e) = self.ctl.shutdown(Shutdown::Write) {
            log::debug!("shutdown after COMMIT: {e}");
        }
        let step = "wait for the destination's RESUMED";
        let names: Vec<String> = self
            .source
            .devices()
            .map(|d| d.identity().instance)
            .collect();
        match read_message(&mut self.rx, step) {
            // Out of the downtime window: the destination already runs.
            Ok(Message::Resumed { session: s }) if s == session => Ok(self.source.finish()),
            Ok(Message::Failed(r)) => {
                let e = Error::PeerFailed {
                    step: step.into(),
                    detail: r.text,
                };
                let e = self.source.cancel_with(e.into_core());
                Err(hand_back(self.source, e))
            }
            Ok(Message::PartlyResumed(r)) => {
                // Past the destination's point of no return: a device there runs the state,
                // so the sources stop (or are reset) as after RESUMED, never to run again.
                let finished = self.source.finish();
                let e = past_no_return(&names, &finished.reports, step, &r.text);
                Err(Handback {
                    error: Box::new(e.into_core()),
                    devices: finished.devices,
                })
            }
            other => {
                let what = match other {
                    Ok(m) => format!("the destination sent {m} where RESUMED was expected"),
                    Err(e) => Report(&e).to_string(),
                };
                let finished = self.source.finish();
                Err(Handback {
                    error: Box::new(in_doubt(&names, &session, what).into_core()),
                    devices: finished.devices,
                })
            }
        }
    }

    /// The devices back, the migration ended as [`Source::into_devices`] says (cancelled
    /// before the switch-over; stopped for good after it, the outcome in doubt).
    pub fn into_devices(self) -> Vec<D> {
        self.source.into_devices()
    }

    fn flush(&mut self) -> vfio_mig::Result<()> {
        for out in &mut self.outs {
            out.flush()
                .map_err(|e| CoreError::transport("write the migration stream", e))?;
        }
        Ok(())
    }

    /// After a failure of the source or of the session before COMMIT: the destination's
    /// reason for a broken connection, and every device back in its start state.
    fn failed(&mut self, e: impl Into<Error>) -> Error {
        if !self.further.is_empty() {
            // Ending the channels ends the destination's reads; its reason, if it failed
            // first, comes on the main connection.
            for c in &self.further {
                let _ = c.shutdown(Shutdown::Both);
            }
            wait_for_reason(&self.rx);
        }
        let e = explain_within(e.into().into_core(), &mut self.rx);
        Error::from(self.source.cancel_with(e))
    }
}

/// The stream's writers (the main connection first), the handles of the further channels,
/// the reader of the answers and the handle that half-closes the main connection.
type Opened<C> = (Vec<CoalescingWriter<Watched<C>>>, Vec<C>, C, C);

/// HELLO, the header (offering up to `offer` channels when more than one) and the answer;
/// the further channels bound; `None` on ALREADY_COMPLETED.
fn hello<C: Duplex, D: MigrationDevice>(
    source: &mut Source<D>,
    conn: C,
    offer: u16,
    connect: &mut dyn FnMut(u16) -> Result<C>,
) -> Result<Option<Opened<C>>> {
    let clone = || {
        conn.try_clone()
            .map_err(|e| Error::transport("clone the connection", e))
    };
    let (mut rx, ctl) = (clone()?, clone()?);
    let session = source.header().session_id;
    let ack = source.live().iter().any(|&l| l);
    let mut features = if ack { FEATURE_SWITCHOVER_ACK } else { 0 };
    if offer > 1 {
        features |= FEATURE_CHANNELS;
    }
    let mut tx = CoalescingWriter::with_capacity(SOCKET_BUFFER, Watched(conn));
    let mut opening = Message::Hello { features }.encode();
    if offer > 1 {
        opening.extend_from_slice(&Message::OfferChannels { count: offer }.encode());
    }
    let opened = tx
        .write_all(&opening)
        .map_err(|e| CoreError::transport("handshake: send HELLO", e))
        .and_then(|()| {
            if offer > 1 {
                // The unit's header; each channel's sub-stream starts with its own part.
                let header = source.header().encode()?;
                tx.write_all(&header)
                    .map_err(|e| CoreError::transport("handshake: send the stream header", e))
            } else {
                source.write_header(&mut tx).map(|_| ())
            }
        })
        .and_then(|()| {
            tx.flush()
                .map_err(|e| CoreError::transport("handshake: send the stream header", e))
        });
    let answer = match opened {
        Ok(()) => read_message(&mut rx, "handshake: wait for the destination's answer")?,
        // The destination may have refused (and closed) while we wrote.
        Err(e) if rx.readable_now().unwrap_or(false) => {
            match read_message(&mut rx, "handshake: read the destination's answer") {
                Ok(m @ Message::Refuse(_)) => m,
                _ => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let mut further = Vec::new();
    let answer = match answer {
        Message::Channels {
            session: s,
            count,
            token,
        } if offer > 1 && s == session && (1..=offer).contains(&count) => {
            source.set_channels(usize::from(count))?;
            further = bind_channels(session, count, token, connect)?;
            read_message(&mut rx, "handshake: wait for ACCEPT")?
        }
        other => other,
    };
    match answer {
        Message::Accept { session: s } if s == session => {}
        Message::AlreadyCompleted { session: s } if s == session => {
            log::info!("the destination already completed this session");
            return Ok(None);
        }
        Message::Refuse(r) => {
            return Err(Error::Refused {
                step: "handshake".into(),
                code: r.code,
                detail: r.text,
            })
        }
        other if offer > 1 && further.is_empty() => {
            return Err(unexpected(&other, "CHANNELS", "handshake"))
        }
        other => return Err(unexpected(&other, "ACCEPT", "handshake")),
    }
    if !further.is_empty() {
        log::info!("session bound on {} channels", further.len() + 1);
    }
    let mut outs = vec![tx];
    let mut handles = Vec::with_capacity(further.len());
    for c in further {
        handles.push(
            c.try_clone()
                .map_err(|e| Error::transport("clone a channel", e))?,
        );
        outs.push(CoalescingWriter::with_capacity(SOCKET_BUFFER, Watched(c)));
    }
    Ok(Some((outs, handles, rx, ctl)))
}

/// The devices of `source` with `error`.
fn hand_back<D: MigrationDevice>(source: Source<D>, error: CoreError) -> Handback<D> {
    Handback {
        error: Box::new(error),
        devices: source.into_devices(),
    }
}

/// [`explain`] for a transport error, also where a rollback already wraps it.
fn explain_within<C: Duplex>(e: CoreError, rx: &mut C) -> CoreError {
    match e {
        CoreError::RolledBack {
            source,
            device,
            recovery,
        } => CoreError::RolledBack {
            source: Box::new(explain_within(*source, rx)),
            device,
            recovery,
        },
        CoreError::RolledBackAll { source, outcomes } => CoreError::RolledBackAll {
            source: Box::new(explain_within(*source, rx)),
            outcomes,
        },
        e => explain(Error::Core(e), rx).into_core(),
    }
}
