// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A device that records the states of the whole unit after every call that may change a
//! device's state (the save and resume sequences, recovery, data reads and writes), so that a
//! test can check the destination barrier (no device runs before every device of the unit is
//! loaded and quiescent) on mocks and on real devices, and, wrapping both sides, the
//! timeline of a whole migration ([`crate::timeline`]).

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use vfio_mig::backend::DeviceIdentity;
use vfio_mig::Result;
use vfio_mig::{Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState};

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

/// Wraps device `slot` of a unit: after each call that may change its state it names the
/// device's state with `probe` and appends a snapshot of the unit to `log`.
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

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
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
        pending(&mut self) -> Result<Pending>;
        stop_copy_estimate(&mut self) -> Result<Option<u64>>;
        is_saving(&mut self) -> Result<bool>;
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        // A data fault may drop the device into ERROR inside a read.
        let r = self.inner.read(buf);
        self.snap(r)
    }
    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
        let r = self.inner.write(data, chunk_end);
        self.snap(r)
    }
    recorded! {
        quiesce() -> Result<()>;
        stop() -> Result<()>;
        start_pre_copy() -> Result<()>;
        start_stop_copy() -> Result<()>;
        finish_save() -> Result<()>;
        finish_handoff() -> Result<()>;
        recover() -> Recovery;
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
