// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The source side of a session: HELLO and the stream header before the device is touched,
//! the switchover wait, the two-phase end (LOADED, COMMIT, RESUMED) and rollback.

use super::session_source::{Answer, SessionSource};
use crate::error::{Error, Result};
use crate::transport::Duplex;
use vfio_mig::wire::DeviceDescriptor;
use vfio_mig::wire::StreamHeader;
use vfio_mig::MigrationDevice;
use vfio_mig::Observer;
use vfio_mig::SaveOptions;
use vfio_mig::SaveReport;
use vfio_mig::{Epoch, Handback, Source, SourceOptions};

/// How a send ended successfully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The destination runs the state; the source devices are stopped. One report a device.
    Completed(Vec<SaveReport>),
    /// The destination had already completed this session (a retried handoff): it runs the
    /// state. The source device was not touched by this call and must not be resumed.
    AlreadyCompleted,
}

/// Migrates `devs` (stream devices 0.. of `header`, as one unit) to the destination at the
/// other end of `conn`: a [`SessionSource`] whose pre-copy rounds the engine's policy
/// (`opts.policy`) paces. The stream carries `header`'s session id and epoch; its device
/// descriptors are the source's own (live for a device in pre-copy).
///
/// 1. Sends HELLO and the stream header, and waits for the answer **before touching the
///    device**: REFUSE is an [`Error::Refused`], ALREADY_COMPLETED returns
///    [`SendOutcome::AlreadyCompleted`], ACCEPT goes on.
/// 2. With `opts.live`: pre-copy, then waits for SWITCHOVER_ACK (the destination loaded all
///    pre-copy data) before stopping the device; a device that re-initialised its pre-copy
///    data meanwhile (REINIT) sends it first and the destination acknowledges it again
///    (SWITCHOVER_ACK_AGAIN).
/// 3. Stop-and-copy and the trailer; waits for LOADED (the destination verified the whole
///    stream), then sends COMMIT.
/// 4. Waits for RESUMED: success; the device then takes its STOP transition, out of the
///    downtime window.
///
/// Any failure before COMMIT (FAILED, a closed or silent connection, a device error) rolls
/// the device back to RUNNING: the destination cannot resume without COMMIT. FAILED after
/// COMMIT rolls back too: the destination sends it only before its point of no return (no
/// device of the unit ran) and reset its devices. PARTLY_RESUMED (a destination device runs
/// the state, another failed to run) stops the sources as RESUMED does and returns
/// [`vfio_mig::Error::PastNoReturn`]. A lost connection or a timeout
/// after COMMIT leaves the device stopped and returns [`Error::InDoubt`]: the destination may
/// run the state, and resuming here as well would run it twice.
pub fn send<C: Duplex>(
    devs: &mut [&mut dyn MigrationDevice],
    conn: C,
    header: &StreamHeader,
    opts: &SaveOptions,
    obs: &dyn Observer,
) -> Result<SendOutcome> {
    send_channels(devs, conn, header, opts, obs, 1, &mut |_| {
        Err(Error::invalid_input("no further channels here"))
    })
}

/// [`send`] over up to `offer` channels: the main connection `conn` and further connections
/// made by `connect(index)` (to the same destination, over the same transport: the caller
/// verifies TLS identities exactly as for `conn`); the destination chooses how many it takes
/// (1 to `offer`), and device `i` travels on channel `i mod n`
/// ([`SessionSource::open_channels`]). With `offer` 1 (or one device) this is [`send`].
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
    let options = SourceOptions::new(Epoch(header.epoch))
        .session(header.session_id)
        .pre_copy(opts.live)
        .allow_non_p2p_unit(opts.allow_non_p2p_unit)
        .buffer(opts.buffer);
    let lent: Vec<&mut dyn MigrationDevice> = devs.iter_mut().map(|d| &mut **d).collect();
    let source = Source::prepare(lent, &options).map_err(from_handback)?;
    // The descriptors are the source's own; `header` must describe the same devices (its
    // live flags aside: a device that cannot pre-copy, or is paused, goes in stop-and-copy).
    let same = |a: &DeviceDescriptor, b: &DeviceDescriptor| {
        (a.protocol, &a.model, a.migration_flags) == (b.protocol, &b.model, b.migration_flags)
    };
    let described = source.header().devices.len() == header.devices.len()
        && source
            .header()
            .devices
            .iter()
            .zip(&header.devices)
            .all(|(a, b)| same(a, b));
    if !described {
        return Err(Error::invalid_input(
            "send: the stream header must describe each device",
        ));
    }
    let opened = SessionSource::open_channels(source, conn, offer, connect);
    let mut session = match opened.map_err(from_handback)? {
        Answer::Accepted(session) => session,
        Answer::AlreadyCompleted(_) => return Ok(SendOutcome::AlreadyCompleted),
    };
    session.pre_copy(&opts.policy, obs)?;
    session.switch_over_observed(obs)?;
    let mut finished = session.commit().map_err(from_handback)?;
    if opts.live {
        // As QEMU: a device without PRE_COPY went in stop-and-copy only.
        for (report, dev) in finished.reports.iter_mut().zip(&finished.devices) {
            report.stop_copy_only = !dev.capabilities().pre_copy;
        }
    }
    Ok(SendOutcome::Completed(finished.reports))
}

/// The session's error of a front-door error, the devices (lent) back with it.
fn from_handback<D>(h: Handback<D>) -> Error {
    Error::from(*h.error)
}
