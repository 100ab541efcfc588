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
//! Beneath the front door lie the device access layer, the two protocols (v1, a default
//! feature, and v2), the engine and the stream format; they are private. Three small public
//! modules show what others need of them:
//! - [`backend`]: for whoever implements a device ([`backend::DeviceIo`]: the mock mediated
//!   device of crate `vfio-mig-mock`, vfio-user devices) or emulates a protocol's rules;
//! - [`wire`]: the stream format, for an inspector or a session layer that frames streams;
//!
//! Moving a stream between hosts safely is the job of two crates of their own, so that a VMM
//! with its own migration channel builds neither: `vfio-mig-session` (the handshake,
//! transports with TLS as a feature, several channels, keyed stream MACs) and
//! `vfio-mig-fence` (device locks, epochs, shared handoff stores).

#![warn(unreachable_pub)]

pub mod backend;
pub(crate) mod device;
pub(crate) mod engine;
pub mod error;
mod front;
mod migration;
mod open;
pub(crate) mod stream;
#[cfg(feature = "v1")]
pub(crate) mod v1;
pub(crate) mod v2;
pub mod wire;

#[cfg(feature = "iommufd")]
pub use device::hwpt::{DirtyHwpt, DirtyRange, ReadMode};
pub use device::vfio::VfioDeviceIo;
pub use engine::events::{Event, NoObserver, Observer};
pub use engine::loader::{check_compatible, LoadReport};
pub use engine::multi::check_unit;
pub use engine::policy::{PreCopyPolicy, SwitchReason};
pub use engine::save::{SaveOptions, SaveReport, DEFAULT_BUFFER};
pub use engine::session::new_session_id;
pub use error::{Error, Result};
pub use front::{
    resume, Channels, Destination, DestinationOptions, Epoch, Estimate, Finished, Handback,
    Outputs, Round, Source, SourceOptions, Status, UnitRecords,
};
pub use migration::{
    Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState, StopCopySize,
};
pub use open::{open_device, Backend, DeviceAccess, OpenedDevice};
