// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One wrapper for every test that watches or bends a device's calls: [`Wrapped`] forwards
//! each [`MigrationDevice`] method to the device it wraps and lets its [`Hooks`] see the calls
//! (before and after; a hook may fail a call before it reaches the device) and bend what the
//! data path answers (`pending`, `read`), so a test writes only what it adds.

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
    /// Before `call` reaches `dev`; an error fails the call there, without reaching the
    /// device (except a recovery, `recover` or `abort_resume`, which always runs: the error is
    /// then only logged).
    fn before(&mut self, _dev: &mut dyn MigrationDevice, _call: Call) -> Result<()> {
        Ok(())
    }
    /// After `call` returned from `dev`; `ok` is false when it failed (a recovery counts as
    /// returned).
    fn after(&mut self, _dev: &mut dyn MigrationDevice, _call: Call, _ok: bool) {}
    /// The read itself (between `before` and `after`): `dev.read(buf)` unless a test reads
    /// otherwise.
    fn read(&mut self, dev: &mut dyn MigrationDevice, buf: &mut [u8]) -> Result<ReadOutcome> {
        dev.read(buf)
    }
    /// The pending bytes the device reports (between `before` and `after`): `dev.pending()`
    /// unless a test reports otherwise.
    fn pending(&mut self, dev: &mut dyn MigrationDevice) -> Result<Pending> {
        dev.pending()
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
    /// `call` through the hooks: `before` (whose error fails it), the call, `after` (told
    /// whether it succeeded).
    fn hooked<T>(
        &mut self,
        call: Call,
        f: impl FnOnce(&mut H, &mut dyn MigrationDevice) -> Result<T>,
    ) -> Result<T> {
        self.hooks.before(self.inner.as_mut(), call)?;
        let r = f(&mut self.hooks, self.inner.as_mut());
        self.hooks.after(self.inner.as_mut(), call, r.is_ok());
        r
    }

    /// A recovery through the hooks: it runs whatever `before` says.
    fn recovery(&mut self, call: Call, f: fn(&mut dyn MigrationDevice) -> Recovery) -> Recovery {
        if let Err(e) = self.hooks.before(self.inner.as_mut(), call) {
            eprintln!("wrap: {call:?} runs despite its hook: {e}");
        }
        let r = f(self.inner.as_mut());
        self.hooks.after(self.inner.as_mut(), call, true);
        r
    }
}

/// Forwards `&mut self` methods through [`Wrapped::hooked`].
macro_rules! hooked {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $call:ident;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> Result<$ret> {
            self.hooked(Call::$call, |_, d| d.$name($($arg),*))
        })*
    };
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
        self.hooked(Call::Read, |h, d| h.read(d, buf))
    }
    fn pending(&mut self) -> Result<Pending> {
        self.hooked(Call::Pending, |h, d| h.pending(d))
    }
    fn recover(&mut self) -> Recovery {
        self.recovery(Call::Recover, |d| d.recover())
    }
    fn abort_resume(&mut self) -> Recovery {
        self.recovery(Call::AbortResume, |d| d.abort_resume())
    }
    hooked! {
        state_name() -> String = StateName;
        details() -> Vec<(String, String)> = Details;
        run_state() -> RunState = RunState;
        stop_copy_estimate() -> Option<u64> = StopCopyEstimate;
        is_saving() -> bool = IsSaving;
        quiesce() -> () = Quiesce;
        stop() -> () = Stop;
        run() -> () = Run;
        start_pre_copy() -> () = StartPreCopy;
        start_stop_copy() -> () = StartStopCopy;
        finish_save() -> () = FinishSave;
        finish_handoff() -> () = FinishHandoff;
        start_resume() -> () = StartResume;
        write(data: &[u8], chunk_end: bool) -> () = Write;
        load_state() -> () = LoadState;
        prepare_run() -> () = PrepareRun;
        finish_resume() -> () = FinishResume;
    }
}
