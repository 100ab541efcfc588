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
pub mod splice;
pub(crate) mod wait;

pub use crate::migration::{Capabilities, MigrationDevice, Protocol, ReadOutcome, Recovery};
pub use events::{Event, NoObserver, Observer};
pub use gate::LoadGate;
pub use load::{load_device, load_with_rollback};
pub use loader::{check_compatible, LoadReport};
pub use policy::{Decision, PreCopyPolicy, PreCopyState, SwitchReason};
pub use save::{save_device, save_with_rollback, SaveOptions, SaveReport, DEFAULT_BUFFER};
