// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A device that records the states of the whole unit after every call that may change a
//! device's state (the save and resume sequences, recovery, data reads and writes), so that a
//! test can check the destination barrier (no device runs before every device of the unit is
//! loaded and quiescent) on mocks and on real devices, and, wrapping both sides, the
//! timeline of a whole migration ([`crate::timeline`]).

use std::sync::{Arc, Mutex};

use vfio_mig::MigrationDevice;

use crate::wrap::{Call, Hooks, Wrapped};

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

/// Device `slot` of a unit, recorded: after each call that may change its state it names the
/// device's state with `probe` and appends a snapshot of the unit to `log`.
pub type Recorder = Wrapped<Recording>;

/// Builds a [`Recorder`] of `inner`, device `slot` of the unit whose log is `log`.
pub fn recorder(
    inner: Box<dyn MigrationDevice>,
    slot: usize,
    log: Arc<Mutex<UnitLog>>,
    probe: StateProbe,
) -> Recorder {
    Wrapped::new(inner, Recording { slot, log, probe })
}

/// The hooks of a [`Recorder`].
pub struct Recording {
    /// This device's index in the unit.
    pub slot: usize,
    /// The unit's log.
    pub log: Arc<Mutex<UnitLog>>,
    /// Names a device's state (the device's own query, or a mock's inspection).
    pub probe: StateProbe,
}

impl std::fmt::Debug for Recording {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recording")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl Hooks for Recording {
    fn after(&mut self, dev: &mut dyn MigrationDevice, call: Call, _ok: bool) {
        // A data fault may drop the device into ERROR inside a read or write, so those count.
        if !call.may_change_state() {
            return;
        }
        let state = (self.probe)(dev, self.slot);
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.current[self.slot] = state;
        let snapshot = log.current.clone();
        log.snapshots.push(snapshot);
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
