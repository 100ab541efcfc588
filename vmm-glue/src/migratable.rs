// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VfioMigratable`]: a VM's VFIO devices (v1 or v2, real or mock), as one unit, behind the
//! VMM traits, on vfio-mig's front door ([`vfio_mig::Source`], [`vfio_mig::Destination`]).

use std::io::{Read, Write};

use vfio_mig::{
    DestinationOptions, Epoch, Handback, MigrationDevice, OpenedDevice, Round, Source,
    SourceOptions,
};

use crate::dirty::{DirtyTracker, MemoryRange, MemoryRangeTable};
use crate::error::{GlueError, Result};
use crate::traits::{Migratable, Pausable, Snapshottable};

/// The devices as the front door holds them.
type Device = Box<dyn MigrationDevice>;

/// A VM's VFIO devices as a VMM component: one device, or several migrated as one unit
/// (quiesced together before any stops: P2P).
///
/// For a live migration the VMM calls, on the source: [`start_dirty_log`](Migratable::start_dirty_log),
/// [`begin_send`](Self::begin_send) with the connection, [`start_migration`](Migratable::start_migration),
/// then [`precopy_round`](Self::precopy_round) alongside its memory rounds (merging
/// [`dirty_log`](Migratable::dirty_log) into its memory bitmap); with the vCPUs paused
/// ([`pause`](Pausable::pause) during a migration quiesces, it does not stop),
/// [`complete_migration`](Migratable::complete_migration) sends the rest and leaves the
/// devices in stop-and-copy, so the VMM reads the last dirty log then; and once the
/// destination runs, [`finish_migration`](Self::finish_migration) (or
/// [`cancel_migration`](Self::cancel_migration) if it cannot run). On the destination:
/// [`restore`](Snapshottable::restore) on the connection.
///
/// Every failure returns the devices to the state they had when the migration began (a
/// paused VM's devices stay stopped), or resets them, and the error says which.
pub struct VfioMigratable {
    id: String,
    live: Live,
    /// The connection [`begin_send`](Self::begin_send) gave.
    out: Option<Box<dyn Write + Send>>,
    allow_non_p2p_unit: bool,
    tracker: Option<Box<dyn DirtyTracker>>,
    guest_ranges: Vec<MemoryRange>,
    page_size: u64,
}

/// Where the devices are.
enum Live {
    /// No migration: the devices themselves.
    Idle(Vec<Device>),
    /// A migration runs (pre-copy, or switched over): the front door holds the devices.
    Sending(Source<Device>),
}

impl std::fmt::Debug for VfioMigratable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioMigratable")
            .field("id", &self.id)
            .field("migrating", &matches!(self.live, Live::Sending(_)))
            .finish()
    }
}

impl VfioMigratable {
    /// Wraps one opened device; `id` pairs it with its counterpart on the other side.
    pub fn new(id: impl Into<String>, opened: OpenedDevice) -> Self {
        Self::unit(id, vec![opened])
    }

    /// Wraps a VM's devices, migrated as one unit (every device needs the P2P states, unless
    /// [`allow_non_p2p_unit`](Self::allow_non_p2p_unit)); the destination gives its devices in
    /// the same order.
    pub fn unit(id: impl Into<String>, opened: Vec<OpenedDevice>) -> Self {
        Self {
            id: id.into(),
            live: Live::Idle(opened.into_iter().map(|o| o.device).collect()),
            out: None,
            allow_non_p2p_unit: false,
            tracker: None,
            guest_ranges: Vec::new(),
            page_size: 4096,
        }
    }

    /// Lets a unit of which some devices lack the P2P states migrate (see
    /// [`SourceOptions::allow_non_p2p_unit`]).
    pub fn allow_non_p2p_unit(mut self, allow: bool) -> Self {
        self.allow_non_p2p_unit = allow;
        self
    }

    /// Adds a dirty tracker over the guest memory `ranges` (IOVA = GPA) at `page_size`.
    pub fn with_dirty_tracking(
        mut self,
        tracker: Box<dyn DirtyTracker>,
        ranges: Vec<MemoryRange>,
        page_size: u64,
    ) -> Self {
        self.tracker = Some(tracker);
        self.guest_ranges = ranges;
        self.page_size = page_size;
        self
    }

