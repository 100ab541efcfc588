// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a session around the front door's [`Destination`], run in the VMM's
//! own steps: accept (the checks and fencing before any device moves), load (SWITCHOVER_ACK,
//! LOADED, COMMIT and the completion record; nothing runs), the VMM's own restore steps
//! (PCI_COMMAND, interrupts), then run (RESUMED, or PARTLY_RESUMED past the point of no
//! return, or FAILED).

use std::io::{BufRead, BufReader};

use super::destination::{
    admission_checks, finish_session, load_into, refuse, release, Gate, Opening, RecvOutcome,
    DRAIN_TIME,
};
use super::message::{write_message, Message, FEATURE_SWITCHOVER_ACK};
use super::opened::send_final;
use crate::error::{Error, Result};
use crate::transport::Duplex;
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
    /// REFUSE. A refusal hands the devices back, untouched.
    pub fn accept(
        opening: Opening<C>,
        mut devs: Vec<D>,
        fence: &'f mut dyn Fence,
    ) -> std::result::Result<Admitted<'f, C, D>, Handback<D>> {
        let Opening {
            mut tx,
            reader,
            features,
            header,
            ..
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
        let dst = match Destination::new(devs, &opts) {
            Ok(dst) => dst,
            Err(h) => {
                release(fence, &session);
                return Err(h);
            }
        };
        if let Err(e) = write_message(&mut tx, &Message::Accept { session }, "handshake") {
            release(fence, &session);
            return Err(handback(e.into(), dst.into_devices()));
        }
        Ok(Admitted::Accepted(Box::new(Self {
            dst,
            tx,
            rx,
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
        let buffered = self.rx.buffer().to_vec();
        self.rx.consume(buffered.len());
        let mut gate = Gate {
            tx: &mut self.tx,
            session: self.header.session_id,
            ack: self.ack,
            fence: &mut *self.fence,
            completed: false,
        };
        let loaded = load_into(
            &mut self.dst,
            &self.header,
            &buffered,
            &mut self.rx,
            &mut gate,
            obs,
        );
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
        match finish_session(
            header,
            Err(e),
            self.completed,
            &mut *self.fence,
            &mut self.tx,
            &mut self.rx,
        ) {
            Err(e) => e,
            Ok(_) => Error::invalid_input("the session failed"),
        }
    }
}

/// Runs an opened session that offered no channels (see [`super::receive_opened`]): a
/// [`SessionDestination`] that loads and runs at once.
pub(super) fn receive_one<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    opening: Opening<C>,
    fence: &mut dyn Fence,
    obs: &dyn Observer,
) -> Result<RecvOutcome> {
    let lent: Vec<&mut dyn MigrationDevice> = devs.iter_mut().map(|d| &mut **d).collect();
    let mut session = match SessionDestination::accept(opening, lent, fence) {
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
