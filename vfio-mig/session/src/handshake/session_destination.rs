// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a session around the front door's [`Destination`], run in the VMM's
//! own steps: accept (the checks and fencing before any device moves), load (SWITCHOVER_ACK,
//! LOADED, COMMIT and the completion record; nothing runs), the VMM's own restore steps
//! (PCI_COMMAND, interrupts), then run (RESUMED, or PARTLY_RESUMED past the point of no
//! return, or FAILED).

use std::io::{BufRead, BufReader};
use std::net::Shutdown;
use std::sync::Mutex;
use std::time::Instant;

use super::destination::{
    admission_checks, finish_session, load_into, refuse, release, Gate, LoadGate, Opening,
    RecvOutcome, DRAIN_TIME,
};
use super::message::{write_message, Message, ReasonCode, FEATURE_SWITCHOVER_ACK, MAX_CHANNELS};
use super::opened::{bind, send_final, ChannelOpening};
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::new_session_id;
use vfio_mig::wire::StreamHeader;
use vfio_mig::LoadReport;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig::{Destination, DestinationOptions, Handback};
use vfio_mig_fence::{Admission, Fence};

/// What the destination answered a session's opening.
#[derive(Debug)]
pub enum Admitted<'f, C: Duplex, D: MigrationDevice> {
    /// ACCEPT: the session goes on ([`SessionDestination::load`]). (Boxed: it holds the
    /// connection's buffers.)
    Accepted(Box<SessionDestination<'f, C, D>>),
    /// ALREADY_COMPLETED: this session's state already runs here; the devices were not
    /// touched.
    AlreadyCompleted {
        /// The stream header the source sent.
        header: StreamHeader,
        /// The devices, untouched.
        devices: Vec<D>,
    },
}

/// A session's destination: the VMM's devices in a front-door [`Destination`], on the
/// connection a source opened ([`super::open_session`]).
///
/// Any failure before the run resets every device, withdraws the completion record, releases
/// the fencing claim and tells the source FAILED (it then runs its devices again); the
/// devices come back with the error ([`into_devices`](Self::into_devices), or the
/// [`Handback`] of [`run`](Self::run)).
pub struct SessionDestination<'f, C: Duplex, D: MigrationDevice> {
    dst: Destination<D>,
    tx: C,
    rx: BufReader<C>,
    /// The further channels' readers, in channel order from channel 1.
    further: Vec<BufReader<C>>,
    /// The source offered channels: every channel, the main connection too, carries a
    /// sub-stream starting with its own header (after the unit's header of the handshake).
    sub_streams: bool,
    /// Handles on every channel (the main connection first), to end their reads at once
    /// when one fails, and the further ones at the end.
    handles: Vec<C>,
    header: StreamHeader,
    fence: &'f mut dyn Fence,
    ack: bool,
    /// The completion record is written (after COMMIT).
    completed: bool,
    /// The session failed: FAILED was sent, the devices are reset.
    failed: bool,
}

impl<C: Duplex, D: MigrationDevice> std::fmt::Debug for SessionDestination<'_, C, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDestination")
            .field("dst", &self.dst)
            .field("header", &self.header)
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

