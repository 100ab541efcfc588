// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 driver: a [`MigrationDevice`] over `VFIO_DEVICE_FEATURE` and the data fd.
//!
//! State changes walk [`plan`](super::state::plan) one arc at a time, so a failure names the
//! arc that failed and the data fd is tracked per arc: a new fd while one is open is an error
//! ("data fd out of sync", as QEMU), an arc inside the saving group that returns none keeps it (mtty answers -1 for PRE_COPY_P2P ->
//! STOP_COPY and keeps streaming on the PRE_COPY fd), and leaving the streaming states closes
//! it.
//!
//! On a failed arc the state is read back and reported in [`Error::Transition`], then the
//! device is recovered as QEMU does: a source is walked back to RUNNING, and reset when that
//! fails too or when it is found in ERROR; a destination that was RESUMING is reset, never
//! run with partial state.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_SET,
};

use super::data::{DataFd, DataRead};
use super::feature::{self, PrecopyInfo};
use super::state::{plan_inline, returns_data_fd, ArcError, MigState, MigrationFlags};
use crate::device::DmaLoggingRange;
use crate::device::{DeviceIdentity, DeviceIo};
use crate::error::{Error, Result};
use crate::migration::{
    Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState, StopCopySize,
};

/// What a state change does when an arc fails (after reading the state back and reporting it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Nothing: leave the device where it is.
    Report,
    /// Walk the device back to the state its saving session began in (RUNNING, or STOP for a
    /// paused VM); reset it when that fails, or straight away when it is in ERROR or RESUMING
    /// (partial state) or its state cannot be read. For a source.
    Recover,
    /// Reset it. For a destination, which must never run with partial or unchecked state.
    Reset,
}

/// A failed walk, before recovery.
#[derive(Debug)]
enum WalkError {
    /// Refused before any ioctl (unsupported or blocked request).
    Refused(Error),
    /// The SET of one arc failed.
    Arc {
        from: MigState,
        to: MigState,
        source: io::Error,
    },
    /// The device answered an arc against the protocol (e.g. no data fd for a new session).
    Protocol(Error),
}

impl std::fmt::Display for WalkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WalkError::Refused(e) | WalkError::Protocol(e) => write!(f, "{e}"),
            WalkError::Arc { from, to, source } => write!(f, "{from} -> {to}: {source}"),
        }
    }
}

/// What a state change reports as its step on failure; formatted only then (a transition is
/// a handful of ioctls, and formatting the text every time cost a measurable share of them).
enum Step {
    /// `set device state to TARGET`.
    SetState(MigState),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::SetState(target) => write!(f, "set device state to {target}"),
        }
    }
}

/// A device speaking the v2 migration protocol.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use vfio_mig::backend::DeviceIo;
/// # fn demo(dev: Arc<dyn DeviceIo>) -> vfio_mig::Result<()> {
/// use vfio_mig::{MigrationDevice, ReadOutcome};
/// use vfio_mig::backend::V2Device;
///
/// let mut src = V2Device::open(dev)?;
/// src.start_stop_copy()?;
/// let mut buf = vec![0u8; 1 << 20];
/// while let ReadOutcome::Data { len, .. } = src.read(&mut buf)? {
///     // send &buf[..len] to the destination
/// #   let _ = len;
/// }
/// src.finish_save()?;
/// # Ok(())
/// # }
/// ```
pub struct V2Device {
    dev: Arc<dyn DeviceIo>,
    flags: MigrationFlags,
    /// The state after our last transition or read-back.
    state: MigState,
    /// The data fd of the current session, if any.
    data: Option<DataFd>,
    /// Whether the `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` opt-in succeeded.
    precopy_v2: bool,
    /// Bytes written into the RESUMING session so far.
    resumed: u64,
    /// The state a failed save returns the device to: where its saving session began.
    home: RunState,
}

impl std::fmt::Debug for V2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V2Device")
            .field("device", &self.dev.identity().instance)
            .field("flags", &self.flags)
            .field("state", &self.state)
            .field("data_fd", &self.data_fd().map(|d| d.as_raw_fd()))
            .finish()
    }
}

/// Maps one read of the data fd in `state` to the engine's outcome: each read is one chunk; a
/// 0-byte read ends the phase, and so does ENOMSG in pre-copy (the uAPI's temporary end of
/// pre-copy data). ENOMSG in STOP_COPY is a protocol violation.
pub(crate) fn read_outcome(state: MigState, read: DataRead) -> Result<ReadOutcome> {
    match read {
        DataRead::Bytes(len) => Ok(ReadOutcome::Data {
            len,
            chunk_end: true,
        }),
        DataRead::Eof => Ok(ReadOutcome::PhaseEnd),
        DataRead::NoMessage if state.is_pre_copy() => Ok(ReadOutcome::PhaseEnd),
        DataRead::NoMessage => Err(Error::protocol(
            format!("read migration data ({state})"),
            "ENOMSG outside pre-copy (the uAPI allows it only in PRE_COPY states)",
        )),
    }
}

