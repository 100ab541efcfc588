// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Hooks a destination's handshake needs inside the load loop ([`super::load_device_gated`]).

use std::io::Read;

use crate::error::Result;

/// Points of a load where the destination talks to its source. An error from a hook fails
/// the load (the caller then resets the device).
pub trait LoadGate {
    /// All pre-copy data of the device was written to it (its END_OF_PHASE(PRE_COPY) was
    /// read): QEMU's switchover-ack point.
    fn pre_copy_loaded(&mut self) -> Result<()>;
    /// After [`pre_copy_loaded`](Self::pre_copy_loaded): a device whose pre-copy the source
    /// reopened (new initial data after a `VFIO_PRECOPY_INFO_REINIT`) loaded it up to its next
    /// END_OF_PHASE(PRE_COPY). Called once per reopened phase.
    fn pre_copy_reloaded(&mut self) -> Result<()>;
    /// The trailer was read and checked: the device holds the complete state in its
    /// resuming state. Called before the end of the stream is checked and before the device
    /// is resumed; `rest` is the transport after the trailer.
    fn before_resume(&mut self, rest: &mut dyn Read) -> Result<()>;
}

/// No hooks: a plain load (from a file).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NoGate;

impl LoadGate for NoGate {
    fn pre_copy_loaded(&mut self) -> Result<()> {
        Ok(())
    }

    fn pre_copy_reloaded(&mut self) -> Result<()> {
        Ok(())
    }

    fn before_resume(&mut self, _rest: &mut dyn Read) -> Result<()> {
        Ok(())
    }
}