    /// The protocol drivers, for anything the traits do not cover.
    pub fn devices(&mut self) -> Vec<&mut dyn MigrationDevice> {
        match &mut self.live {
            Live::Idle(devs) => devs.iter_mut().map(|d| d.as_mut() as _).collect(),
            Live::Sending(source) => source.devices().map(|d| d.as_mut() as _).collect(),
        }
    }

    fn snapshot_err(&self, source: vfio_mig::Error) -> GlueError {
        GlueError::Snapshot {
            id: self.id.clone(),
            source: Box::new(source),
        }
    }

    fn misuse(&self, what: &str) -> GlueError {
        self.snapshot_err(vfio_mig::Error::InvalidInput(what.into()))
    }

    fn options(&self) -> SourceOptions {
        SourceOptions::new(Epoch(1)).allow_non_p2p_unit(self.allow_non_p2p_unit)
    }

    /// Gives the live stream's connection to the destination; the stream header goes out
    /// with the first round.
    pub fn begin_send(&mut self, out: Box<dyn Write + Send>) -> Result<()> {
        if matches!(self.live, Live::Sending(_)) {
            return Err(self.misuse("begin_send during a migration"));
        }
        self.out = Some(out);
        Ok(())
    }

    /// Sends one pre-copy round (the bytes pending when it starts) and returns what it wrote
    /// and what is left, with the devices' stop-and-copy estimate, so the VMM's policy can
    /// decide when to switch over and count device state in its downtime estimate.
    pub fn precopy_round(&mut self) -> Result<Round> {
        let (Live::Sending(source), Some(out)) = (&mut self.live, self.out.as_mut()) else {
            return Err(self.misuse("precopy_round before start_migration"));
        };
        let r = source.round(out, None);
        r.map_err(|e| self.ended(e))
    }

    /// Ends a completed migration once the destination runs the devices' state (or when
    /// that is in doubt): the devices stop for good (one whose STOP fails is reset, never
    /// run). Returns the devices whose STOP failed.
    pub fn finish_migration(&mut self) -> Result<Vec<String>> {
        match self.take_live() {
            Live::Sending(source) => {
                let finished = source.finish();
                self.live = Live::Idle(finished.devices);
                Ok(finished.stop_failures)
            }
            idle => {
                self.live = idle;
                Err(self.misuse("finish_migration without a migration"))
            }
        }
    }

    /// Abandons a migration the destination has not run: the devices return to the state
    /// they had when it began. Returns the error that says what became of each.
    pub fn cancel_migration(&mut self) -> Option<vfio_mig::Error> {
        match self.take_live() {
            Live::Sending(mut source) => {
                let outcome = source.cancel();
                self.live = Live::Idle(source.into_devices());
                outcome
            }
            idle => {
                self.live = idle;
                None
            }
        }
    }

    /// The devices' state, leaving an empty unit in its place for the caller to replace.
    fn take_live(&mut self) -> Live {
        std::mem::replace(&mut self.live, Live::Idle(Vec::new()))
    }

    /// After a failure the front door returned the devices to their start state: take them
    /// back and report.
    fn ended(&mut self, e: vfio_mig::Error) -> GlueError {
        self.live = match self.take_live() {
            Live::Sending(source) => Live::Idle(source.into_devices()),
            idle => idle,
        };
        self.snapshot_err(e)
    }

    /// Starts a migration of the devices, keeping them on failure.
    fn start(&mut self) -> std::result::Result<(), vfio_mig::Error> {
        let devs = match self.take_live() {
            Live::Idle(devs) => devs,
            sending => {
                self.live = sending;
                return Err(vfio_mig::Error::InvalidInput("a migration runs".into()));
            }
        };
        match Source::start(devs, &self.options()) {
            Ok(source) => {
                self.live = Live::Sending(source);
                Ok(())
            }
            Err(Handback { error, devices }) => {
                self.live = Live::Idle(devices);
                Err(*error)
            }
        }
    }

    fn each_device(
        &mut self,
        step: impl Fn(&mut dyn MigrationDevice) -> vfio_mig::Result<()>,
    ) -> vfio_mig::Result<()> {
        self.devices().into_iter().try_for_each(step)
    }
}