impl V2Device {
    /// Opens the v2 migration interface of `dev`: reads its migration flags (an
    /// [`Error::Unsupported`] when the feature is absent or lacks STOP_COPY) and its state,
    /// and opts in to REINIT pre-copy info where the kernel offers it.
    pub fn open(dev: Arc<dyn DeviceIo>) -> Result<Self> {
        let instance = dev.identity().instance;
        let flags = feature::migration_flags(dev.as_ref()).map_err(|e| {
            Error::Unsupported(format!(
                "{instance}: no v2 migration support (VFIO_DEVICE_FEATURE_MIGRATION: {e})"
            ))
        })?;
        if !flags.contains(MigrationFlags::STOP_COPY) {
            return Err(Error::Unsupported(format!(
                "{instance}: v2 migration flags {flags} lack STOP_COPY"
            )));
        }
        let precopy_v2 = flags.contains(MigrationFlags::PRE_COPY)
            && feature::enable_precopy_info_v2(dev.as_ref()).is_ok();
        let mut me = Self {
            dev,
            flags,
            state: MigState::Running,
            data: None,
            precopy_v2,
            resumed: 0,
            home: RunState::Running,
        };
        me.refresh("read the migration state")?;
        Ok(me)
    }

    /// The device access underneath.
    pub fn device(&self) -> &Arc<dyn DeviceIo> {
        &self.dev
    }

    /// The `VFIO_MIGRATION_*` flags the device reported.
    pub fn migration_flags(&self) -> MigrationFlags {
        self.flags
    }

    /// Whether pre-copy info reports REINIT (the MIG_PRECOPY_INFOv2 opt-in succeeded).
    pub fn precopy_info_v2(&self) -> bool {
        self.precopy_v2
    }

    /// Reads the current state from the device.
    pub fn state(&mut self) -> Result<MigState> {
        self.refresh("read the migration state")
    }

    /// The state after the last transition or read-back, without asking the device.
    pub fn last_state(&self) -> MigState {
        self.state
    }

    /// The device's estimate of the STOP_COPY data size (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
    pub fn data_size(&self) -> Result<u64> {
        feature::data_size(self.dev.as_ref()).map_err(|e| Error::device("read MIG_DATA_SIZE", e))
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on the current data fd (PRE_COPY states only).
    pub fn precopy_info(&self) -> Result<PrecopyInfo> {
        let step = "read pre-copy info";
        let session = self
            .data
            .as_ref()
            .ok_or_else(|| Error::protocol(step, format!("no data session in {}", self.state)))?;
        feature::precopy_info(self.dev.as_ref(), session.session(), self.precopy_v2)
            .map_err(|e| Error::device(step, e))
    }

    /// The data fd of the current session, to poll or splice (`None` also for a session
    /// without one). Owned by the device: it is closed when the device leaves the streaming
    /// states.
    pub fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        self.data.as_ref().and_then(|d| d.fd())
    }

    /// Moves the device to `target` along the kernel's arcs, one SET per arc. On a failed arc
    /// the device is recovered as [`OnFailure::Recover`] says, or reset when the walk started
    /// in RESUMING.
    pub fn set_state(&mut self, target: MigState) -> Result<()> {
        self.transition(target, None, &Step::SetState(target))
    }

    /// [`set_state`](Self::set_state) with an explicit failure policy.
    pub fn set_state_with(&mut self, target: MigState, on_failure: OnFailure) -> Result<()> {
        self.transition(target, Some(on_failure), &Step::SetState(target))
    }

    /// One raw SET to `target`, whatever the path (the kernel walks combinations itself),
    /// with data fd bookkeeping but no planning and no recovery: for tests that walk arbitrary
    /// arcs. Returns whether a new data fd came back. STOP_COPY -> PRE_COPY / PRE_COPY_P2P is
    /// refused here without an ioctl: kernels without the 2026 fix spin forever on it.
    pub fn set_state_raw(&mut self, target: MigState) -> Result<bool> {
        let step = format!("set device state to {target} (raw)");
        let from = self.refresh(&step)?;
        if from == MigState::StopCopy && target.is_pre_copy() {
            return Err(Error::protocol(
                &step,
                format!(
                    "{}; not sent, as unfixed kernels lock up on it",
                    ArcError::Blocked(from, target)
                ),
            ));
        }
        match feature::set_state(self.dev.as_ref(), target) {
            Ok(fd) => {
                let new = fd.is_some();
                self.state = target;
                self.adopt(from, target, fd)?;
                Ok(new)
            }
            Err(source) => {
                let now = self.fail_over(OnFailure::Report);
                Err(Error::Transition {
                    step,
                    from: from.to_string(),
                    to: target.to_string(),
                    now,
                    source,
                })
            }
        }
    }

    /// Starts DMA logging of `ranges` with `page_size` as a hint; returns the page size the
    /// device chose.
    pub fn dma_logging_start(&self, page_size: u64, ranges: &[DmaLoggingRange]) -> Result<u64> {
        feature::dma_logging_start(self.dev.as_ref(), page_size, ranges)
            .map_err(|e| Error::device("start DMA logging", e))
    }