impl<'f, C: Duplex, D: MigrationDevice> SessionDestination<'f, C, D> {
    /// Answers an opened session for `devs`: the checks before any device is touched (one
    /// device in the stream per device given, known features, each device's protocol and
    /// model, the P2P rule of a unit, the fencing state), then ACCEPT, ALREADY_COMPLETED or
    /// REFUSE. A refusal hands the devices back, untouched. A source that offered several
    /// channels is run on one (the main connection: [`accept_channels`] with a bound of 1).
    ///
    /// [`accept_channels`]: Self::accept_channels
    pub fn accept(
        opening: Opening<C>,
        devs: Vec<D>,
        fence: &'f mut dyn Fence,
    ) -> std::result::Result<Admitted<'f, C, D>, Handback<D>> {
        Self::accept_channels(opening, devs, fence, 1, &mut |_| {
            Err(Error::invalid_input("no further channels here"))
        })
    }

    /// [`accept`](Self::accept) for a source that may offer several channels: takes
    /// `min(offered, max, devices)` of them (at least 1, at most [`MAX_CHANNELS`]), answers
    /// CHANNELS with a fresh random token, and binds each further connection `accept`
    /// returns (it is called with the bind deadline and must fail once that passed). A
    /// connection with another session, a wrong token, an index out of range or already
    /// bound is refused, logged and does not count; the session then keeps waiting for its
    /// own. Once every channel is bound: ACCEPT, and device `i` arrives on channel `i mod n`
    /// ([`Destination::set_channels`]).
    pub fn accept_channels(
        opening: Opening<C>,
        mut devs: Vec<D>,
        fence: &'f mut dyn Fence,
        max: u16,
        accept: &mut dyn FnMut(Instant) -> Result<ChannelOpening<C>>,
    ) -> std::result::Result<Admitted<'f, C, D>, Handback<D>> {
        let Opening {
            mut tx,
            reader,
            features,
            offered,
            header,
        } = opening;
        let mut rx = reader.into_inner();
        let refs: Vec<&mut dyn MigrationDevice> = devs
            .iter_mut()
            .map(|d| d as &mut dyn MigrationDevice)
            .collect();
        let checks = admission_checks(&refs, features, &header, fence);
        drop(refs);
        let session = header.session_id;
        match checks {
            Ok(Admission::Accept) => {}
            Ok(Admission::AlreadyCompleted) => {
                let msg = Message::AlreadyCompleted { session };
                send_final(&mut tx, &mut rx, &msg, DRAIN_TIME);
                return Ok(Admitted::AlreadyCompleted {
                    header,
                    devices: devs,
                });
            }
            Err((code, detail)) => {
                let e = refuse(&mut tx, &mut rx, code, detail);
                return Err(handback(e, devs));
            }
        }
        // The unit's P2P rule was checked against the source's devices (admission_checks).
        let opts = DestinationOptions::new().allow_non_p2p_unit(true);
        let mut dst = match Destination::new(devs, &opts) {
            Ok(dst) => dst,
            Err(h) => {
                release(fence, &session);
                return Err(h);
            }
        };
        let mut further = Vec::new();
        if let Some(offered) = offered {
            let count = offered
                .min(max)
                .min(MAX_CHANNELS)
                .min(header.devices.len() as u16)
                .max(1);
            let bound = channels(&mut tx, &mut rx, &header, count, accept);
            let bound = bound.and_then(|b| {
                dst.set_channels(usize::from(count))?;
                dst.expect_header(header.clone())?;
                Ok(b)
            });
            match bound {
                Ok(b) => {
                    // One floor for the session (if the main connection has one): a channel
                    // that waits while another delivers is not slow.
                    for (c, _) in &b {
                        c.share_progress_floor(&tx);
                    }
                    further = b;
                }
                Err(e) => {
                    release(fence, &session);
                    return Err(handback(e.into(), dst.into_devices()));
                }
            }
        }
        if let Err(e) = write_message(&mut tx, &Message::Accept { session }, "handshake") {
            release(fence, &session);
            return Err(handback(e.into(), dst.into_devices()));
        }
        if !further.is_empty() {
            log::info!("session bound on {} channels", further.len() + 1);
        }
        let mut handles = Vec::with_capacity(further.len() + 1);
        for c in std::iter::once(rx.get_ref()).chain(further.iter().map(|(tx, _)| tx)) {
            match c.try_clone() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    release(fence, &session);
                    let e = Error::transport("clone a channel", e);
                    return Err(handback(e, dst.into_devices()));
                }
            }
        }
        Ok(Admitted::Accepted(Box::new(Self {
            dst,
            tx,
            rx,
            further: further.into_iter().map(|(_, rx)| rx).collect(),
            sub_streams: offered.is_some(),
            handles,
            header,
            fence,
            ack: features & FEATURE_SWITCHOVER_ACK != 0,
            completed: false,
            failed: false,
        })))
    }

    /// The stream header the source sent.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Loads the stream as it arrives, each device's progress to `obs`: SWITCHOVER_ACK once
    /// the pre-copy data is loaded, LOADED once the trailer verified and every device took
    /// its state, then the source's COMMIT and the completion record (a retry is answered
    /// ALREADY_COMPLETED from here on). No device runs: the VMM does its own restore steps,
    /// then [`run`](Self::run). Returns what each device loaded.
    pub fn load(&mut self, obs: &dyn Observer) -> Result<Vec<LoadReport>> {
        if self.failed || self.completed {
            return Err(Error::invalid_input(
                "load: the session is not waiting for its stream",
            ));
        }
        let mut gate = Gate {
            tx: &mut self.tx,
            session: self.header.session_id,
            ack: self.ack,
            fence: &mut *self.fence,
            completed: false,
        };
        let loaded = if !self.sub_streams {
            let buffered = self.rx.buffer().to_vec();
            self.rx.consume(buffered.len());
            self.header.encode().and_then(|header| {
                load_into(
                    &mut self.dst,
                    &header,
                    &buffered,
                    &mut self.rx,
                    &mut gate,
                    obs,
                )
            })
        } else {
            load_channels(
                &mut self.dst,
                &mut self.rx,
                &mut self.further,
                &self.handles,
                &mut gate,
                obs,
            )
        };
        self.completed = gate.completed;
        loaded.map_err(|e| self.fail(e))
    }

    /// Runs the loaded devices (every one to RUNNING_P2P, then RUNNING in turn) and tells
    /// the source: RESUMED; PARTLY_RESUMED when a device failed after another ran (the
    /// completion record stays, the error is [`vfio_mig::Error::PastNoReturn`]); FAILED when
    /// none ran (every device reset). The devices come back in every case.
    pub fn run(mut self) -> std::result::Result<(Vec<D>, RecvOutcome), Handback<D>> {
        let reports = self.dst.reports();
        if self.failed || !self.completed {
            let e = Error::invalid_input("run: the session's state is not loaded and committed");
            let e = if self.failed {
                e
            } else {
                self.fail(e.into_core())
            };
            return Err(handback(e, self.dst.into_devices()));
        }
        let (devices, ran) = match self.dst.run() {
            Ok(devices) => (devices, Ok(reports)),
            Err(h) => {
                let (e, devices) = h.into_parts();
                (devices, Err(e))
            }
        };
        let header = self.header.clone();
        let outcome = finish_session(
            header,
            ran,
            self.completed,
            &mut *self.fence,
            &mut self.tx,
            &mut self.rx,
        );
        end_channels(&self.handles);
        match outcome {
            Ok(outcome) => Ok((devices, outcome)),
            Err(e) => Err(handback(e, devices)),
        }
    }

    /// The devices back: a session that has not run ends as failed (every device reset,
    /// the completion record withdrawn, FAILED sent).
    pub fn into_devices(mut self) -> Vec<D> {
        if !self.failed {
            let e = vfio_mig::Error::InvalidInput("the destination was abandoned".into());
            self.fail(e);
        }
        self.dst.into_devices()
    }

    /// Ends the session after `e`: every device reset, the record withdrawn, the claim
    /// released, FAILED sent. Returns the error, saying what became of each device.
    fn fail(&mut self, e: vfio_mig::Error) -> Error {
        self.failed = true;
        let e = self.dst.cancel_with(e);
        let header = self.header.clone();
        let e = match finish_session(
            header,
            Err(e),
            self.completed,
            &mut *self.fence,
            &mut self.tx,
            &mut self.rx,
        ) {
            Err(e) => e,
            Ok(_) => Error::invalid_input("the session failed"),
        };
        end_channels(&self.handles);
        e
    }
}

