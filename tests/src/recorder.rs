// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A destination device that records the states of the whole unit after every state change
//! of the resume sequence, so that a test can check the destination barrier (no device runs
//! before every device of the unit is loaded and quiescent) on mocks and on real devices.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use vfio_mig::device::DeviceIdentity;
use vfio_mig::engine::{
    Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState,
};
use vfio_mig::Result;

/// How a recorder names the state of a unit's device at a snapshot.
pub type StateProbe = Arc<dyn Fn(&mut dyn MigrationDevice, usize) -> String + Send + Sync>;

/// The unit's shared record: the last state seen of each device and every snapshot taken.
#[derive(Debug, Default)]
pub struct UnitLog {
    /// The last state of each device, as its probe named it (`"?"` before its first change).
    pub current: Vec<String>,
    /// A copy of `current` after each recorded state change, in order.
    pub snapshots: Vec<Vec<String>>,
}

impl UnitLog {
    /// A log for `n` devices.
    pub fn new(n: usize) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self {
            current: vec!["?".into(); n],
            snapshots: Vec::new(),
        }))
    }
}

/// Wraps device `slot` of a unit: after each resume-sequence call it names the device's state
/// with `probe` and appends a snapshot of the unit to `log`.
pub struct Recorder {
    /// The wrapped device.
    pub inner: Box<dyn MigrationDevice>,
    /// This device's index in the unit.
    pub slot: usize,
    /// The unit's log.
    pub log: Arc<Mutex<UnitLog>>,
    /// Names a device's state (the device's own query, or a mock's inspection).
    pub probe: StateProbe,
}

impl Recorder {
    fn snap<T>(&mut self, r: T) -> T {
        let state = (self.probe)(self.inner.as_mut(), self.slot);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.current[self.slot] = state;
        let snapshot = log.current.clone();
        log.snapshots.push(snapshot);
        r
    }
}

macro_rules! delegate {
    ($($name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> $ret { self.inner.$name($($arg),*) })*
    };
}

macro_rules! recorded {
    ($($name:ident() -> $ret:ty;)*) => {
        $(fn $name(&mut self) -> $ret { let r = self.inner.$name(); self.snap(r) })*
    };
}

impl MigrationDevice for Recorder {
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
    delegate! {
        state_name(&mut self) -> Result<String>;
        details(&mut self) -> Result<Vec<(String, String)>>;
        run_state(&mut self) -> Result<RunState>;
        quiesce(&mut self) -> Result<()>;
        stop(&mut self) -> Result<()>;
        start_pre_copy(&mut self) -> Result<()>;
        start_stop_copy(&mut self) -> Result<()>;
        pending(&mut self) -> Result<Pending>;
        read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome>;
        finish_save(&mut self) -> Result<()>;
        finish_handoff(&mut self) -> Result<()>;
        write(&mut self, data: &[u8], chunk_end: bool) -> Result<()>;
        recover(&mut self) -> Recovery;
        stop_copy_estimate(&mut self) -> Result<Option<u64>>;
        is_saving(&mut self) -> Result<bool>;
    }
    recorded! {
        start_resume() -> Result<()>;
        load_state() -> Result<()>;
        prepare_run() -> Result<()>;
        finish_resume() -> Result<()>;
        run() -> Result<()>;
        abort_resume() -> Recovery;
    }
}

/// The first snapshot in which a device runs while another is neither running nor quiescent
/// (RUNNING_P2P): a broken destination barrier. `running` and `quiescent` name those states.
pub fn barrier_violation<'a>(
    snapshots: &'a [Vec<String>],
    running: &str,
    quiescent: &str,
) -> Option<&'a Vec<String>> {
    snapshots.iter().find(|s| {
        s.iter().any(|x| x == running) && !s.iter().all(|x| x == running || x == quiescent)
    })
}