    /// Reads and clears the DMA log of `[iova, iova + length)` into `bitmap` (see
    /// [`feature::dma_logging_report`]).
    pub fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        feature::dma_logging_report(self.dev.as_ref(), iova, length, page_size, bitmap)
            .map_err(|e| Error::device(format!("read the DMA log of {iova:#x}+{length:#x}"), e))
    }

    /// Stops DMA logging.
    pub fn dma_logging_stop(&self) -> Result<()> {
        feature::dma_logging_stop(self.dev.as_ref())
            .map_err(|e| Error::device("stop DMA logging", e))
    }

    /// Resets the device (`VFIO_DEVICE_RESET`, issued whether or not it is advertised) and
    /// checks that it is RUNNING afterwards. Closes any data fd.
    pub fn reset(&mut self) -> Recovery {
        self.data = None;
        self.resumed = 0;
        if let Err(e) = self.dev.reset() {
            return Recovery::Failed(format!("VFIO_DEVICE_RESET: {e}"));
        }
        match self.refresh("read the migration state after reset") {
            Ok(MigState::Running) => Recovery::Reset,
            Ok(s) => Recovery::Failed(format!("device is in {s} after VFIO_DEVICE_RESET")),
            Err(e) => Recovery::Failed(format!("after VFIO_DEVICE_RESET: {e}")),
        }
    }

    /// [`reset`](Self::reset), then back to STOP when the saving session began there (a
    /// paused VM's device must not run after its recovery).
    fn reset_home(&mut self) -> Recovery {
        let recovery = self.reset();
        if recovery != Recovery::Reset || self.home == RunState::Running {
            return recovery;
        }
        match self.walk(MigState::Running, MigState::Stop, &"stop the reset device") {
            Ok(()) => recovery,
            Err(e) => Recovery::Failed(format!("reset, but then STOP failed: {e}")),
        }
    }

    /// The v2 state of [`Self::home`].
    fn home_state(&self) -> MigState {
        match self.home {
            RunState::Running => MigState::Running,
            RunState::Stopped => MigState::Stop,
        }
    }

    /// GETs the state, caches it, and closes the data fd if the state has no session.
    fn refresh(&mut self, step: impl std::fmt::Display) -> Result<MigState> {
        let raw = feature::get_state(self.dev.as_ref())
            .map_err(|e| Error::device(step.to_string(), e))?;
        let state = MigState::from_raw(raw).ok_or_else(|| {
            Error::protocol(
                step.to_string(),
                format!("device reported unknown migration state {raw}"),
            )
        })?;
        self.state = state;
        if !state.is_streaming() {
            self.data = None;
        }
        Ok(state)
    }

    /// Takes the data fd answer of a transition `from -> to` that succeeded.
    fn adopt(
        &mut self,
        from: MigState,
        to: MigState,
        fd: Option<crate::device::DataSession>,
    ) -> Result<()> {
        let expected = returns_data_fd(from, to);
        match fd {
            Some(fd) if to.is_streaming() && self.data.is_some() => {
                // QEMU: "data_fd out of sync" (-EBADF). The device ended the session it was
                // streaming (an asynchronous reset, say): neither fd can be trusted to carry
                // the rest of the same state.
                drop(fd);
                self.data = None;
                return Err(Error::protocol(
                    format!("set device state to {to}"),
                    format!(
                        "{from} -> {to}: data fd out of sync: the device returned a new data fd \
                         while the session's fd was open"
                    ),
                ));
            }
            Some(fd) if to.is_streaming() => self.data = Some(DataFd::new(fd)),
            Some(_) => {
                log::warn!("{from} -> {to}: device returned a data fd for a state without a session; closed it");
                self.data = None;
            }
            None if expected => {
                self.data = None;
                return Err(Error::protocol(
                    format!("set device state to {to}"),
                    format!("{from} -> {to} returned no data fd"),
                ));
            }
            None if !to.is_streaming() => self.data = None,
            None => {} // a move inside the saving group keeps its session
        }
        Ok(())
    }

    /// Walks from `from` to `target` one arc at a time, with no recovery.
    fn walk(
        &mut self,
        from: MigState,
        target: MigState,
        step: &dyn std::fmt::Display,
    ) -> std::result::Result<(), WalkError> {
        let path = plan_inline(from, target, self.flags).map_err(|e| {
            WalkError::Refused(match e {
                ArcError::Unsupported(..) => {
                    Error::Unsupported(format!("{}: {step}: {e}", self.dev.identity().instance))
                }
                _ => Error::protocol(step.to_string(), format!("{from} -> {target}: {e}")),
            })
        })?;
        let mut cur = from;
        for &next in path.as_slice() {
            log::debug!("v2 arc {cur} -> {next}");
            let fd =
                feature::set_state(self.dev.as_ref(), next).map_err(|source| WalkError::Arc {
                    from: cur,
                    to: next,
                    source,
                })?;
            self.state = next;
            self.adopt(cur, next, fd).map_err(WalkError::Protocol)?;
            cur = next;
        }
        Ok(())
    }

    /// A state change with recovery: `on_failure` `None` picks [`OnFailure::Reset`] when the
    /// device starts in RESUMING, [`OnFailure::Recover`] otherwise.
    fn transition(
        &mut self,
        target: MigState,
        on_failure: Option<OnFailure>,
        step: &dyn std::fmt::Display,
    ) -> Result<()> {
        let from = self.refresh(step)?;
        match self.walk(from, target, step) {
            Ok(()) => Ok(()),
            Err(WalkError::Refused(e) | WalkError::Protocol(e)) => Err(e),
            Err(WalkError::Arc {
                from: arc_from,
                to: arc_to,
                source,
            }) => {
                let policy = on_failure.unwrap_or(if from == MigState::Resuming {
                    OnFailure::Reset
                } else {
                    OnFailure::Recover
                });
                let now = self.fail_over(policy);
                Err(Error::Transition {
                    step: step.to_string(),
                    from: arc_from.to_string(),
                    to: arc_to.to_string(),
                    now,
                    source,
                })
            }
        }
    }

    /// After a failed arc: reads the state back and applies `policy`; returns what to report
    /// as the device's state.
    fn fail_over(&mut self, policy: OnFailure) -> String {
        let now = self.refresh("read the migration state after a failed transition");
        let now_text = match &now {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let home = self.home_state();
        let before_reset = match (policy, &now) {
            (OnFailure::Report, _) => return now_text,
            (OnFailure::Recover, Ok(s)) if *s == home => return now_text,
            (OnFailure::Recover, Ok(s)) if !matches!(s, MigState::Error | MigState::Resuming) => {
                match self.walk(*s, home, &format!("return to {home}")) {
                    Ok(()) => return format!("{now_text}; it was returned to {home}"),
                    Err(e) => {
                        log::warn!("recovery to {home} failed: {e}");
                        format!("{now_text}; returning it to {home} failed ({e})")
                    }
                }
            }
            _ => now_text,
        };
        let recovery = match policy {
            OnFailure::Recover => self.reset_home(),
            _ => self.reset(),
        };
        match recovery {
            Recovery::Reset => format!("{before_reset}, so it was reset"),
            Recovery::Failed(why) => format!("{before_reset}, and resetting it failed: {why}"),
            other => format!("{before_reset}; it {other}"),
        }
    }
}

