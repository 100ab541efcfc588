// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fencing and claims: one command per device at a time, and a destination that refuses
//! stale or replayed handoffs.
//!
//! - **Claims.** Every command that drives a device (`save`, `load`, `migrate`, `send`,
//!   `recv`) first takes the device's [`DeviceLock`], an exclusive `flock(2)` on
//!   `<lock dir>/<key>.lock`, and holds it until it exits. A second command on the same device
//!   fails at once: "DEVICE is in use by another vfio-mig (pid N)". The key ([`DeviceKey`]) is
//!   the canonical sysfs path of a real device, or `mock:ID` for a mock with `id=ID`; a mock
//!   without `id=` lives only in its process and needs no lock.
//! - **Epochs and sessions.** A destination keeps, per device, the highest epoch it accepted
//!   and the session ids it completed ([`FenceRecord`], in `<state dir>/<key>.fence` for a keyed
//!   device: [`StateFence`]; in memory otherwise: [`MemoryFence`]). A stream whose epoch is
//!   below the highest is refused ("stale epoch N < M"); a stream of a completed session is
//!   answered ALREADY_COMPLETED and not loaded again. An epoch becomes the highest only when
//!   its handoff completed (the whole stream verified, COMMIT received), and one above the
//!   highest and more than [`MAX_EPOCH_LEAD`] above the clock is refused, so a peer that
//!   opens a session and leaves, or a chain of handoffs each a day ahead, cannot fence out
//!   later handoffs.
//!
//! - **Shared stores.** Across hosts, one owner per device-state identity: a
//!   [`FenceStore`] (compare-and-swap on revisions, leases) holds a [`HandoffRecord`] per
//!   identity, and [`SharedFencing`] runs the handoff protocol over it: the source's
//!   [`SharedFencing::begin`] takes the epoch from the store, the destination's
//!   [`StoreFence`] admits only the handoff the store granted and completes it together with
//!   the new ownership. [`DirStore`] is the embedded store (one host); the `vfio-mig-etcd`
//!   crate provides etcd. `docs/fencing.md` describes the model.
//!
//! The caller chooses the lock and state directories ([`FenceConfig`]); the defaults are
//! [`DEFAULT_LOCK_DIR`] and [`DEFAULT_STATE_DIR`].

mod dir_store;
pub mod error;
mod handoff_record;
mod key;
mod lease;
mod lock;
mod private;
mod record;
mod shared;
mod state;
mod store;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub use dir_store::DirStore;
pub use handoff_record::{valid_name, ClaimRecord, ClaimRole, Completion, HandoffRecord, Pending};
pub use key::DeviceKey;
pub use lease::HeldLease;
pub use lock::DeviceLock;
pub use record::{
    session_hex, Admission, FenceRecord, MAX_COMPLETED, MAX_EPOCH_LEAD, RECORD_VERSION,
};
pub use shared::{
    source_answer_wait, Handoff, SharedFencing, StoreFence, ANSWER_MARGIN, DEFAULT_CLAIM_TTL,
    DEFAULT_PREFIX,
};
pub use state::StateFence;
pub use store::{
    store_error, store_in_doubt, Condition, Entry, FenceStore, LeaseId, Revision, Write,
};

pub use error::{Error, ReasonCode, Result};
use vfio_mig::wire::SessionId;
use vfio_mig::wire::StreamHeader;

/// Default directory of the device lock files.
pub const DEFAULT_LOCK_DIR: &str = "/run/vfio-mig";
/// Default directory of the destination fencing state.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/vfio-mig";

/// A destination's fencing decisions for one device.
pub trait Fence: Send {
    /// Decides on a new stream, before the device is touched: [`Admission::AlreadyCompleted`]
    /// for a completed session, an [`crate::Error::Refused`] for a stale epoch, else
    /// [`Admission::Accept`] (and the epoch becomes the highest accepted).
    fn admit(&mut self, header: &StreamHeader) -> Result<Admission>;
    /// Records `session` as completed. Called after the whole stream was verified and before
    /// the device is resumed, so that a crash in between errs on the side of "completed": a
    /// retry then leaves both devices stopped rather than running the state twice.
    fn complete(&mut self, session: &SessionId) -> Result<()>;
    /// Forgets a completion whose resume failed (the device was reset).
    fn undo_complete(&mut self, session: &SessionId) -> Result<()>;
    /// Readies [`Fence::complete`] of `session` so that it cannot then fail for want of
    /// space: a fence kept in a file writes its new record beside the old one. A unit
    /// prepares every device's completion before it completes any ([`FenceSet`]): on a full
    /// disk, a withdrawal would need space too.
    fn prepare_complete(&mut self, _session: &SessionId) -> Result<()> {
        Ok(())
    }
    /// Drops a prepared completion that will not be made.
    fn discard_prepared(&mut self) {}
    /// Gives up an admitted session that will not complete here (its load failed and the
    /// device was reset, or the session ended before its load): a fence that holds a claim
    /// for it ([`StoreFence`]) releases it, so that the handoff may go elsewhere at once.
    fn release(&mut self, _session: &SessionId) -> Result<()> {
        Ok(())
    }
}

