// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The protocol-neutral migration interface: what the engine drives and both protocol
//! drivers ([`crate::v1`], [`crate::v2`]) implement.
//!
//! A v1 device (migration region) and a v2 device (device feature + data fd) both implement
//! [`MigrationDevice`]; the engine's phases map onto each protocol's states:
//!
//! | engine phase      | v1 `device_state`          | v2 state                      |
//! |-------------------|----------------------------|-------------------------------|
//! | pre-copy          | RUNNING \| SAVING (011b)   | PRE_COPY                      |
//! | stop-and-copy     | SAVING (010b)              | STOP_COPY                     |
//! | saved             | STOP (000b)                | STOP                          |
//! | resuming          | RESUMING (100b)            | RESUMING                      |
//! | resumed           | RUNNING (001b)             | STOP, then RUNNING            |

use std::fmt;
use std::os::fd::BorrowedFd;

use crate::device::DeviceIdentity;
pub use crate::error::Recovery;
use crate::error::Result;

/// The kernel migration protocol a device speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub enum Protocol {
    /// The v1 migration region (Linux 5.8 to 5.17 uAPI).
    V1,
    /// The v2 device feature with a data fd (Linux 5.18 and later).
    V2,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::V1 => write!(f, "v1 (migration region)"),
            Protocol::V2 => write!(f, "v2 (device feature)"),
        }
    }
}

/// What a device's migration support offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Capabilities {
    /// Pre-copy while running is supported.
    pub pre_copy: bool,
    /// The P2P quiescent states are supported (v2 only).
    pub p2p: bool,
    /// The raw v2 `VFIO_MIGRATION_*` flags; 0 for v1.
    pub migration_flags: u64,
}

impl Capabilities {
    /// Whether a device with these capabilities, speaking `protocol`, can join a unit of
    /// several devices without an opt-in: it has the P2P states, so it can be quiesced before
    /// any peer stops ([`crate::check_unit`]). `Err` says why not.
    pub fn unit_member(&self, protocol: Protocol) -> std::result::Result<(), String> {
        match protocol {
            _ if self.p2p => Ok(()),
            Protocol::V1 => Err("a v1 device has no P2P states".into()),
            Protocol::V2 => Err(format!(
                "migration flags {:#x} lack VFIO_MIGRATION_P2P",
                self.migration_flags
            )),
        }
    }
}

