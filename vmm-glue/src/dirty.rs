// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty tracking of device DMA into guest memory, merged into vm-memory's dirty bitmap.
//!
//! A VMM migrating memory sends the pages KVM says the vCPUs wrote *and* the pages devices
//! wrote by DMA. Three device-side sources exist: v2 DMA logging (`VFIO_DEVICE_FEATURE_DMA_
//! LOGGING_*`, per device, [`DmaLogging`]), on v1-era setups the type1 container's dirty-page
//! bitmap (`VFIO_IOMMU_DIRTY_PAGES`, per container, [`crate::dma::ContainerDirtyPages`]), and
//! for devices opened through iommufd the IOMMU's own tracking of a hardware page table
//! (`IOMMU_HWPT_GET_DIRTY_BITMAP`, per HWPT, `crate::iommufd::HwptDirtyPages`, feature
//! `iommufd`). All give a bitmap of pages per IOVA range; with IOVA = guest physical address
//! (the usual VMM layout) the bits land in vm-memory's per-region [`AtomicBitmap`] next to the
//! KVM log ([`merge_dirty`]).

use std::sync::Arc;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::DeviceIo;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{GlueError, Result};

/// A guest-physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// Start guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A list of dirty guest-physical ranges (Cloud Hypervisor's `MemoryRangeTable` shape).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryRangeTable {
    /// The ranges, sorted and merged when built from a bitmap.
    pub ranges: Vec<MemoryRange>,
}

impl MemoryRangeTable {
    /// Builds the table from a bitmap of `page_size` pages starting at `base` (bit `i` of word
    /// `i / 64` is page `i`), merging adjacent pages into one range.
    pub fn from_bitmap(words: &[u64], base: u64, page_size: u64) -> Self {
        let mut ranges: Vec<MemoryRange> = Vec::new();
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let gpa = base + (w as u64 * 64 + bit) * page_size;
                match ranges.last_mut() {
                    Some(last) if last.gpa + last.length == gpa => last.length += page_size,
                    _ => ranges.push(MemoryRange {
                        gpa,
                        length: page_size,
                    }),
                }
            }
        }
        Self { ranges }
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// Marks every range dirty in `mem`'s bitmaps. Ranges outside guest memory are skipped
    /// (a device may report an IOVA the VMM does not back with memory) and counted.
    pub fn mark_dirty(&self, mem: &GuestMemoryMmap<AtomicBitmap>) -> u64 {
        let mut outside = 0;
        for r in &self.ranges {
            let mut gpa = r.gpa;
            let end = r.gpa + r.length;
            while gpa < end {
                let Some(region) = mem.find_region(GuestAddress(gpa)) else {
                    outside += 1;
                    break;
                };
                let offset = gpa - region.start_addr().raw_value();
                let len = (end - gpa).min(region.len() - offset);
                (**region)
                    .bitmap()
                    .set_addr_range(offset as usize, len as usize);
                gpa += len;
            }
        }
        outside
    }
}

/// Takes and clears the dirty pages of `mem` (what KVM and devices marked), as a table.
pub fn take_dirty(mem: &GuestMemoryMmap<AtomicBitmap>, page_size: u64) -> MemoryRangeTable {
    let mut table = MemoryRangeTable::default();
    for region in mem.iter() {
        let words = (**region).bitmap().get_and_reset();
        let part =
            MemoryRangeTable::from_bitmap(&words, region.start_addr().raw_value(), page_size);
        table.ranges.extend(part.ranges);
    }
    table
}

/// Reads every range of `ranges` from `tracker` (clearing what it reports) and marks the
/// pages in `mem`'s bitmaps. Returns the table of what was merged and the number of ranges
/// that fell (partly) outside guest memory.
pub fn merge_dirty(
    tracker: &mut dyn DirtyTracker,
    ranges: &[MemoryRange],
    page_size: u64,
    mem: &GuestMemoryMmap<AtomicBitmap>,
) -> Result<(MemoryRangeTable, u64)> {
    let mut table = MemoryRangeTable::default();
    for range in ranges {
        let words = tracker.report(*range, page_size)?;
        let part = MemoryRangeTable::from_bitmap(&words, range.gpa, page_size);
        table.ranges.extend(part.ranges);
    }
    let outside = table.mark_dirty(mem);
    Ok((table, outside))
}

/// A source of device dirty-page bitmaps.
pub trait DirtyTracker: Send {
    /// Starts tracking `ranges` (IOVA, length) at `page_size` granularity.
    fn start(&mut self, ranges: &[MemoryRange], page_size: u64) -> Result<()>;
    /// The pages written in `range` since the last report, as bitmap words (reading clears).
    fn report(&mut self, range: MemoryRange, page_size: u64) -> Result<Vec<u64>>;
    /// Stops tracking.
    fn stop(&mut self) -> Result<()>;
}

/// v2 DMA logging of one device.
pub struct DmaLogging {
    dev: Arc<dyn DeviceIo>,
    started: bool,
}

impl std::fmt::Debug for DmaLogging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaLogging")
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl DmaLogging {
    /// DMA logging on `dev` (a v2 device that supports it).
    pub fn new(dev: Arc<dyn DeviceIo>) -> Self {
        Self {
            dev,
            started: false,
        }
    }

    fn err(&self, detail: String) -> GlueError {
        GlueError::DirtyLog {
            id: self.dev.identity().instance,
            detail,
        }
    }
}

impl DirtyTracker for DmaLogging {
    fn start(&mut self, ranges: &[MemoryRange], page_size: u64) -> Result<()> {
        let ranges: Vec<_> = ranges
            .iter()
            .map(|r| vfio_mig::backend::DmaLoggingRange {
                iova: r.gpa,
                length: r.length,
            })
            .collect();
        feature::dma_logging_start(self.dev.as_ref(), page_size, &ranges)
            .map_err(|e| self.err(format!("DMA_LOGGING_START: {e}")))?;
        self.started = true;
        Ok(())
    }

    fn report(&mut self, range: MemoryRange, page_size: u64) -> Result<Vec<u64>> {
        let words = vfio_mig::backend::dma_bitmap_words(range.length, page_size)
            .ok_or_else(|| self.err(format!("bad page size {page_size}")))?;
        let mut bitmap = vec![0u64; words as usize];
        feature::dma_logging_report(
            self.dev.as_ref(),
            range.gpa,
            range.length,
            page_size,
            &mut bitmap,
        )
        .map_err(|e| self.err(format!("DMA_LOGGING_REPORT: {e}")))?;
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<()> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        feature::dma_logging_stop(self.dev.as_ref())
            .map_err(|e| self.err(format!("DMA_LOGGING_STOP: {e}")))
    }
}

impl Drop for DmaLogging {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}", vfio_mig::error::Report(&e));
        }
    }
}
