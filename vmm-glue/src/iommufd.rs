// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The third device dirty-page source: an iommufd HWPT's own dirty tracking
//! (`IOMMU_HWPT_SET_DIRTY_TRACKING`, `IOMMU_HWPT_GET_DIRTY_BITMAP`; vfio-mig's
//! [`vfio_mig::DirtyHwpt`]), as a [`DirtyTracker`] beside v2 DMA logging and the type1
//! container's bitmap.
//!
//! The IOMMU records the pages every device attached to the HWPT wrote, whatever the device's
//! driver supports, so this is the source for devices opened through iommufd whose driver has
//! no DMA logging (QEMU prefers it over DMA logging for the same reason). With IOVA = GPA the
//! bits land in vm-memory's bitmap like the other two sources' (see [`crate::dirty`]).

use vfio_mig::{DirtyHwpt, DirtyRange, ReadMode};

use crate::dirty::{DirtyTracker, MemoryRange};
use crate::error::{GlueError, Result};

/// Dirty tracking of one iommufd HWPT (all the devices attached to it).
#[derive(Debug)]
pub struct HwptDirtyPages {
    hwpt: DirtyHwpt,
    started: bool,
}

impl HwptDirtyPages {
    /// Tracking over `hwpt` (allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`).
    pub fn new(hwpt: DirtyHwpt) -> Self {
        Self {
            hwpt,
            started: false,
        }
    }

    /// The HWPT.
    pub fn hwpt(&self) -> &DirtyHwpt {
        &self.hwpt
    }

    /// Reads `range` without clearing (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`): for the last
    /// read before the range is unmapped, or to look without consuming.
    pub fn peek(&mut self, range: MemoryRange, page_size: u64) -> Result<Vec<u64>> {
        self.read(range, page_size, ReadMode::NoClear)
    }

    fn err(&self, detail: String) -> GlueError {
        GlueError::DirtyLog {
            id: format!("iommufd HWPT {}", self.hwpt.id()),
            detail,
        }
    }

    fn read(&mut self, range: MemoryRange, page_size: u64, mode: ReadMode) -> Result<Vec<u64>> {
        let checked = DirtyRange::new(range.gpa, range.length, page_size)
            .map_err(|e| self.err(e.to_string()))?;
        self.hwpt
            .read_dirty(&checked, mode)
            .map_err(|e| self.err(e.to_string()))
    }
}

impl DirtyTracker for HwptDirtyPages {
    fn start(&mut self, _ranges: &[MemoryRange], _page_size: u64) -> Result<()> {
        // The HWPT tracks everything mapped in its IOAS; ranges and page size are chosen at
        // report time. Turning tracking on clears stale bits (iopt_set_dirty_tracking).
        self.hwpt
            .set_dirty_tracking(true)
            .map_err(|e| self.err(e.to_string()))?;
        self.started = true;
        Ok(())
    }

    fn report(&mut self, range: MemoryRange, page_size: u64) -> Result<Vec<u64>> {
        self.read(range, page_size, ReadMode::Clear)
    }

    fn stop(&mut self) -> Result<()> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        self.hwpt
            .set_dirty_tracking(false)
            .map_err(|e| self.err(e.to_string()))
    }
}

impl Drop for HwptDirtyPages {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}", vfio_mig::error::Report(&e));
        }
    }
}