impl Pausable for VfioMigratable {
    /// Outside a migration: every device stops (STOP). During one: every device is quiesced
    /// (RUNNING_P2P / PRE_COPY_P2P) instead, so the unit stops together at the switch-over,
    /// none before its peers are quiesced.
    fn pause(&mut self) -> Result<()> {
        let migrating = matches!(self.live, Live::Sending(_));
        let r = self.each_device(|d| if migrating { d.quiesce() } else { d.stop() });
        r.map_err(|source| GlueError::Pause {
            id: self.id.clone(),
            source: Box::new(source),
        })
    }

    /// Runs every device again. During a migration that has not switched over, the VM
    /// resuming abandons it first (the devices return to where it began).
    fn resume(&mut self) -> Result<()> {
        if let Some(e) = self.cancel_migration() {
            log::info!(
                "{}: resumed during a migration, which was cancelled: {}",
                self.id,
                vfio_mig::error::Report(&e)
            );
        }
        let r = self.each_device(|d| d.run());
        r.map_err(|source| GlueError::Resume {
            id: self.id.clone(),
            source: Box::new(source),
        })
    }
}

impl Snapshottable for VfioMigratable {
    fn id(&self) -> String {
        self.id.clone()
    }

    /// Saves the devices' state into `out` (stop-and-copy only); the devices end stopped. On
    /// failure they return to the state they had (a paused VM's stay stopped).
    fn snapshot(&mut self, out: &mut dyn Write) -> Result<u64> {
        if matches!(self.live, Live::Sending(_)) {
            return Err(self.misuse("snapshot during a migration"));
        }
        self.start().map_err(|e| self.snapshot_err(e))?;
        let Live::Sending(source) = &mut self.live else {
            return Err(self.misuse("snapshot: the migration did not start"));
        };
        let mut counted = Counted { out, bytes: 0 };
        let r = source.switch_over(&mut counted);
        match r {
            Ok(()) => {
                self.finish_migration()?;
                Ok(counted.bytes)
            }
            Err(e) => Err(self.ended(e)),
        }
    }

    fn restore(&mut self, input: &mut dyn Read) -> Result<()> {
        let restore_err = |id: &str, source| GlueError::Restore {
            id: id.to_string(),
            source: Box::new(source),
        };
        let opts = DestinationOptions::new().allow_non_p2p_unit(self.allow_non_p2p_unit);
        let Live::Idle(devs) = &mut self.live else {
            return Err(restore_err(
                &self.id,
                vfio_mig::Error::InvalidInput("restore during a migration".into()),
            ));
        };
        vfio_mig::resume(devs, input, &opts).map_err(|e| restore_err(&self.id, e))?;
        Ok(())
    }
}

/// A writer that counts what goes through it (and is `Send` for the unit's threads).
struct Counted<'a> {
    out: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counted<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl Migratable for VfioMigratable {
    fn start_dirty_log(&mut self) -> Result<()> {
        let ranges = self.guest_ranges.clone();
        let page = self.page_size;
        match self.tracker.as_mut() {
            Some(t) => t.start(&ranges, page),
            None => Ok(()),
        }
    }

    fn stop_dirty_log(&mut self) -> Result<()> {
        match self.tracker.as_mut() {
            Some(t) => t.stop(),
            None => Ok(()),
        }
    }

    fn dirty_log(&mut self) -> Result<MemoryRangeTable> {
        let mut table = MemoryRangeTable::default();
        let page = self.page_size;
        if let Some(t) = self.tracker.as_mut() {
            for range in &self.guest_ranges {
                let words = t.report(*range, page)?;
                table
                    .ranges
                    .extend(MemoryRangeTable::from_bitmap(&words, range.gpa, page).ranges);
            }
        }
        Ok(table)
    }

    fn start_migration(&mut self) -> Result<()> {
        if matches!(self.live, Live::Sending(_)) || self.out.is_none() {
            return Err(self.misuse("start_migration before begin_send, or during a migration"));
        }
        self.start().map_err(|e| self.snapshot_err(e))
    }

    /// The switch-over (vCPUs paused): quiesces every device, sends the rest of their state
    /// and ends the stream; the devices stay in stop-and-copy for the last dirty-log read,
    /// until [`finish_migration`](VfioMigratable::finish_migration).
    fn complete_migration(&mut self) -> Result<()> {
        let (Live::Sending(source), Some(out)) = (&mut self.live, self.out.as_mut()) else {
            return Err(self.misuse("complete_migration before start_migration"));
        };
        let r = source.switch_over(out);
        r.map_err(|e| self.ended(e))
    }
}
