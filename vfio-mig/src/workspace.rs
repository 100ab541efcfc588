// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The engine functions the workspace's own crates still call directly: the session layer
//! (`vfio-mig-session`: its handshake and channels), the command's benchmarks and the tests.
//! Not part of the API (hidden from the docs): each goes once its callers are on the front
//! door ([`crate::Source`], [`crate::Destination`]).

pub use crate::engine::channels::{
    channel_header, load_channels_gated, pre_copy_channels, stop_copy_channels,
};
pub use crate::engine::demux::load_all_gated;
pub use crate::engine::gate::LoadGate;
pub use crate::engine::load::{load_device, load_with_rollback};
pub use crate::engine::loader::check_compatible;
pub use crate::engine::multi::{
    check_unit, finish_handoff_all, pre_copy_all, rollback_destinations, rollback_sources,
    save_all, stop_copy_all, unit_member, SharedWriter,
};
pub use crate::engine::save::{save_device, save_with_rollback, SaveOptions};
pub use crate::engine::session::new_header;
pub use crate::engine::splice::{can_splice_into, is_pipe, pump_pipe, save_spliced};
