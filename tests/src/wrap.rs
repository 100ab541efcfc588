// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One wrapper for every test that watches or bends a device's calls: [`Wrapped`] forwards
//! each [`MigrationDevice`] method to the device it wraps and lets its [`Hooks`] see the calls
//! (before and after) and replace the data read, so a test writes only what it adds.

use std::os::fd::BorrowedFd;

use vfio_mig::backend::DeviceIdentity;
use vfio_mig::Result;
use vfio_mig::{Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState};

/// A call of [`MigrationDevice`] that takes `&mut self`, as [`Hooks`] see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `state_name`.
    StateName,
    /// `details`.
    Details,
    /// `run_state`.
    RunState,
    /// `pending`.
    Pending,
    /// `stop_copy_estimate`.
    StopCopyEstimate,
    /// `is_saving`.
    IsSaving,
    /// `quiesce`.
    Quiesce,
    /// `stop`.
    Stop,
    /// `run`.
    Run,
    /// `start_pre_copy`.
    StartPreCopy,
    /// `start_stop_copy`.
    StartStopCopy,
    /// `read`.
    Read,
    /// `finish_save`.
    FinishSave,
    /// `finish_handoff`.
    FinishHandoff,
    /// `start_resume`.
    StartResume,
    /// `write`.
    Write,
    /// `load_state`.
    LoadState,
    /// `prepare_run`.
    PrepareRun,
    /// `finish_resume`.
    FinishResume,
    /// `recover`.
    Recover,
    /// `abort_resume`.
    AbortResume,
}

impl Call {
    /// Whether the call may change the device's migration state (the queries may not; a data
    /// read or write may, when a fault drops the device into ERROR).
    pub fn may_change_state(self) -> bool {
        !matches!(
            self,
            Call::StateName
                | Call::Details
                | Call::RunState
                | Call::Pending
                | Call::StopCopyEstimate
                | Call::IsSaving
        )
    }
}

/// What a test adds to a device's calls; every method does nothing by default.
pub trait Hooks: Send {
    /// Before `call` reaches `dev`.
    fn before(&mut self, _dev: &mut dyn MigrationDevice, _call: Call) {}
    /// After `call` returned from `dev`; `ok` is false when it failed (a recovery counts as
    /// returned).
    fn after(&mut self, _dev: &mut dyn MigrationDevice, _call: Call, _ok: bool) {}
    /// The read itself (between `before` and `after`): `dev.read(buf)` unless a test reads
    /// otherwise.
    fn read(&mut self, dev: &mut dyn MigrationDevice, buf: &mut [u8]) -> Result<ReadOutcome> {
        dev.read(buf)
    }
}

/// A device whose calls its [`Hooks`] see.
pub struct Wrapped<H> {
    /// The wrapped device.
    pub inner: Box<dyn MigrationDevice>,
    /// What the test adds.
    pub hooks: H,
}

impl<H> Wrapped<H> {
    /// Wraps `inner`.
    pub fn new(inner: Box<dyn MigrationDevice>, hooks: H) -> Self {
        Self { inner, hooks }
    }
}

impl<H> std::fmt::Debug for Wrapped<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wrapped")
            .field("inner", &self.inner.identity().instance)
            .finish_non_exhaustive()
    }
}

impl<H: Hooks> Wrapped<H> {
    /// `call` through the hooks: `before`, the call, `after` (told whether it succeeded).
    fn hooked<T>(
        &mut self,
        call: Call,
        ok: fn(&T) -> bool,
        f: impl FnOnce(&mut H, &mut dyn MigrationDevice) -> T,
    ) -> T {
        self.hooks.before(self.inner.as_mut(), call);
        let r = f(&mut self.hooks, self.inner.as_mut());
        self.hooks.after(self.inner.as_mut(), call, ok(&r));
        r
    }
}

/// Forwards `&mut self` methods through [`Wrapped::hooked`].
macro_rules! hooked {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $call:ident, $ok:expr;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> $ret {
            self.hooked(Call::$call, $ok, |_, d| d.$name($($arg),*))
        })*
    };
}

fn is_ok<T>(r: &Result<T>) -> bool {
    r.is_ok()
}

fn returned(_: &Recovery) -> bool {
    true
}

impl<H: Hooks> MigrationDevice for Wrapped<H> {
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn protocol(&self) -> Protocol {
        self.inner.protocol()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.data_fd()
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        self.hooked(Call::Read, is_ok, |h, d| h.read(d, buf))
    }
    hooked! {
        state_name() -> Result<String> = StateName, is_ok;
        details() -> Result<Vec<(String, String)>> = Details, is_ok;
        run_state() -> Result<RunState> = RunState, is_ok;
        pending() -> Result<Pending> = Pending, is_ok;
        stop_copy_estimate() -> Result<Option<u64>> = StopCopyEstimate, is_ok;
        is_saving() -> Result<bool> = IsSaving, is_ok;
        quiesce() -> Result<()> = Quiesce, is_ok;
        stop() -> Result<()> = Stop, is_ok;
        run() -> Result<()> = Run, is_ok;
        start_pre_copy() -> Result<()> = StartPreCopy, is_ok;
        start_stop_copy() -> Result<()> = StartStopCopy, is_ok;
        finish_save() -> Result<()> = FinishSave, is_ok;
        finish_handoff() -> Result<()> = FinishHandoff, is_ok;
        start_resume() -> Result<()> = StartResume, is_ok;
        write(data: &[u8], chunk_end: bool) -> Result<()> = Write, is_ok;
        load_state() -> Result<()> = LoadState, is_ok;
        prepare_run() -> Result<()> = PrepareRun, is_ok;
        finish_resume() -> Result<()> = FinishResume, is_ok;
        recover() -> Recovery = Recover, returned;
        abort_resume() -> Recovery = AbortResume, returned;
    }
}
