// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vfio-mig
//!
//! The userspace (VMM) side of Linux VFIO device migration: both kernel protocols (v1, the
//! migration region of Linux 5.8-5.17; v2, `VFIO_DEVICE_FEATURE` and a data fd, Linux 5.18
//! and later) behind one engine.
//!
//! ## The front door
//!
//! What a VMM needs for one migration is at the crate root:
//!
//! - open and probe: [`open_device`] (a sysfs path, through a group or iommufd; see
//!   [`Backend`]), [`device::vfio::VfioDeviceIo::from_fd`] (the device fd the VMM already
//!   holds) or [`OpenedDevice::from_io`]; the [`MigrationDevice`] it holds tells its
//!   [`Capabilities`];
//! - the source: [`Source::start`] (one or several devices as one unit, running or paused;
//!   [`SourceOptions`]), [`Source::round`] for each pre-copy round the VMM paces itself, into
//!   any `Write` and within a byte budget (it returns the [`Estimate`]), then
//!   [`Source::switch_over`] with the vCPUs stopped, and [`Source::finish`] once the
//!   destination runs (or [`Source::cancel`]);
//! - the destination: [`Destination::push`] as bytes arrive, then [`Destination::run`] after
//!   the VMM's own restore steps ([`resume`] does both);
//! - errors: [`Error`], printed with its causes on one line by [`error::Report`]; errors that
//!   end a migration hand the devices back ([`Handback`]).
//!
//! The modules below are the layers those are built of, for VMMs that need more (their own
//! stream transport):
//! - [`device`]: what a VFIO device fd offers, as the [`device::DeviceIo`] trait, implemented
//!   by the real device ([`device::vfio::VfioDeviceIo`]) and by the mock mediated device
//!   (crate `vfio-mig-mock`).
//! - [`v1`] (feature `v1`, on by default), [`v2`]: the two protocols (state rules, field or
//!   feature access, the saving and resuming sequences), both implementing
//!   [`MigrationDevice`].
//! - [`engine`]: protocol-neutral phases (pre-copy, stop-and-copy, resume), policy, rollback,
//!   several devices; [`stream`]: the wire format.
//!
//! Moving a stream between hosts safely is the job of two crates of their own, so that a VMM
//! with its own migration channel builds neither: `vfio-mig-session` (the handshake,
//! transports with TLS as a feature, several channels, keyed stream MACs) and
//! `vfio-mig-fence` (device locks, epochs, shared handoff stores).

pub mod device;
pub mod engine;
pub mod error;
mod front;
mod migration;
mod open;
pub mod stream;
#[cfg(feature = "v1")]
pub mod v1;
pub mod v2;

pub use error::{Error, Result};
pub use front::{
    resume, Destination, DestinationOptions, Epoch, Estimate, Finished, Handback, Round, Source,
    SourceOptions, Status,
};
pub use migration::{Capabilities, MigrationDevice, RunState};
pub use open::{driver_for, open_device, Backend, DeviceAccess, OpenedDevice};
