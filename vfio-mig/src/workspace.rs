// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine functions the workspace's own crates still call directly: the session layer
//! (`vfio-mig-session`: its admission checks), the command's benchmarks and the save
//! pipeline's test (`tests/tests/pipeline.rs`: the pipeline depth). Not part of the API
//! (hidden from the docs): each goes once its callers are on the front door
//! ([`crate::Source`], [`crate::Destination`]).

pub use crate::engine::load::load_device;
pub use crate::engine::loader::check_compatible;
pub use crate::engine::multi::{finish_handoff_all, save_all, SharedWriter};
pub use crate::engine::save::{available_cores, default_pipeline, save_device, save_with_rollback};
