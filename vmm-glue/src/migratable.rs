// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VfioMigratable`]: a VFIO device (v1 or v2, real or mock) behind the VMM traits.

use std::io::{Read, Write};

use vfio_mig::engine::session::new_header;
use vfio_mig::engine::{
    load_with_rollback, save_device, save_with_rollback, MigrationDevice, NoObserver, Observer,
    Pending, ReadOutcome, SaveOptions,
};
use vfio_mig::open::OpenedDevice;
use vfio_mig::stream::{Phase, StreamReader, StreamWriter};

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
pub struct VfioMigratable {
    id: String,
    device: Box<dyn MigrationDevice>,
    tracker: Option<Box<dyn DirtyTracker>>,
    guest_ranges: Vec<MemoryRange>,
    page_size: u64,
    live: Option<StreamWriter<Box<dyn Write + Send>>>,
    buffer: Vec<u8>,
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
            device: opened.device,
            tracker: None,
            guest_ranges: Vec::new(),
            page_size: 4096,
            live: None,
            buffer: vec![0u8; 1 << 20],
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
        self.device.as_mut()
    }

    fn snapshot_err(&self, source: vfio_mig::Error) -> GlueError {
        GlueError::Snapshot {
            id: self.id.clone(),
            source: Box::new(source),
        }
    }

    /// Opens the live stream to the destination (the header goes out now).
    pub fn begin_send(&mut self, out: Box<dyn Write + Send>) -> Result<()> {
        let header =
            new_header(&[self.device.as_ref()], true, 1).map_err(|e| self.snapshot_err(e))?;
        let writer = StreamWriter::new(out, &header).map_err(|e| self.snapshot_err(e))?;
        self.live = Some(writer);
        Ok(())
    }

    /// Sends one pre-copy round: the bytes pending when it starts. Returns (bytes sent, bytes
    /// still pending) so the VMM's policy can decide when to switch over.
    pub fn precopy_round(&mut self) -> Result<(u64, Pending)> {
        if self.live.is_none() {
            return Err(self.snapshot_err(vfio_mig::Error::InvalidInput(
                "precopy_round before begin_send".into(),
            )));
        }
        let result = self.send_round();
        let sent = result.map_err(|e| self.fail(e))?;
        let pending = self.device.pending().map_err(|e| self.fail(e))?;
        Ok((sent, pending))
    }

    /// Moves the bytes pending at the start of the round into the live stream.
    fn send_round(&mut self) -> vfio_mig::Result<u64> {
        let budget = self.device.pending()?.bytes;
        let out = self.live.as_mut().expect("checked by the caller");
        let mut sent = 0u64;
        loop {
            match self.device.read(&mut self.buffer)? {
                ReadOutcome::PhaseEnd => return Ok(sent),
                ReadOutcome::Data { len, chunk_end } => {
                    out.data(DEVICE, Phase::PreCopy, &self.buffer[..len], chunk_end)?;
                    sent += len as u64;
                    if chunk_end && sent >= budget {
                        return Ok(sent);
                    }
                }
            }
        }
    }

    /// Quiesces the device (RUNNING_P2P where supported) before any device of the VM stops.
    pub fn quiesce(&mut self) -> Result<()> {
        self.device.quiesce().map_err(|e| self.fail(e))
    }

    /// Rolls the device back to RUNNING after a failure and returns the error to report.
    fn fail(&mut self, e: vfio_mig::Error) -> GlueError {
        self.live = None;
        let recovery = self.device.recover();
        GlueError::Snapshot {
            id: self.id.clone(),
            source: Box::new(vfio_mig::Error::RolledBack {
                source: Box::new(e),
                device: self.device.identity().instance,
                recovery,
            }),
        }
    }
}

impl Pausable for VfioMigratable {
    fn pause(&mut self) -> Result<()> {
        self.device.stop().map_err(|source| GlueError::Pause {
            id: self.id.clone(),
            source: Box::new(source),
        })
    }

    fn resume(&mut self) -> Result<()> {
        self.device.run().map_err(|source| GlueError::Resume {
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
        let header =
            new_header(&[self.device.as_ref()], false, 1).map_err(|e| self.snapshot_err(e))?;
        let mut writer = StreamWriter::new(out, &header).map_err(|e| self.snapshot_err(e))?;
        let report = save_with_rollback(
            self.device.as_mut(),
            &mut writer,
            DEVICE,
            &SaveOptions::default(),
            &NoObserver,
        )
        .map_err(|e| self.snapshot_err(e))?;
        writer.finish().map_err(|e| self.fail(e))?;
        Ok(report.stop_copy_bytes)
    }

    fn restore(&mut self, input: &mut dyn Read) -> Result<()> {
        let restore_err = |id: &str, source| GlueError::Restore {
            id: id.to_string(),
            source: Box::new(source),
        };
        let (mut reader, _header) =
            StreamReader::open(input).map_err(|e| restore_err(&self.id, e))?;
        load_with_rollback(
            self.device.as_mut(),
            &mut reader,
            DEVICE,
            &NoObserver as &dyn Observer,
        )
        .map_err(|e| restore_err(&self.id, e))?;
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
        if self.live.is_none() {
            return Err(self.snapshot_err(vfio_mig::Error::InvalidInput(
                "start_migration before begin_send".into(),
            )));
        }
        self.device.start_pre_copy().map_err(|e| self.fail(e))
    }

    fn complete_migration(&mut self) -> Result<()> {
        let Some(mut out) = self.live.take() else {
            return Err(self.snapshot_err(vfio_mig::Error::InvalidInput(
                "complete_migration before begin_send".into(),
            )));
        };
        let result = (|| -> vfio_mig::Result<()> {
            out.end_phase(DEVICE, Phase::PreCopy)?;
            // The remaining state: stop-and-copy through the engine's own phase loop.
            let opts = SaveOptions::default();
            save_device(self.device.as_mut(), &mut out, DEVICE, &opts, &NoObserver)?;
            out.finish()?;
            Ok(())
        })();
        result.map_err(|e| self.fail(e))
    }
}
