// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The migration engine: phases, pre-copy policy and rollback over any [`MigrationDevice`].
//!
//! The same functions drive v1 and v2 devices, mock or real: [`save_with_rollback`] on the
//! source, [`load_with_rollback`] on the destination, `vfio_mig_session::handshake::migrate_local` for both on one host.

pub mod channels;
pub mod demux;
pub mod events;
pub mod gate;
pub mod load;
pub(crate) mod loader;
pub mod multi;
pub mod parallel;
mod pipeline;
pub mod policy;
pub(crate) mod rollback;
pub mod run;
pub mod save;
pub mod session;
pub(crate) mod wait;

pub use crate::migration::{
    Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState, StopCopySize,
};
pub use events::{Event, NoObserver, Observer};
pub use gate::{LoadGate, NoGate};
pub use load::{load_device, load_device_gated, load_with_rollback, rollback_destination};
pub use loader::{check_compatible, LoadReport};
pub use policy::{Decision, PreCopyPolicy, PreCopyState, SwitchReason};
pub use save::{
    available_cores, default_pipeline, pipeline_for_cores, pre_copy, save_device,
    save_with_rollback, stop_copy, SaveOptions, SaveReport, DEFAULT_BUFFER,
};