/// Ends the further channels of `handles` (the main connection, first, ends with the
/// session's last message).
fn end_channels<C: Duplex>(handles: &[C]) {
    for h in handles.iter().skip(1) {
        let _ = h.shutdown(Shutdown::Both);
    }
}

/// CHANNELS with a fresh token, then the further channels bound (each `(tx, rx)`); a failure
/// is refused on the main connection (no device was touched).
#[allow(clippy::type_complexity)]
fn channels<C: Duplex>(
    tx: &mut C,
    rx: &mut BufReader<C>,
    header: &StreamHeader,
    count: u16,
    accept: &mut dyn FnMut(Instant) -> Result<ChannelOpening<C>>,
) -> vfio_mig::Result<Vec<(C, BufReader<C>)>> {
    let session = header.session_id;
    let token = match new_session_id() {
        Ok(t) => t,
        Err(e) => {
            let detail = vfio_mig::error::Report(&e).to_string();
            return Err(refuse(tx, rx, ReasonCode::Device, detail).into_core());
        }
    };
    let answer = Message::Channels {
        session,
        count,
        token,
    };
    write_message(tx, &answer, "handshake")?;
    bind(session, &token, count, accept)
        .map_err(|detail| refuse(tx, rx, ReasonCode::Protocol, detail).into_core())
}

