// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! DMA dirty-page logging of the v2 mock (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`,
//! `_REPORT`, `_STOP`), with the checks of the kernel's core
//! (`vfio_ioctl_device_feature_logging_*`) and of a vendor driver.
//!
//! While logging, the running device "DMA-writes" `dma-dirty` pages before each report: pages
//! of the logged ranges chosen by a generator seeded from the device seed (restarted by each
//! START), so a test knows exactly which bits to expect ([`DmaLog::written`]).
//!
//! The ranges and the bitmap come as slices (the typed [`vfio_mig::backend::DeviceIo`]
//! operations); the uAPI's addresses in the payload exist only for the real device.

use std::collections::BTreeSet;
use std::mem::size_of;

use vfio_bindings::bindings::vfio::vfio_device_feature_dma_logging_range;

use crate::content::SplitMix64;

/// Smallest DMA logging page size the core accepts (`SZ_4K` in
/// `vfio_ioctl_device_feature_logging_report`).
pub const MIN_DMA_LOG_PAGE: u64 = 4096;
/// Most ranges one START may carry (`LOG_MAX_RANGES`: what fits a 4 KiB page).
pub const LOG_MAX_RANGES: u32 = 4096 / size_of::<vfio_device_feature_dma_logging_range>() as u32;
/// Mixed into the seed for the generator choosing DMA-written pages.
const DMA_RNG_SALT: u64 = 0x5EED_D1A7_0B17_3A95;

/// The `u64` words a report of `length` bytes at `page_size` (non-zero) writes: one bit per
/// page, as `iova_bitmap` walks them (`DIV_ROUND_UP(length, page_size)` bits, in whole words).
pub fn bitmap_words(length: u64, page_size: u64) -> u64 {
    length.div_ceil(page_size).div_ceil(u64::from(u64::BITS))
}

/// What a driver tracking at most `max` ranges does with more (the kernel's
/// `vfio_combine_iova_ranges`): merges the two neighbours with the smallest gap between them,
/// again and again, so the device then tracks (and reports) the gaps too. `ranges` is sorted.
fn combine_ranges(ranges: &mut Vec<(u64, u64)>, max: usize) {
    while ranges.len() > max {
        let i = (0..ranges.len() - 1)
            .min_by_key(|&i| ranges[i + 1].0 - (ranges[i].0 + ranges[i].1))
            .expect("at least two ranges");
        let (start, _) = ranges[i];
        let (next, len) = ranges.remove(i + 1);
        ranges[i].1 = next + len - start;
    }
}

/// The kernel's `IS_ALIGNED` (for a power of two; with 0 only 0 is aligned, as in C).
fn is_aligned(x: u64, a: u64) -> bool {
    x & a.wrapping_sub(1) == 0
}

/// An active (or stopped) DMA log.
#[derive(Debug, Clone)]
pub struct DmaLog {
    /// The page size the device chose.
    pub page: u64,
    /// The logged ranges, (iova, length), sorted.
    ranges: Vec<(u64, u64)>,
    /// Pages (at `page`) in all ranges.
    total_pages: u64,
    /// Written and not yet reported (IOVA of each page).
    dirty: BTreeSet<u64>,
    /// Written since START.
    written: BTreeSet<u64>,
    rng: SplitMix64,
    /// Whether logging is on.
    pub active: bool,
}

