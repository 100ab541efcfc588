// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VfioMigratable`]: a VFIO device (v1 or v2, real or mock) behind the VMM traits.

use std::io::{Read, Write};

use vfio_mig::engine::save::rollback_source;
use vfio_mig::engine::session::new_header;
use vfio_mig::engine::{load_with_rollback, save_with_rollback, NoObserver, Observer, SaveOptions};
use vfio_mig::stream::{StreamReader, StreamWriter};
use vfio_mig::{MigrationDevice, OpenedDevice, Round, Source};

use crate::dirty::{DirtyTracker, MemoryRange, MemoryRangeTable};
use crate::error::{GlueError, Result};
use crate::traits::{Migratable, Pausable, Snapshottable};

/// Device index of the single device a [`VfioMigratable`] stream carries.
const DEVICE: u16 = 0;

/// A VFIO device as a VMM component.
///
/// For a live migration the VMM calls, on the source: [`start_dirty_log`](Migratable::start_dirty_log),
/// [`begin_send`](Self::begin_send) with the connection, [`start_migration`](Migratable::start_migration),
/// then [`precopy_round`](Self::precopy_round) alongside its memory rounds (merging
/// [`dirty_log`](Migratable::dirty_log) into its memory bitmap), then, with the vCPUs paused,
/// [`quiesce`](Self::quiesce) on every device before [`complete_migration`](Migratable::complete_migration)
/// on each. On the destination: [`restore`](Snapshottable::restore) on the connection.
///
/// The live path is vfio-mig's own front door ([`vfio_mig::Source`]): the rounds go through
/// the engine's record pump, and a failure rolls the device back as the engine does.
pub struct VfioMigratable {
    id: String,
    live: Live,
    tracker: Option<Box<dyn DirtyTracker>>,
    guest_ranges: Vec<MemoryRange>,
    page_size: u64,
}

/// Where the device is in a live migration.
enum Live {
    /// No live migration (or it ended): the device itself.
    Idle(Box<dyn MigrationDevice>),
    /// [`VfioMigratable::begin_send`] gave the connection; pre-copy has not started.
    Ready(Box<dyn MigrationDevice>, Box<dyn Write + Send>),
    /// Pre-copy runs: the front door owns the device.
    Sending(Box<Source<Box<dyn Write + Send>>>),
    /// Only while moving between the others.
    Moving,
}

impl std::fmt::Debug for VfioMigratable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioMigratable")
            .field("id", &self.id)
            .finish()
    }
}

impl VfioMigratable {
    /// Wraps an opened device; `id` pairs it with its counterpart on the other side.
    pub fn new(id: impl Into<String>, opened: OpenedDevice) -> Self {
        Self {
            id: id.into(),
            live: Live::Idle(opened.device),
            tracker: None,
            guest_ranges: Vec::new(),
            page_size: 4096,
        }
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

    /// The protocol driver, for anything the traits do not cover.
    pub fn device(&mut self) -> &mut dyn MigrationDevice {
        match &mut self.live {
            Live::Idle(d) | Live::Ready(d, _) => d.as_mut(),
            Live::Sending(s) => s.devices().next().expect("a source of one device"),
            Live::Moving => unreachable!("only while moving"),
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

    /// Gives the live stream's connection to the destination; the stream header goes out at
    /// [`start_migration`](Migratable::start_migration).
    pub fn begin_send(&mut self, out: Box<dyn Write + Send>) -> Result<()> {
        match std::mem::replace(&mut self.live, Live::Moving) {
            Live::Idle(dev) => {
                self.live = Live::Ready(dev, out);
                Ok(())
            }
            other => {
                self.live = other;
                Err(self.misuse("begin_send during a migration"))
            }
        }
    }

    /// Sends one pre-copy round (the bytes pending when it starts) and returns what it sent
    /// and what is left, with the device's stop-and-copy estimate, so the VMM's policy can
    /// decide when to switch over and count device state in its downtime estimate.
    pub fn precopy_round(&mut self) -> Result<Round> {
        let Live::Sending(source) = &mut self.live else {
            return Err(self.misuse("precopy_round before start_migration"));
        };
        let r = source.round();
        r.map_err(|e| self.ended(e))
    }

    /// Quiesces the device (RUNNING_P2P where supported) before any device of the VM stops.
    pub fn quiesce(&mut self) -> Result<()> {
        let r = self.device().quiesce();
        r.map_err(|e| self.snapshot_err(e))
    }

    /// After a failure the front door rolled the device back: take it back and report.
    fn ended(&mut self, e: vfio_mig::Error) -> GlueError {
        if let Live::Sending(source) = std::mem::replace(&mut self.live, Live::Moving) {
            let dev = source.into_devices().pop().expect("a source of one device");
            self.live = Live::Idle(dev);
        }
        self.snapshot_err(e)
    }
}

impl Pausable for VfioMigratable {
    fn pause(&mut self) -> Result<()> {
        self.device().stop().map_err(|source| GlueError::Pause {
            id: self.id.clone(),
            source: Box::new(source),
        })
    }

    fn resume(&mut self) -> Result<()> {
        self.device().run().map_err(|source| GlueError::Resume {
            id: self.id.clone(),
            source: Box::new(source),
        })
    }
}

impl Snapshottable for VfioMigratable {
    fn id(&self) -> String {
        self.id.clone()
    }

    fn snapshot(&mut self, out: &mut dyn Write) -> Result<u64> {
        let header = new_header(&[&*self.device()], false, 1).map_err(|e| self.snapshot_err(e))?;
        let mut writer = StreamWriter::new(out, &header).map_err(|e| self.snapshot_err(e))?;
        let report = save_with_rollback(
            self.device(),
            &mut writer,
            DEVICE,
            &SaveOptions::default(),
            &NoObserver,
        )
        .map_err(|e| self.snapshot_err(e))?;
        if let Err(e) = writer.finish() {
            let e = rollback_source(self.device(), DEVICE, e, &NoObserver);
            return Err(self.snapshot_err(e));
        }
        Ok(report.stop_copy_bytes)
    }

    fn restore(&mut self, input: &mut dyn Read) -> Result<()> {
        let restore_err = |id: &str, source| GlueError::Restore {
            id: id.to_string(),
            source: Box::new(source),
        };
        let (mut reader, _header) =
            StreamReader::open(input).map_err(|e| restore_err(&self.id, e))?;
        let id = self.id.clone();
        load_with_rollback(
            self.device(),
            &mut reader,
            DEVICE,
            &NoObserver as &dyn Observer,
        )
        .map_err(|e| restore_err(&id, e))?;
        Ok(())
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
        match std::mem::replace(&mut self.live, Live::Moving) {
            Live::Ready(dev, out) => match Source::start(vec![dev], out, 1) {
                Ok(source) => {
                    self.live = Live::Sending(Box::new(source));
                    Ok(())
                }
                // A failed start rolled the device back, but the device went with it: the
                // front door returns devices only from a started migration.
                Err(e) => Err(self.snapshot_err(e)),
            },
            other => {
                self.live = other;
                Err(self.misuse("start_migration before begin_send"))
            }
        }
    }

    fn complete_migration(&mut self) -> Result<()> {
        let Live::Sending(source) = &mut self.live else {
            return Err(self.misuse("complete_migration before start_migration"));
        };
        let r = source.complete();
        match r {
            Ok(_transport) => {
                if let Live::Sending(source) = std::mem::replace(&mut self.live, Live::Moving) {
                    let dev = source.into_devices().pop().expect("a source of one device");
                    self.live = Live::Idle(dev);
                }
                Ok(())
            }
            Err(e) => Err(self.ended(e)),
        }
    }
}