/// Loads the stream over every channel at once (channel 0 the main connection `main`, then
/// `further`): [`Destination::read_channels`], SWITCHOVER_ACK once the pre-copy data is in,
/// then LOADED, COMMIT (read on the main connection) and the completion record. A failing
/// channel ends every channel's reads (`handles`).
fn load_channels<C: Duplex, D: MigrationDevice>(
    dst: &mut Destination<D>,
    main: &mut BufReader<C>,
    further: &mut [BufReader<C>],
    handles: &[C],
    gate: &mut dyn LoadGate,
    obs: &dyn Observer,
) -> vfio_mig::Result<Vec<LoadReport>> {
    let clones = handles.iter().map(|h| {
        h.try_clone()
            .map_err(|e| vfio_mig::Error::transport("clone a channel", e))
    });
    let clones = clones.collect::<vfio_mig::Result<Vec<C>>>();
    let handles = Mutex::new(clones.map_err(|e| dst.cancel_with(e))?);
    let stop = || {
        for h in handles.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = h.shutdown(Shutdown::Read);
        }
    };
    let mut inputs: Vec<&mut BufReader<C>> =
        std::iter::once(main).chain(further.iter_mut()).collect();
    let mut acked = false;
    dst.read_channels(&mut inputs, &stop, obs, &mut |dst| {
        if !acked && dst.pre_copy_loaded() {
            acked = true;
            gate.pre_copy_loaded()?;
        }
        for _ in 0..dst.take_pre_copy_reloaded() {
            gate.pre_copy_reloaded()?;
        }
        Ok(())
    })?;
    gate.before_resume(&mut *inputs[0])
        .map_err(|e| dst.cancel_with(e))?;
    Ok(dst.reports())
}

/// Runs a session whose source offered several channels (one that offered none is run as by
/// [`receive_opened`](super::receive_opened)): [`SessionDestination::accept_channels`] (up to
/// `max` channels), the load over all channels at once, and the same end as
/// [`receive_opened`](super::receive_opened).
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
    let lent: Vec<&mut dyn MigrationDevice> = devs.iter_mut().map(|d| &mut **d).collect();
    let admitted = SessionDestination::accept_channels(opening, lent, fence, max, accept);
    let mut session = match admitted {
        Ok(Admitted::Accepted(session)) => session,
        Ok(Admitted::AlreadyCompleted { header, .. }) => {
            return Ok(RecvOutcome::AlreadyCompleted { header })
        }
        Err(h) => return Err(Error::from(*h.error)),
    };
    session.load(obs)?;
    session
        .run()
        .map(|(_, outcome)| outcome)
        .map_err(|h| Error::from(*h.error))
}

fn handback<D>(e: Error, devices: Vec<D>) -> Handback<D> {
    Handback {
        error: Box::new(e.into_core()),
        devices,
    }
}