/// How much data the device says it still holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Pending {
    /// Bytes still to transfer (v1 `pending_bytes`; v2 initial + dirty bytes).
    pub bytes: u64,
    /// Of those, the initial pre-copy bytes, when the device tells them apart (v2).
    pub initial_bytes: Option<u64>,
    /// What stop-and-copy will carry apart from `bytes` (v2 in pre-copy:
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`, which the uAPI says need not relate to the
    /// pre-copy bytes). The downtime bytes are the sum of the two, as QEMU's
    /// `vfio_state_pending_exact` counts them.
    pub stop_copy_bytes: StopCopySize,
    /// The device re-initialised its pre-copy data since it was last asked (v2
    /// `VFIO_PRECOPY_INFO_REINIT`, after the PRECOPY_INFOv2 opt-in): `initial_bytes` are new
    /// initial data, to be sent before the switch-over even if earlier initial data was.
    pub reinit: bool,
}

/// What a device says stop-and-copy will carry apart from its pending bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum StopCopySize {
    /// Nothing apart: the pending bytes are all there is (v1 `pending_bytes`, v2 outside
    /// pre-copy).
    #[default]
    InPending,
    /// This many bytes (v2 `MIG_DATA_SIZE`).
    Bytes(u64),
    /// The device could not tell (`MIG_DATA_SIZE` failed): the downtime cannot be estimated,
    /// and a downtime budget is never taken as met (QEMU assumes 100 GiB then, "so downtime
    /// limit won't be violated").
    Unknown,
}

/// Whether a device runs or is stopped outside a migration: the state a failed migration
/// returns it to (a paused VM's device stays stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum RunState {
    /// RUNNING (or RUNNING_P2P: quiesced, but not stopped).
    Running,
    /// STOP: the VM is paused.
    Stopped,
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Running => write!(f, "RUNNING"),
            RunState::Stopped => write!(f, "STOP"),
        }
    }
}

/// What one [`MigrationDevice::read`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadOutcome {
    /// `len` bytes were read; `chunk_end` when they close a device transaction.
    Data {
        /// Bytes placed at the start of the buffer.
        len: usize,
        /// The device's transaction ends with these bytes.
        chunk_end: bool,
    },
    /// The device has no more data in this phase for now (pre-copy) or at all (stop-copy).
    PhaseEnd,
}

/// A device the engine can migrate, whatever its kernel protocol.
///
/// Source side: [`start_pre_copy`](Self::start_pre_copy) (optional), then
/// [`start_stop_copy`](Self::start_stop_copy), [`read`](Self::read) until
/// [`ReadOutcome::PhaseEnd`], then [`finish_save`](Self::finish_save). Destination side:
/// [`start_resume`](Self::start_resume), [`write`](Self::write) each chunk in order, then
/// [`finish_resume`](Self::finish_resume). On failure, [`recover`](Self::recover) returns a
/// source to the [`RunState`] it had when its saving session began (RUNNING, or STOP for a
/// paused VM) and [`abort_resume`](Self::abort_resume) resets a destination.
pub trait MigrationDevice: Send {
    /// Who the device is (for logs and the stream header).
    fn identity(&self) -> DeviceIdentity;
    /// Its kernel protocol.
    fn protocol(&self) -> Protocol;
    /// Its migration capabilities.
    fn capabilities(&self) -> Capabilities;
    /// The current state, as text, for reports.
    fn state_name(&mut self) -> Result<String>;
    /// Protocol-specific facts for `probe`, as (name, value) pairs.
    fn details(&mut self) -> Result<Vec<(String, String)>>;

    /// Whether the device runs or is stopped; an error when it is inside a migration (a
    /// saving or resuming state, or ERROR): what a migration records at its start and
    /// returns the device to on failure.
    fn run_state(&mut self) -> Result<RunState>;

    /// Quiesces the device before other devices of the same VM stop: it stops initiating DMA
    /// and peer-to-peer traffic but still answers accesses (v2 RUNNING_P2P, or PRE_COPY_P2P
    /// during pre-copy). A no-op where the protocol has no such state (v1, v2 without P2P).
    fn quiesce(&mut self) -> Result<()>;
    /// Stops the device outside of a migration (a VMM's pause).
    fn stop(&mut self) -> Result<()>;
    /// Runs the device again (a VMM's resume after a pause).
    fn run(&mut self) -> Result<()>;

    /// Enters pre-copy (the device keeps running and starts saving).
    fn start_pre_copy(&mut self) -> Result<()>;
    /// Enters stop-and-copy (the device stops; the rest of its state is saved).
    fn start_stop_copy(&mut self) -> Result<()>;
    /// How much the device still has to send. Between chunks only (v1 reads pending_bytes).
    fn pending(&mut self) -> Result<Pending>;
    /// Reads the next bytes of the current phase into `buf`.
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome>;
    /// Ends a completed save: the device is stopped. On failure the device is returned to
    /// RUNNING like any failed save (nobody runs its state yet); after a handoff use
    /// [`finish_handoff`](Self::finish_handoff) instead.
    fn finish_save(&mut self) -> Result<()>;
    /// Stops a source whose state the destination already runs (after RESUMED). On failure
    /// the device is reset, never returned to RUNNING: running the migrated state here too
    /// would run it twice (QEMU's `vfio_migration_set_state_or_reset`, which recovers a failed
    /// STOP_COPY -> STOP to ERROR, i.e. a reset). The error then says what became of it.
    fn finish_handoff(&mut self) -> Result<()>;

    /// Enters the resuming state.
    fn start_resume(&mut self) -> Result<()>;
    /// Writes bytes of the current chunk; `chunk_end` closes the chunk (v1 commits it with
    /// the chunk's total size, reproducing the source's transaction).
    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()>;
    /// Has the driver check and take the complete resumed state, the device staying stopped:
    /// v2 RESUMING -> STOP, where real drivers refuse bad data. A no-op for v1, whose only way
    /// out of RESUMING (100b) is RUNNING. On failure a v2 device is reset.
    fn load_state(&mut self) -> Result<()>;
    /// Brings a loaded device to its quiescent running state (v2 RUNNING_P2P, QEMU's prepare
    /// step) so that, once every device of the unit is there, none runs before its peers can
    /// answer peer-to-peer accesses. A no-op without P2P (v1, v2 without
    /// `VFIO_MIGRATION_P2P`).
    fn prepare_run(&mut self) -> Result<()>;
    /// Ends a complete resume: the device runs with the loaded state (from RESUMING, STOP or
    /// RUNNING_P2P; the destination barrier calls [`load_state`](Self::load_state) and
    /// [`prepare_run`](Self::prepare_run) on every device first).
    fn finish_resume(&mut self) -> Result<()>;

    /// Returns a source to the state it had when its saving session began (RUNNING, or STOP
    /// when [`start_stop_copy`](Self::start_stop_copy) began from STOP) after a failure: the
    /// recovery transition first, a reset if that fails (then stopped again if it began
    /// stopped).
    fn recover(&mut self) -> Recovery;
    /// Abandons a resume: resets the device so it never runs with partial state.
    fn abort_resume(&mut self) -> Recovery;

    /// The descriptor the current phase's data can be read from directly, when the protocol
    /// has one (v2's data fd, while a session is open): what lets the engine poll it.
    /// `None` by default (v1 moves data through region accesses).
    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Whether the device is still in the saving session it was put in (v2: PRE_COPY,
    /// PRE_COPY_P2P or STOP_COPY with its data fd; v1: a SAVING state). A device that ran
    /// again meanwhile (a VMM resumed its VM during pre-copy) ended that session: what was
    /// sent of it belongs to no session the device can continue. `true` by default; a wrapper
    /// must forward it.
    fn is_saving(&mut self) -> Result<bool> {
        Ok(true)
    }

    /// The device's own estimate of what stop-and-copy will send, when it has one (v2
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`); `None` by default (v1 tells nothing before).
    fn stop_copy_estimate(&mut self) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Forwards every [`MigrationDevice`] method to `**self`, for the pointer types below.