impl DmaLog {
    /// `DMA_LOGGING_START`: checks `ranges` and the requested `page_size` as the kernel's
    /// core and a vendor driver do. Returns the log or an errno.
    pub fn start(
        ranges_in: &[vfio_device_feature_dma_logging_range],
        page_size: u64,
        seed: u64,
        max_ranges: Option<u32>,
    ) -> Result<Self, i32> {
        if ranges_in.is_empty() {
            return Err(libc::EINVAL);
        }
        if ranges_in.len() > LOG_MAX_RANGES as usize {
            return Err(libc::E2BIG);
        }
        let mut ranges: Vec<(u64, u64)> = Vec::with_capacity(ranges_in.len());
        for r in ranges_in {
            if !is_aligned(r.iova, page_size) || !is_aligned(r.length, page_size) {
                return Err(libc::EINVAL);
            }
            let Some(end) = r.iova.checked_add(r.length) else {
                return Err(libc::EOVERFLOW);
            };
            if r.length == 0 {
                // The kernel's interval tree would hold [iova, iova - 1]: refuse it.
                return Err(libc::EINVAL);
            }
            if ranges.iter().any(|&(s, l)| r.iova < s + l && s < end) {
                return Err(libc::EINVAL);
            }
            ranges.push((r.iova, r.length));
        }
        // The vendor driver's part: it tracks at a power-of-two page of at least 4 KiB.
        if !page_size.is_power_of_two() {
            return Err(libc::EINVAL);
        }
        let page = page_size.max(MIN_DMA_LOG_PAGE);
        ranges.sort_unstable();
        if let Some(max) = max_ranges {
            combine_ranges(&mut ranges, max.max(1) as usize);
        }
        let total_pages = ranges.iter().map(|&(_, l)| l.div_ceil(page)).sum();
        Ok(Self {
            page,
            ranges,
            total_pages,
            dirty: BTreeSet::new(),
            written: BTreeSet::new(),
            rng: SplitMix64::new(seed ^ DMA_RNG_SALT),
            active: true,
        })
    }

    /// The running device writes `n` pages (with repetition) of the logged ranges.
    pub fn dma_write(&mut self, n: u64) -> u64 {
        if !self.active || self.total_pages == 0 {
            return 0;
        }
        for _ in 0..n {
            let mut k = self.rng.next_u64() % self.total_pages;
            for &(iova, len) in &self.ranges {
                let pages = len.div_ceil(self.page);
                if k < pages {
                    let p = (iova / self.page + k) * self.page;
                    self.dirty.insert(p);
                    self.written.insert(p);
                    break;
                }
                k -= pages;
            }
        }
        n
    }

    /// `DMA_LOGGING_REPORT` after the core's checks: sets the bits of the dirty pages that
    /// overlap `[iova, iova + length)` into `bitmap` (one bit per `rpage`, relative to
    /// `iova`) and clears them from the log. Returns the bits set, or an errno (`EFAULT` for
    /// a bitmap too short, where the kernel's copy to user memory would fault).
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        rpage: u64,
        bitmap: &mut [u64],
    ) -> Result<u64, i32> {
        if !self.active {
            return Err(libc::EINVAL);
        }
        if length == 0 {
            return Ok(0);
        }
        let end = iova + length;
        let lo = iova - iova % self.page;
        let hits: Vec<u64> = self.dirty.range(lo..end).copied().collect();
        let mut bits = 0;
        for p in hits {
            let (from, to) = (p.max(iova), (p + self.page).min(end));
            if from >= to {
                continue;
            }
            for bit in (from - iova) / rpage..=(to - 1 - iova) / rpage {
                let word = bitmap.get_mut((bit / 64) as usize).ok_or(libc::EFAULT)?;
                let new = *word | 1u64 << (bit % 64);
                if new != *word {
                    bits += 1;
                }
                *word = new;
            }
            self.dirty.remove(&p);
        }
        Ok(bits)
    }

    /// Whether `[iova, iova + length)` lies inside one of the tracked (merged) ranges.
    pub fn within_one_range(&self, iova: u64, length: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(s, l)| iova >= s && iova.saturating_add(length) <= s + l)
    }

    /// `DMA_LOGGING_STOP`.
    pub fn stop(&mut self) {
        self.active = false;
        self.dirty.clear();
    }

    /// The pages written since START, sorted.
    pub fn written(&self) -> Vec<u64> {
        self.written.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_ranges_than_tracked_are_merged_across_the_smallest_gaps() {
        let k = 0x1000;
        let mut r = vec![
            (0, k),
            (2 * k, k),
            (16 * k, k),
            (18 * k, k),
            (256 * k, k),
            (260 * k, k),
        ];
        combine_ranges(&mut r, 4);
        // Gaps 1, 13, 1, 237, 3 pages: the two 1-page gaps close first.
        assert_eq!(
            r,
            vec![(0, 3 * k), (16 * k, 3 * k), (256 * k, k), (260 * k, k)]
        );
        combine_ranges(&mut r, 1);
        assert_eq!(r, vec![(0, 261 * k)]);
    }
}
