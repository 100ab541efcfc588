// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 migration features of `VFIO_DEVICE_FEATURE`, in the protocol's types, over the
//! typed operations of [`DeviceIo`].
//!
//! The device layer takes and returns the kernel's raw values (a `u32` state, `u64` flags);
//! this module gives them their v2 meaning ([`MigState`], [`MigrationFlags`],
//! [`PrecopyInfo`]) and checks what the protocol requires before a call (a non-empty range
//! list, a power-of-two page size, a bitmap large enough for a report), so a mistake is a
//! clear error rather than an errno. The `vfio_device_feature` argument itself is packed by
//! the real device only ([`crate::device::vfio::VfioDeviceIo`]).
//!
//! `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (12) has no payload struct: it is a SET with an
//! empty payload that opts in to `VFIO_PRECOPY_INFO_REINIT` being reported in
//! `vfio_precopy_info.flags` (without the opt-in, drivers echo back whatever flags the caller
//! passed). Kernels without it refuse the SET; [`enable_precopy_info_v2`] reports that.

use std::io;

use vfio_bindings::bindings::vfio::{vfio_precopy_info, VFIO_PRECOPY_INFO_REINIT};

use super::state::{MigState, MigrationFlags};
use crate::device::{check_dma_bitmap, DataSession, DeviceIo};
use crate::device::{dma_bitmap_words, DmaLoggingRange};

/// The smallest page size the kernel accepts for a DMA logging report.
pub const MIN_DMA_LOG_PAGE: u64 = 4096;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// Probes `feature` (its index, at most `VFIO_DEVICE_FEATURE_MASK`) for the `access` bits
/// (`VFIO_DEVICE_FEATURE_GET` and/or `VFIO_DEVICE_FEATURE_SET`): `Ok` when the device
/// supports it.
pub fn probe(dev: &dyn DeviceIo, feature: u32, access: u32) -> io::Result<()> {
    dev.probe_feature(feature, access)
}

/// The device's migration flags (`VFIO_DEVICE_FEATURE_MIGRATION`).
pub fn migration_flags(dev: &dyn DeviceIo) -> io::Result<MigrationFlags> {
    dev.migration_flags().map(MigrationFlags::from_bits_retain)
}

/// The raw current migration state; decode it with [`MigState::from_raw`].
pub fn get_state(dev: &dyn DeviceIo) -> io::Result<u32> {
    dev.mig_state()
}

/// Requests `state`. Returns the new data session when the transition opened one (the
/// kernel answers `data_fd` >= 0), `None` when it answered -1.
pub fn set_state(dev: &dyn DeviceIo, state: MigState) -> io::Result<Option<DataSession>> {
    dev.set_mig_state(state.raw())
}

/// The estimated number of bytes STOP_COPY will produce (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
pub fn data_size(dev: &dyn DeviceIo) -> io::Result<u64> {
    dev.mig_data_size()
}

/// Starts DMA logging of `ranges` (non-empty, non-overlapping, `page_size`-aligned) with
/// `page_size` as a hint; returns the page size the device chose.
pub fn dma_logging_start(
    dev: &dyn DeviceIo,
    page_size: u64,
    ranges: &[DmaLoggingRange],
) -> io::Result<u64> {
    if ranges.is_empty() || !page_size.is_power_of_two() {
        return Err(einval());
    }
    dev.dma_logging_start(ranges, page_size)
}

/// Stops DMA logging.
pub fn dma_logging_stop(dev: &dyn DeviceIo) -> io::Result<()> {
    dev.dma_logging_stop()
}

/// Reads and clears the DMA log of `[iova, iova + length)` into `bitmap`: bit `n` of the
/// bitmap (word `n / 64`, bit `n % 64`) is page `iova + n * page_size`. `page_size` must be a
/// power of two of at least 4096 and `bitmap` must hold [`dma_bitmap_words`] words; those
/// words are zeroed first, because the kernel only sets bits (iova_bitmap_set: a driver that
/// saw no DMA, like mtty, leaves the buffer as it was), and stale bits would be reported as
/// new writes. Words past them are left alone.
pub fn dma_logging_report(
    dev: &dyn DeviceIo,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> io::Result<()> {
    if page_size < MIN_DMA_LOG_PAGE || !page_size.is_power_of_two() {
        return Err(einval());
    }
    if iova.checked_add(length).is_none() {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    }
    check_dma_bitmap(length, page_size, bitmap.len())?;
    if let Some(words) = dma_bitmap_words(length, page_size) {
        let end = (words as usize).min(bitmap.len());
        bitmap[..end].fill(0);
    }
    dev.dma_logging_report(iova, length, page_size, bitmap)
}

/// Opts in to `VFIO_PRECOPY_INFO_REINIT` reporting (`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`).
pub fn enable_precopy_info_v2(dev: &dyn DeviceIo) -> io::Result<()> {
    dev.enable_precopy_info_v2()
}

/// What `VFIO_MIG_GET_PRECOPY_INFO` says about the pre-copy data still to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PrecopyInfo {
    /// Initial (critical) pre-copy bytes not yet read.
    pub initial_bytes: u64,
    /// Bytes of state changed since it was last read.
    pub dirty_bytes: u64,
    /// New initial data appeared (`VFIO_PRECOPY_INFO_REINIT`); only meaningful after
    /// [`enable_precopy_info_v2`] succeeded, false otherwise.
    pub reinit: bool,
}

impl PrecopyInfo {
    /// Decodes the kernel's answer; `v2` says whether the REINIT opt-in is in force.
    pub fn from_raw(info: &vfio_precopy_info, v2: bool) -> Self {
        Self {
            initial_bytes: info.initial_bytes,
            dirty_bytes: info.dirty_bytes,
            reinit: v2 && info.flags & VFIO_PRECOPY_INFO_REINIT != 0,
        }
    }

    /// Initial plus dirty bytes, the pre-copy data currently available.
    pub fn total(&self) -> u64 {
        self.initial_bytes.saturating_add(self.dirty_bytes)
    }
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a data `session` (valid in PRE_COPY and PRE_COPY_P2P only).
pub fn precopy_info(
    dev: &dyn DeviceIo,
    session: &DataSession,
    v2: bool,
) -> io::Result<PrecopyInfo> {
    Ok(PrecopyInfo::from_raw(&dev.precopy_info(session)?, v2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precopy_info_reinit_only_with_the_v2_opt_in() {
        let raw = vfio_precopy_info {
            argsz: 24,
            flags: VFIO_PRECOPY_INFO_REINIT,
            initial_bytes: 24,
            dirty_bytes: 8,
        };
        let v1 = PrecopyInfo::from_raw(&raw, false);
        assert!(!v1.reinit);
        assert_eq!(v1.total(), 32);
        assert!(PrecopyInfo::from_raw(&raw, true).reinit);
    }
}