macro_rules! forward_migration_device {
    () => {
        fn identity(&self) -> DeviceIdentity {
            (**self).identity()
        }
        fn protocol(&self) -> Protocol {
            (**self).protocol()
        }
        fn capabilities(&self) -> Capabilities {
            (**self).capabilities()
        }
        fn state_name(&mut self) -> Result<String> {
            (**self).state_name()
        }
        fn details(&mut self) -> Result<Vec<(String, String)>> {
            (**self).details()
        }
        fn run_state(&mut self) -> Result<RunState> {
            (**self).run_state()
        }
        fn quiesce(&mut self) -> Result<()> {
            (**self).quiesce()
        }
        fn stop(&mut self) -> Result<()> {
            (**self).stop()
        }
        fn run(&mut self) -> Result<()> {
            (**self).run()
        }
        fn start_pre_copy(&mut self) -> Result<()> {
            (**self).start_pre_copy()
        }
        fn start_stop_copy(&mut self) -> Result<()> {
            (**self).start_stop_copy()
        }
        fn pending(&mut self) -> Result<Pending> {
            (**self).pending()
        }
        fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
            (**self).read(buf)
        }
        fn finish_save(&mut self) -> Result<()> {
            (**self).finish_save()
        }
        fn finish_handoff(&mut self) -> Result<()> {
            (**self).finish_handoff()
        }
        fn start_resume(&mut self) -> Result<()> {
            (**self).start_resume()
        }
        fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
            (**self).write(data, chunk_end)
        }
        fn load_state(&mut self) -> Result<()> {
            (**self).load_state()
        }
        fn prepare_run(&mut self) -> Result<()> {
            (**self).prepare_run()
        }
        fn finish_resume(&mut self) -> Result<()> {
            (**self).finish_resume()
        }
        fn recover(&mut self) -> Recovery {
            (**self).recover()
        }
        fn abort_resume(&mut self) -> Recovery {
            (**self).abort_resume()
        }
        fn data_fd(&self) -> Option<BorrowedFd<'_>> {
            (**self).data_fd()
        }
        fn is_saving(&mut self) -> Result<bool> {
            (**self).is_saving()
        }
        fn stop_copy_estimate(&mut self) -> Result<Option<u64>> {
            (**self).stop_copy_estimate()
        }
    };
}

/// An owned device behind a pointer (`Box<dyn MigrationDevice>`, `Box<V2Device>`) is a device:
/// what a front door that owns its devices holds.
impl<T: MigrationDevice + ?Sized> MigrationDevice for Box<T> {
    forward_migration_device!();
}

/// A borrowed device is a device: a VMM that keeps its device (in a struct of its own, or
/// behind a lock it holds for the migration) lends it for one migration.
impl<T: MigrationDevice + ?Sized> MigrationDevice for &mut T {
    forward_migration_device!();
}