impl MigrationDevice for V2Device {
    fn identity(&self) -> DeviceIdentity {
        self.dev.identity()
    }

    fn data_fd(&self) -> Option<BorrowedFd<'_>> {
        V2Device::data_fd(self)
    }

    fn stop_copy_estimate(&mut self) -> Result<Option<u64>> {
        match feature::data_size(self.dev.as_ref()) {
            Ok(n) => Ok(Some(n)),
            // Linux 5.18 to 6.1 have no MIG_DATA_SIZE (added in 6.2): the feature ioctl
            // answers ENOTTY, and the estimate is unknown, not an error.
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => Ok(None),
            Err(e) => Err(Error::device("read MIG_DATA_SIZE", e)),
        }
    }

    fn is_saving(&mut self) -> Result<bool> {
        let state = self.refresh("check the saving session")?;
        Ok(state.is_saving() && self.data.is_some())
    }

    fn run_state(&mut self) -> Result<RunState> {
        match self.state()? {
            MigState::Running | MigState::RunningP2p => Ok(RunState::Running),
            MigState::Stop => Ok(RunState::Stopped),
            other => Err(Error::protocol(
                "read the device's run state",
                format!("the device is in {other}, inside a migration"),
            )),
        }
    }

    fn protocol(&self) -> Protocol {
        Protocol::V2
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pre_copy: self.flags.contains(MigrationFlags::PRE_COPY),
            p2p: self.flags.contains(MigrationFlags::P2P),
            migration_flags: self.flags.bits(),
        }
    }

    fn state_name(&mut self) -> Result<String> {
        Ok(self.state()?.to_string())
    }

    fn details(&mut self) -> Result<Vec<(String, String)>> {
        let state = self.state()?;
        let mut out = vec![
            ("migration flags".to_string(), self.flags.to_string()),
            (
                "device state".to_string(),
                format!("{state} ({})", state.raw()),
            ),
            (
                "stop-copy data size".to_string(),
                match self.data_size() {
                    Ok(n) => format!("{n} bytes"),
                    Err(e) => format!("unavailable ({e})"),
                },
            ),
            (
                "dma logging".to_string(),
                match feature::probe(
                    self.dev.as_ref(),
                    VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                    VFIO_DEVICE_FEATURE_SET,
                ) {
                    Ok(()) => "supported".to_string(),
                    Err(e) => format!("not supported ({e})"),
                },
            ),
        ];
        if self.flags.contains(MigrationFlags::PRE_COPY) {
            out.push((
                "pre-copy info".to_string(),
                if self.precopy_v2 {
                    "v2 (REINIT reported)".to_string()
                } else {
                    "v1".to_string()
                },
            ));
        }
        out.push((
            "data fd".to_string(),
            match (&self.data, self.data_fd()) {
                (Some(_), Some(fd)) => format!("open (fd {})", fd.as_raw_fd()),
                (Some(_), None) => "open (no fd: moved by the device)".to_string(),
                (None, _) => "none".to_string(),
            },
        ));
        Ok(out)
    }

    fn quiesce(&mut self) -> Result<()> {
        if !self.flags.contains(MigrationFlags::P2P) {
            return Ok(());
        }
        match self.state()? {
            MigState::Running => self.set_state(MigState::RunningP2p),
            MigState::PreCopy => self.set_state(MigState::PreCopyP2p),
            // Already quiescent or stopped.
            _ => Ok(()),
        }
    }

    fn stop(&mut self) -> Result<()> {
        // A pause during pre-copy goes on to STOP_COPY on the same data fd (QEMU's
        // vfio_vmstate_change): through STOP it would end the save, through RUNNING run.
        if self.refresh("stop the device")?.is_pre_copy() {
            return self.transition(MigState::StopCopy, None, &"stop the device in pre-copy");
        }
        self.set_state(MigState::Stop)
    }

    fn run(&mut self) -> Result<()> {
        self.set_state(MigState::Running)
    }

    fn start_pre_copy(&mut self) -> Result<()> {
        if !self.flags.contains(MigrationFlags::PRE_COPY) {
            return Err(Error::Unsupported(format!(
                "{}: the device does not support PRE_COPY (migration flags {})",
                self.dev.identity().instance,
                self.flags
            )));
        }
        // Only from RUNNING (QEMU's vfio_save_setup): the kernel's path from STOP to PRE_COPY
        // runs the device, which a paused VM must not see.
        let now = self.refresh("enter PRE_COPY")?;
        if now != MigState::Running {
            return Err(Error::protocol(
                "enter PRE_COPY",
                format!("pre-copy starts only from RUNNING; the device is in {now}"),
            ));
        }
        self.home = RunState::Running;
        self.transition(MigState::PreCopy, None, &"enter PRE_COPY")
    }

    fn start_stop_copy(&mut self) -> Result<()> {
        // A save that begins here begins where the device is: from STOP (a paused VM, a
        // snapshot) a failure must return it to STOP, never run it.
        match self.refresh("enter STOP_COPY")? {
            MigState::Running | MigState::RunningP2p => self.home = RunState::Running,
            MigState::Stop => self.home = RunState::Stopped,
            _ => {}
        }
        self.transition(MigState::StopCopy, None, &"enter STOP_COPY")
    }

    fn pending(&mut self) -> Result<Pending> {
        if self.state.is_pre_copy() && self.data.is_some() {
            let info = match self.precopy_info() {
                // A device without the operation (vfio-user has none): as QEMU's
                // vfio_query_precopy_size, whose failure leaves both sizes 0, no pre-copy
                // bytes are counted, so the policy switches over without waiting for data.
                Err(Error::Device { source, .. })
                    if source.raw_os_error() == Some(libc::ENOTTY) =>
                {
                    log::debug!("no PRECOPY_INFO: no pre-copy bytes counted");
                    PrecopyInfo::from_raw(&Default::default(), false)
                }
                other => other?,
            };
            // QEMU's state_pending_exact: the stop-copy size adds to the pending bytes. When
            // the device cannot tell, the size is unknown, never a guess: the policy then
            // never takes the downtime budget as met.
            let stop_copy = self.data_size().map_or_else(
                |e| {
                    log::debug!("{e}: the stop-copy size is unknown");
                    StopCopySize::Unknown
                },
                StopCopySize::Bytes,
            );
            return Ok(Pending {
                bytes: info.total(),
                initial_bytes: Some(info.initial_bytes),
                stop_copy_bytes: stop_copy,
                reinit: info.reinit,
            });
        }
        Ok(Pending {
            bytes: self.data_size()?,
            initial_bytes: None,
            stop_copy_bytes: StopCopySize::InPending,
            reinit: false,
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        let state = self.state;
        // Formatted on failure only: this runs once per read of the data fd.
        let step = || format!("read migration data ({state})");
        if buf.is_empty() {
            return Err(Error::protocol(step(), "empty read buffer"));
        }
        if !state.is_saving() {
            return Err(Error::protocol(step(), "the device is not saving"));
        }
        let data = self
            .data
            .as_ref()
            .ok_or_else(|| Error::protocol(step(), "no data fd"))?;
        let read = data
            .read_via(self.dev.as_ref(), buf)
            .map_err(|e| Error::device(step(), e))?;
        read_outcome(state, read)
    }

    fn finish_save(&mut self) -> Result<()> {
        self.transition(MigState::Stop, None, &"stop the device after saving")
    }

    fn finish_handoff(&mut self) -> Result<()> {
        match self.transition(
            MigState::Stop,
            Some(OnFailure::Reset),
            &"stop the source after the handoff",
        ) {
            // A failed arc was already followed by a reset, which the error names.
            Ok(()) => Ok(()),
            Err(e @ Error::Transition { .. }) => Err(e),
            Err(e) => {
                // The state could not even be read or planned: reset all the same.
                let recovery = self.reset();
                Err(Error::RolledBack {
                    source: Box::new(e),
                    device: self.dev.identity().instance,
                    recovery,
                })
            }
        }
    }

    fn start_resume(&mut self) -> Result<()> {
        self.resumed = 0;
        self.transition(MigState::Resuming, None, &"enter RESUMING")
    }

    fn write(&mut self, data: &[u8], _chunk_end: bool) -> Result<()> {
        // v2 streams are byte streams: chunk boundaries need not be reproduced.
        let resumed = self.resumed;
        // Formatted on failure only: this runs once per record.
        let step = || {
            format!(
                "write {} bytes of migration data at stream offset {resumed}",
                data.len()
            )
        };
        if self.state != MigState::Resuming {
            return Err(Error::protocol(
                step(),
                format!("the device is in {}, not RESUMING", self.state),
            ));
        }
        let fd = self
            .data
            .as_ref()
            .ok_or_else(|| Error::protocol(step(), "no data fd"))?;
        fd.write_all_via(self.dev.as_ref(), data)
            .map_err(|e| Error::device(step(), e))?;
        self.resumed += data.len() as u64;
        Ok(())
    }

    fn load_state(&mut self) -> Result<()> {
        let step = "load the device state (RESUMING -> STOP)";
        let now = self.refresh(step)?;
        if now != MigState::Resuming {
            return Err(Error::protocol(
                step,
                format!("the device is in {now}, not RESUMING"),
            ));
        }
        if self.resumed == 0 {
            // A device's state is never empty, and some drivers load nothing from an empty
            // stream and succeed (igb-vfio-pci's igb_load_data): the device would then run
            // without the source's state.
            return Err(Error::protocol(
                step,
                "no device state was received (0 bytes); refusing to load nothing",
            ));
        }
        // The driver checks and loads the state on this arc; the data fd is closed once it
        // succeeds (leaving the session), before the device can run.
        self.transition(MigState::Stop, Some(OnFailure::Reset), &step)
    }

    fn prepare_run(&mut self) -> Result<()> {
        if !self.flags.contains(MigrationFlags::P2P) {
            return Ok(());
        }
        if self.refresh("quiesce the resumed device")? == MigState::Resuming {
            self.load_state()?;
        }
        self.transition(
            MigState::RunningP2p,
            Some(OnFailure::Reset),
            &"quiesce the resumed device (RUNNING_P2P)",
        )
    }

    fn finish_resume(&mut self) -> Result<()> {
        if self.refresh("run the resumed device")? == MigState::Resuming {
            self.load_state()?;
        }
        self.transition(
            MigState::Running,
            Some(OnFailure::Reset),
            &"run the resumed device",
        )
    }

    fn recover(&mut self) -> Recovery {
        let home = self.home_state();
        let (already, returned) = match self.home {
            RunState::Running => (Recovery::AlreadyRunning, Recovery::Resumed),
            RunState::Stopped => (Recovery::AlreadyStopped, Recovery::Stopped),
        };
        match self.refresh("read the migration state (recovery)") {
            Ok(s) if s == home => already,
            Ok(s) if !matches!(s, MigState::Error | MigState::Resuming) => {
                match self.walk(s, home, &format!("return to {home}")) {
                    Ok(()) => returned,
                    Err(e) => {
                        log::warn!("recovery to {home} failed: {e}");
                        self.reset_home()
                    }
                }
            }
            // ERROR, RESUMING (partial state) or an unreadable state.
            _ => self.reset_home(),
        }
    }

    fn abort_resume(&mut self) -> Recovery {
        self.reset()
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{Fake, Fault};
    use super::*;
    use MigState::{PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};

    fn open(fake: &Arc<Fake>) -> V2Device {
        V2Device::open(fake.clone()).unwrap()
    }

    fn read_all(dev: &mut V2Device) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match dev.read(&mut buf).unwrap() {
                ReadOutcome::Data { len, chunk_end } => {
                    assert!(chunk_end);
                    out.extend_from_slice(&buf[..len]);
                }
                ReadOutcome::PhaseEnd => return out,
            }
        }
    }

    #[test]
    fn open_reads_flags_and_state() {
        let fake = Fake::new(7);
        let dev = open(&fake);
        let caps = dev.capabilities();
        assert!(caps.pre_copy && caps.p2p);
        assert_eq!(caps.migration_flags, 7);
        assert_eq!(dev.last_state(), Running);
        assert!(dev.data_fd().is_none());

        let err = V2Device::open(Fake::without_migration()).unwrap_err();
        assert!(matches!(err, Error::Unsupported(_)), "{err}");
        let err = V2Device::open(Fake::new(MigrationFlags::P2P.bits())).unwrap_err();
        assert!(err.to_string().contains("lack STOP_COPY"), "{err}");
    }

    #[test]
    fn live_save_keeps_the_pre_copy_fd() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        dev.start_pre_copy().unwrap();
        assert_eq!(fake.arcs(), vec![(Running, PreCopy)]);
        let pending = dev.pending().unwrap();
        assert_eq!(pending.initial_bytes, Some(24));
        assert_eq!(pending.bytes, 24);
        let fd = dev.data_fd().unwrap().as_raw_fd();
        // Header, then mtty's 0-byte read: the end of pre-copy data for now.
        assert_eq!(read_all(&mut dev), fake.pre_data());

        dev.start_stop_copy().unwrap();
        assert_eq!(
            fake.arcs()[1..],
            [(PreCopy, PreCopyP2p), (PreCopyP2p, StopCopy)]
        );
        // No new fd came back: the same session goes on.
        assert_eq!(dev.data_fd().unwrap().as_raw_fd(), fd);
        assert_eq!(read_all(&mut dev), fake.stop_data());
        dev.finish_save().unwrap();
        assert_eq!(fake.state(), Stop);
        assert!(dev.data_fd().is_none());
        assert_eq!(fake.resets(), 0);
    }

    #[test]
    fn without_p2p_pre_copy_goes_straight_to_stop_copy() {
        let fake = Fake::new(5);
        let mut dev = open(&fake);
        dev.start_pre_copy().unwrap();
        read_all(&mut dev);
        dev.start_stop_copy().unwrap();
        assert_eq!(fake.arcs(), vec![(Running, PreCopy), (PreCopy, StopCopy)]);
        assert_eq!(read_all(&mut dev), fake.stop_data());
    }

    #[test]
    fn stop_copy_only_device() {
        let fake = Fake::new(1);
        let mut dev = open(&fake);
        assert!(matches!(dev.start_pre_copy(), Err(Error::Unsupported(_))));
        assert!(fake.sets().is_empty());
        dev.start_stop_copy().unwrap();
        assert_eq!(fake.arcs(), vec![(Running, Stop), (Stop, StopCopy)]);
        let mut all = fake.pre_data();
        all.extend(fake.stop_data());
        assert_eq!(read_all(&mut dev), all);
        // MIG_DATA_SIZE outside pre-copy.
        assert_eq!(dev.pending().unwrap().bytes, 96);
        dev.finish_save().unwrap();
    }

    #[test]
    fn end_of_data_by_state() {
        let data = |len| ReadOutcome::Data {
            len,
            chunk_end: true,
        };
        assert_eq!(read_outcome(PreCopy, DataRead::Bytes(7)).unwrap(), data(7));
        assert_eq!(
            read_outcome(PreCopy, DataRead::NoMessage).unwrap(),
            ReadOutcome::PhaseEnd
        );
        assert_eq!(
            read_outcome(PreCopyP2p, DataRead::Eof).unwrap(),
            ReadOutcome::PhaseEnd
        );
        assert_eq!(
            read_outcome(StopCopy, DataRead::Eof).unwrap(),
            ReadOutcome::PhaseEnd
        );
        let err = read_outcome(StopCopy, DataRead::NoMessage).unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
    }

    #[test]
    fn failed_arc_is_reported_then_recovered_to_running() {
        let fake = Fake::new(7);
        fake.fault(Fault::new(RunningP2p, Stop, libc::EIO, RunningP2p));
        let mut dev = open(&fake);
        let err = dev.start_stop_copy().unwrap_err();
        match &err {
            Error::Transition { from, to, now, .. } => {
                assert_eq!((from.as_str(), to.as_str()), ("RUNNING_P2P", "STOP"));
                assert_eq!(now, "RUNNING_P2P; it was returned to RUNNING");
            }
            e => panic!("{e}"),
        }
        assert_eq!(err.errno(), Some(libc::EIO));
        assert_eq!(fake.state(), Running);
        assert_eq!(fake.arcs().last(), Some(&(RunningP2p, Running)));
        assert_eq!(fake.resets(), 0);
        assert_eq!(dev.recover(), Recovery::AlreadyRunning);
    }

    #[test]
    fn failed_recovery_resets() {
        let fake = Fake::new(7);
        fake.fault(Fault::new(RunningP2p, Stop, libc::EIO, RunningP2p));
        fake.fault(Fault::new(RunningP2p, Running, libc::EIO, RunningP2p));
        let mut dev = open(&fake);
        let err = dev.start_stop_copy().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("returning it to RUNNING failed"), "{text}");
        assert!(text.ends_with("so it was reset"), "{text}");
        assert_eq!(fake.resets(), 1);
        assert_eq!(fake.state(), Running);
    }

    #[test]
    fn a_device_found_in_error_is_reset_without_a_recovery_arc() {
        let fake = Fake::new(7);
        fake.fault(Fault::new(Stop, StopCopy, libc::EIO, MigState::Error));
        let mut dev = open(&fake);
        let err = dev.start_stop_copy().unwrap_err();
        match &err {
            Error::Transition { now, .. } => assert_eq!(now, "ERROR, so it was reset"),
            e => panic!("{e}"),
        }
        assert_eq!(fake.sets(), vec![RunningP2p, Stop, StopCopy]);
        assert_eq!(fake.resets(), 1);
        assert_eq!(dev.last_state(), Running);
    }

    #[test]
    fn a_failed_reset_is_reported() {
        let fake = Fake::new(7);
        fake.fault(Fault::new(Stop, StopCopy, libc::EIO, MigState::Error));
        fake.fail_resets();
        let mut dev = open(&fake);
        let text = dev.start_stop_copy().unwrap_err().to_string();
        assert!(
            text.contains("resetting it failed: VFIO_DEVICE_RESET"),
            "{text}"
        );
        assert!(matches!(dev.recover(), Recovery::Failed(_)));
    }

    #[test]
    fn resume_closes_the_fd_between_stop_and_running() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        dev.start_resume().unwrap();
        assert_eq!(
            fake.arcs(),
            vec![(Running, RunningP2p), (RunningP2p, Stop), (Stop, Resuming)]
        );
        assert!(dev.data_fd().is_some());
        let mut stream = fake.pre_data();
        stream.extend(fake.stop_data());
        // Chunk boundaries do not matter in v2: split anywhere.
        for piece in stream.chunks(5) {
            dev.write(piece, false).unwrap();
        }
        dev.finish_resume().unwrap();
        assert_eq!(fake.received(), stream);
        assert_eq!(fake.state(), Running);
        assert_eq!(
            fake.arcs()[3..],
            [(Resuming, Stop), (Stop, RunningP2p), (RunningP2p, Running)]
        );
        // The writer was closed before the device left STOP for RUNNING.
        assert_eq!(fake.writer_open_at(Stop, RunningP2p), Some(false));
        assert!(dev.data_fd().is_none());
        assert_eq!(fake.resets(), 0);
    }

    #[test]
    fn a_rejected_resume_resets_and_never_runs() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        dev.start_resume().unwrap();
        dev.write(b"not a valid device state", true).unwrap();
        let err = dev.finish_resume().unwrap_err();
        match &err {
            Error::Transition { from, to, now, .. } => {
                assert_eq!((from.as_str(), to.as_str()), ("RESUMING", "STOP"));
                assert_eq!(now, "RESUMING, so it was reset");
            }
            e => panic!("{e}"),
        }
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert_eq!(fake.resets(), 1);
        assert!(!fake.arcs().contains(&(Stop, RunningP2p)));
        assert_eq!(dev.abort_resume(), Recovery::Reset);
        assert!(dev.data_fd().is_none());
    }

    #[test]
    fn recover_from_each_phase() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        dev.start_pre_copy().unwrap();
        assert_eq!(dev.recover(), Recovery::Resumed);
        assert!(dev.data_fd().is_none());
        assert_eq!(fake.arcs().last(), Some(&(PreCopy, Running)));
        dev.start_stop_copy().unwrap();
        assert_eq!(dev.recover(), Recovery::Resumed);
        assert_eq!(fake.state(), Running);
        dev.start_resume().unwrap();
        assert_eq!(dev.recover(), Recovery::Reset);
        assert_eq!(fake.resets(), 1);
    }

    #[test]
    fn refusals_send_nothing() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        dev.start_stop_copy().unwrap();
        let before = fake.sets().len();
        let err = dev.set_state(PreCopy).unwrap_err();
        assert!(
            err.to_string().contains("refuses STOP_COPY -> PRE_COPY"),
            "{err}"
        );
        let err = dev.set_state_raw(PreCopyP2p).unwrap_err();
        assert!(err.to_string().contains("lock up"), "{err}");
        assert!(dev.set_state(MigState::Error).is_err());
        assert_eq!(fake.sets().len(), before);

        let fake = Fake::new(1);
        let mut dev = open(&fake);
        assert!(matches!(
            dev.set_state(RunningP2p),
            Err(Error::Unsupported(_))
        ));
        assert!(fake.sets().is_empty());
    }

    #[test]
    fn raw_sets_walk_arbitrary_requests() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        assert!(!dev.set_state_raw(RunningP2p).unwrap());
        assert!(dev.set_state_raw(PreCopyP2p).unwrap());
        assert!(dev.data_fd().is_some());
        // A combination the kernel walks itself: PRE_COPY_P2P -> RUNNING_P2P -> STOP.
        assert!(!dev.set_state_raw(Stop).unwrap());
        assert!(dev.data_fd().is_none());
        assert_eq!(
            fake.arcs()[2..],
            [(PreCopyP2p, RunningP2p), (RunningP2p, Stop)]
        );
        // A failed raw SET reports the state read back and recovers nothing.
        fake.fault(Fault::new(Stop, Resuming, libc::ENOMEM, Stop));
        let err = dev.set_state_raw(Resuming).unwrap_err();
        match &err {
            Error::Transition { now, .. } => assert_eq!(now, "STOP"),
            e => panic!("{e}"),
        }
        assert_eq!(fake.state(), Stop);
    }

    #[test]
    fn missing_and_replaced_data_fds() {
        let fake = Fake::new(7);
        fake.with(|f| f.withhold_fds = true);
        let mut dev = open(&fake);
        let err = dev.start_pre_copy().unwrap_err();
        assert!(err.to_string().contains("returned no data fd"), "{err}");
        assert_eq!(dev.recover(), Recovery::Resumed);
    }

    /// QEMU's vfio_migration_set_state: a data fd returned while one is open is "data_fd out
    /// of sync" (-EBADF), not a replacement.
    #[test]
    fn a_new_data_fd_inside_a_session_is_out_of_sync() {
        let fake = Fake::new(7);
        fake.with(|f| f.new_fd_for_stop_copy = true);
        let mut dev = open(&fake);
        dev.start_pre_copy().unwrap();
        read_all(&mut dev);
        let err = dev.start_stop_copy().unwrap_err();
        assert!(err.to_string().contains("out of sync"), "{err}");
        assert!(dev.data_fd().is_none(), "both fds are dropped");
        assert_eq!(dev.recover(), Recovery::Resumed);
        assert_eq!(fake.state(), Running);
    }

    #[test]
    fn dma_logging_passes_through() {
        let fake = Fake::new(7);
        let dev = open(&fake);
        let ranges = [DmaLoggingRange {
            iova: 0,
            length: 1 << 20,
        }];
        assert_eq!(dev.dma_logging_start(4096, &ranges).unwrap(), 4096);
        let mut bitmap = vec![0u64; 4];
        dev.dma_logging_report(0, 1 << 20, 4096, &mut bitmap)
            .unwrap();
        assert_eq!(bitmap[0], 1);
        let mut small = vec![0u64; 3];
        assert!(dev
            .dma_logging_report(0, 1 << 20, 4096, &mut small)
            .is_err());
        assert!(dev
            .dma_logging_report(0, 1 << 20, 1024, &mut bitmap)
            .is_err());
        dev.dma_logging_stop().unwrap();
        assert_eq!(fake.dma_calls(), 3);
    }

    #[test]
    fn details_name_flags_state_and_size() {
        let fake = Fake::new(7);
        let mut dev = open(&fake);
        let details = dev.details().unwrap();
        let get = |k: &str| details.iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get("migration flags"), "0x7 (STOP_COPY | P2P | PRE_COPY)");
        assert_eq!(get("device state"), "RUNNING (2)");
        assert_eq!(get("stop-copy data size"), "96 bytes");
        assert_eq!(get("dma logging"), "supported");
        assert_eq!(get("data fd"), "none");
        assert_eq!(dev.state_name().unwrap(), "RUNNING");
    }
}