/// The fences of several devices migrated as one unit: a stream is admitted only if every
/// device admits it, completed on all, withdrawn from all.
pub struct FenceSet(pub Vec<Box<dyn Fence>>);

impl std::fmt::Debug for FenceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FenceSet({} fences)", self.0.len())
    }
}

impl Fence for FenceSet {
    fn admit(&mut self, header: &StreamHeader) -> Result<Admission> {
        let mut answers = Vec::with_capacity(self.0.len());
        for fence in self.0.iter_mut() {
            answers.push(fence.admit(header)?);
        }
        if answers.iter().all(|a| *a == Admission::AlreadyCompleted) {
            Ok(Admission::AlreadyCompleted)
        } else if answers.contains(&Admission::AlreadyCompleted) {
            Err(Error::Refused {
                step: "check the session".into(),
                code: ReasonCode::Fence,
                detail: "the session was completed on some of the devices only".into(),
            })
        } else {
            Ok(Admission::Accept)
        }
    }

    /// Completes on every device, or on none: every device prepares its completion first,
    /// and one that cannot prepare leaves every record as it was; a device that still fails
    /// to record the completion withdraws it from those that did (the destination then
    /// resets the unit and the source runs it again). A withdrawal that fails too leaves
    /// that record naming the session, on the side of "completed" (a retry is refused rather
    /// than run twice).
    fn complete(&mut self, session: &SessionId) -> Result<()> {
        for prepared in 0..self.0.len() {
            if let Err(e) = self.0[prepared].prepare_complete(session) {
                self.0[..prepared]
                    .iter_mut()
                    .for_each(|f| f.discard_prepared());
                return Err(e);
            }
        }
        for done in 0..self.0.len() {
            if let Err(e) = self.0[done].complete(session) {
                for fence in &mut self.0[..done] {
                    if let Err(undo) = fence.undo_complete(session) {
                        log::warn!("withdraw a unit's partial completion: {undo}");
                    }
                }
                self.0[done + 1..]
                    .iter_mut()
                    .for_each(|f| f.discard_prepared());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Withdraws from every device, the first error returned once all were tried.
    fn undo_complete(&mut self, session: &SessionId) -> Result<()> {
        let mut first = Ok(());
        for fence in &mut self.0 {
            if let Err(e) = fence.undo_complete(session) {
                first = first.and(Err(e));
            }
        }
        first
    }

    fn release(&mut self, session: &SessionId) -> Result<()> {
        self.0.iter_mut().try_for_each(|f| f.release(session))
    }
}

/// A [`Fence`] kept in memory, for devices without a key (and for local migrations).
#[derive(Debug, Clone, Default)]
pub struct MemoryFence {
    record: FenceRecord,
    /// The session admitted last and its epoch, recorded when it completes.
    admitted: Option<(SessionId, u64)>,
}

impl MemoryFence {
    /// An empty fence.
    pub fn new() -> Self {
        Self::default()
    }

    /// The record.
    pub fn record(&self) -> &FenceRecord {
        &self.record
    }
}

impl Fence for MemoryFence {
    fn admit(&mut self, header: &StreamHeader) -> Result<Admission> {
        let admission = self.record.admit(header)?.0;
        if admission == Admission::Accept {
            self.admitted = Some((header.session_id, header.epoch));
        }
        Ok(admission)
    }

    fn complete(&mut self, session: &SessionId) -> Result<()> {
        self.record.complete(session);
        if let Some((admitted, epoch)) = self.admitted {
            if admitted == *session {
                self.record.accept_epoch(epoch);
            }
        }
        Ok(())
    }

    fn undo_complete(&mut self, session: &SessionId) -> Result<()> {
        self.record.undo_complete(session);
        Ok(())
    }
}

/// Where locks and fencing state live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceConfig {
    /// The lock directory.
    pub lock_dir: PathBuf,
    /// The state directory.
    pub state_dir: PathBuf,
}

impl Default for FenceConfig {
    /// [`DEFAULT_LOCK_DIR`] and [`DEFAULT_STATE_DIR`].
    fn default() -> Self {
        Self::new(DEFAULT_LOCK_DIR, DEFAULT_STATE_DIR)
    }
}

impl FenceConfig {
    /// Locks in `lock_dir`, fencing state in `state_dir`.
    pub fn new(lock_dir: impl Into<PathBuf>, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            lock_dir: lock_dir.into(),
            state_dir: state_dir.into(),
        }
    }

    /// Claims device `name` for this command: takes the lock of `key` if the device has one
    /// (a device without a key lives only in this process and needs no lock). Fails at once if
    /// another command holds it.
    pub fn claim(&self, name: &str, key: Option<DeviceKey>) -> Result<Claim> {
        let lock = match &key {
            Some(k) => Some(DeviceLock::acquire(&self.lock_dir, k, name)?),
            None => None,
        };
        Ok(Claim {
            key,
            lock,
            state_dir: self.state_dir.clone(),
        })
    }
}

/// A device claimed by this command (locked if it has a key), until dropped.
#[derive(Debug)]
pub struct Claim {
    key: Option<DeviceKey>,
    lock: Option<DeviceLock>,
    state_dir: PathBuf,
}

impl Claim {
    /// The device key, if the device has one.
    pub fn key(&self) -> Option<&DeviceKey> {
        self.key.as_ref()
    }

