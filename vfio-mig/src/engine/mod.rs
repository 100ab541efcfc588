// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The migration engine: phases, pre-copy policy and rollback over any [`MigrationDevice`].
//!
//! The same functions drive v1 and v2 devices, mock or real, beneath the front door
//! ([`crate::Source`], [`crate::Destination`]).

pub(crate) mod events;
pub(crate) mod loader;
pub(crate) mod multi;
pub(crate) mod parallel;
mod pipeline;
pub(crate) mod policy;
pub(crate) mod rollback;
pub(crate) mod run;
pub(crate) mod save;
pub(crate) mod session;
pub(crate) mod wait;

pub(crate) use crate::migration::{MigrationDevice, ReadOutcome, Recovery};
pub(crate) use events::{Event, NoObserver, Observer};

pub(crate) use save::{SaveOptions, SaveReport};
