// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The traits a VMM implements for its migratable components, shaped like Cloud Hypervisor's
//! `vm-migration` (`Pausable`, `Snapshottable`, `Migratable` with dirty-log hooks), so a VFIO
//! device drops into a VMM's existing migration loop next to its other devices.

use std::io::{Read, Write};

use crate::dirty::MemoryRangeTable;
use crate::error::Result;

/// A component that can be stopped and started again.
pub trait Pausable {
    /// Stops the component (a VFIO device: STOP).
    fn pause(&mut self) -> Result<()>;
    /// Starts it again (a VFIO device: RUNNING).
    fn resume(&mut self) -> Result<()>;
}

/// A component whose state can be saved and restored.
pub trait Snapshottable: Pausable {
    /// A stable id, used to pair source and destination components.
    fn id(&self) -> String;
    /// Saves the component's state into `out` (the component ends paused).
    fn snapshot(&mut self, out: &mut dyn Write) -> Result<u64>;
    /// Restores the component's state from `input` (the component ends running).
    fn restore(&mut self, input: &mut dyn Read) -> Result<()>;
}

/// A component that takes part in a live migration.
pub trait Migratable: Send + Snapshottable {
    /// Starts tracking the guest pages the component writes.
    fn start_dirty_log(&mut self) -> Result<()>;
    /// Stops tracking.
    fn stop_dirty_log(&mut self) -> Result<()>;
    /// The guest memory written since the last call (or since the log started).
    fn dirty_log(&mut self) -> Result<MemoryRangeTable>;
    /// Starts migrating: the component begins pre-copy while it keeps running.
    fn start_migration(&mut self) -> Result<()>;
    /// Completes migrating: the component stops and its remaining state is sent.
    fn complete_migration(&mut self) -> Result<()>;
}