    /// The lock file, if the device was locked.
    pub fn lock_path(&self) -> Option<&Path> {
        self.lock.as_ref().map(DeviceLock::path)
    }

    /// The device's fencing state as a destination: on disk for a keyed device, in memory
    /// otherwise.
    pub fn fence(&self) -> Box<dyn Fence> {
        match &self.key {
            Some(k) => Box::new(StateFence::new(&self.state_dir, k)),
            None => Box::new(MemoryFence::new()),
        }
    }

    /// The default epoch of a handoff from this device: the current time in milliseconds
    /// since 1970, or one more than the highest epoch this host recorded for the device (as a
    /// destination, when the state arrived here) if that is larger. Epochs so increase along a
    /// device's chain of handoffs as long as the hosts' clocks are within the time between two
    /// handoffs of each other; an orchestrator with its own generation counter passes it with
    /// `--epoch` instead.
    pub fn default_epoch(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let recorded = self
            .key
            .as_ref()
            .and_then(|k| StateFence::new(&self.state_dir, k).highest_epoch().ok())
            .unwrap_or(0);
        now.max(recorded.saturating_add(1)).max(1)
    }
}

/// A one-device stream header for the fence tests.
#[cfg(test)]
pub(crate) fn test_header(session: u8, epoch: u64) -> StreamHeader {
    use vfio_mig::{wire::DeviceDescriptor, Protocol};
    StreamHeader {
        session_id: [session; 16],
        epoch,
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V1,
            live: false,
            migration_flags: 0,
            model: "mock:v1".into(),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_lock_keyed_devices_only() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FenceConfig::new(dir.path().join("l"), dir.path().join("s"));
        let key = || Some(DeviceKey::from_text("mock:a"));
        let plain = cfg.claim("mock:v1,size=1M", None).unwrap();
        assert!(plain.key().is_none() && plain.lock_path().is_none());
        let _again = cfg.claim("mock:v1,size=1M", None).unwrap();
        let a = cfg.claim("mock:v1,size=1M,id=a", key()).unwrap();
        assert!(a.lock_path().unwrap().starts_with(dir.path().join("l")));
        let e = cfg
            .claim("mock:v1,size=2M,id=a", key())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is in use by another vfio-mig"), "{e}");
        drop(a);
        cfg.claim("mock:v1,size=2M,id=a", key()).unwrap();
    }

    /// A device's fence that records its completions where the test sees them, and fails
    /// at `fails` (`prepare` or `complete`) for want of space.
    struct Recorded {
        completed: std::sync::Arc<std::sync::Mutex<Vec<SessionId>>>,
        fails: &'static str,
        /// A withdrawal fails too (it needs space as well, on a disk shared with the other).
        stuck: bool,
    }

    impl Recorded {
        /// Out of space when `failing`.
        fn space(failing: bool) -> Result<()> {
            if !failing {
                return Ok(());
            }
            let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
            Err(Error::device("write fencing state", full))
        }

        fn at(&self, stage: &str) -> Result<()> {
            Self::space(self.fails == stage)
        }
    }

    impl Fence for Recorded {
        fn admit(&mut self, _header: &StreamHeader) -> Result<Admission> {
            Ok(Admission::Accept)
        }
        fn complete(&mut self, session: &SessionId) -> Result<()> {
            self.at("complete")?;
            self.completed.lock().unwrap().push(*session);
            Ok(())
        }
        fn undo_complete(&mut self, session: &SessionId) -> Result<()> {
            Self::space(self.stuck)?;
            self.completed.lock().unwrap().retain(|s| s != session);
            Ok(())
        }
        fn prepare_complete(&mut self, _session: &SessionId) -> Result<()> {
            self.at("prepare")
        }
    }

    /// Completes a session on a unit of two recorded devices whose second fails at `stage`,
    /// withdrawals failing too when `stuck`; returns what stays recorded.
    fn complete_failing(stage: &'static str, stuck: bool) -> Vec<SessionId> {
        let completed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let device = |fails| -> Box<dyn Fence> {
            let completed = completed.clone();
            Box::new(Recorded {
                completed,
                fails,
                stuck,
            })
        };
        let mut unit = FenceSet(vec![device("none"), device(stage)]);
        unit.complete(&[7; 16]).unwrap_err();
        let left = completed.lock().unwrap().clone();
        left
    }

    /// A unit's completion that fails on one device is withdrawn from those that recorded it
    /// (the destination resets every device and answers FAILED, so the source runs the state
    /// again: no record may name the session completed). Found by the soak: a unit of two
    /// whose second device's state directory was full.
    #[test]
    fn a_units_completion_failing_on_one_device_is_withdrawn_from_all() {
        assert_eq!(complete_failing("complete", false), Vec::<SessionId>::new());
    }

    /// On a full disk the withdrawal fails as well: a unit prepares every device's
    /// completion before it completes any, so a device without room leaves every record as
    /// it was. Found by the soak: a unit of two on a 1-page state directory, whose first
    /// device's record named the session completed while the source ran the state again.
    #[test]
    fn a_unit_completes_on_no_device_when_one_cannot_prepare() {
        assert_eq!(complete_failing("prepare", true), Vec::<SessionId>::new());
    }

    /// A device's fence that counts the completions it prepared and neither made nor
    /// discarded (a `StateFence`'s temporary file beside its record), failing its completion
    /// when `fails`.
    struct Preparing {
        outstanding: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        prepared: bool,
        fails: bool,
    }

    impl Fence for Preparing {
        fn admit(&mut self, _header: &StreamHeader) -> Result<Admission> {
            Ok(Admission::Accept)
        }
        fn complete(&mut self, _session: &SessionId) -> Result<()> {
            self.discard_prepared();
            Recorded::space(self.fails)
        }
        fn undo_complete(&mut self, _session: &SessionId) -> Result<()> {
            Ok(())
        }
        fn prepare_complete(&mut self, _session: &SessionId) -> Result<()> {
            self.discard_prepared();
            self.prepared = true;
            self.outstanding
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn discard_prepared(&mut self) {
            if std::mem::take(&mut self.prepared) {
                self.outstanding
                    .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    }

    /// A unit's completion that fails on one device leaves no prepared completion behind on
    /// the devices after it (each would stay a file in the state directory).
    #[test]
    fn a_failed_units_completion_leaves_nothing_prepared() {
        let outstanding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let device = |fails| -> Box<dyn Fence> {
            Box::new(Preparing {
                outstanding: outstanding.clone(),
                prepared: false,
                fails,
            })
        };
        let mut unit = FenceSet(vec![device(false), device(true), device(false)]);
        unit.complete(&[7; 16]).unwrap_err();
        assert_eq!(outstanding.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn default_epoch_follows_the_clock_and_the_recorded_state() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = FenceConfig::new(dir.path().join("l"), dir.path().join("s"));
        let c = cfg
            .claim("mock:v1,id=e", Some(DeviceKey::from_text("mock:e")))
            .unwrap();
        let e1 = c.default_epoch();
        assert!(e1 > 1_600_000_000_000, "{e1}");
        let future = u64::MAX - 5;
        let mut record = FenceRecord::new("mock:e");
        record.highest_epoch = future;
        StateFence::new(&dir.path().join("s"), c.key().unwrap())
            .store(&record)
            .unwrap();
        assert_eq!(c.default_epoch(), future + 1);
    }
}
