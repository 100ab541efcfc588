// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty tracking of an iommufd hardware page table (HWPT), the IOMMU's own record of the
//! pages devices wrote by DMA.
//!
//! Three ioctls of `/dev/iommu` (include/uapi/linux/iommufd.h, kernel 6.7 and later):
//! - `IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`: a paging HWPT over an IOAS
//!   whose domain can track dirty pages; the kernel refuses it (`EOPNOTSUPP`) when the
//!   device's IOMMU lacks `IOMMU_CAP_DIRTY_TRACKING`. The device is then attached to that HWPT
//!   (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` with its id), which is the caller's business;
//! - `IOMMU_HWPT_SET_DIRTY_TRACKING`: on or off. Turning it on first clears every dirty bit
//!   of the domain (drivers/iommu/iommufd/io_pagetable.c, `iopt_set_dirty_tracking`), so a
//!   read after it reports only what was written since;
//! - `IOMMU_HWPT_GET_DIRTY_BITMAP`: the dirty pages of an IOVA range as a bitmap of
//!   `page_size` pages, bit `i` (word `i / 64`, bit `i % 64`) for the page at
//!   `iova + i * page_size`. It clears what it reports unless
//!   `IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR` is given (meant for a read right before an unmap).
//!
//! The kernel only *sets* bits in the caller's bitmap (drivers/iommu/iommufd/iova_bitmap.c),
//! so every read here starts from a zeroed buffer. The bitmap is written through a user
//! pointer: [`DirtyRange`] checks the range the way the kernel does
//! (`iommufd_check_iova_range`: non-empty, `iova` and `length` multiples of `page_size`, no
//! overflow) and insists on a power-of-two `page_size`, because the kernel derives the bit
//! index from the lowest set bit of `page_size`; only then is the number of bits, and so the
//! size of the buffer, what the kernel will write.
//!
//! QEMU uses the same sequence (backends/iommufd.c, hw/vfio/iommufd.c): allocate the HWPT
//! with the dirty flag when the device's hardware info reports
//! `IOMMU_HW_CAP_DIRTY_TRACKING`, switch tracking on at the start of a live migration, read
//! the bitmap per DMA-mapped range, switch it off at the end.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_hwpt_alloc, iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use nix::errno::Errno;

mod ioctl {
    use super::*;
    use nix::{ioctl_write_ptr_bad, request_code_none};

    // iommufd's ioctls are `_IO(IOMMUFD_TYPE, cmd)`: the argument's size travels in its own
    // `size` field, not in the request code.
    ioctl_write_ptr_bad!(
        set_dirty_tracking,
        request_code_none!(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING),
        iommu_hwpt_set_dirty_tracking
    );
    ioctl_write_ptr_bad!(
        get_dirty_bitmap,
        request_code_none!(IOMMUFD_TYPE, IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP),
        iommu_hwpt_get_dirty_bitmap
    );
}

/// The largest bitmap one read may ask for, in pages (bits): 2^31, a 256 MiB bitmap, 8 TiB of
/// IOVA at 4 KiB pages. Larger ranges are read in pieces; the cap keeps one read from asking
/// for an allocation the caller did not mean.
pub(crate) const MAX_DIRTY_BITMAP_PAGES: u64 = 1 << 31;

/// What went wrong with a HWPT.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HwptError {
    /// An ioctl failed; `errno` is the kernel's answer.
    #[error("{op} on {what}: {errno}")]
    Ioctl {
        /// The ioctl, e.g. `IOMMU_HWPT_GET_DIRTY_BITMAP`.
        op: &'static str,
        /// Its object, e.g. `HWPT 5` or `device 3 over IOAS 2`.
        what: String,
        /// The kernel's error.
        errno: Errno,
    },
    /// A dirty-bitmap range the kernel would refuse or that this module will not ask for.
    #[error(
        "dirty bitmap range iova {iova:#x} length {length:#x} page size {page_size:#x}: {why}"
    )]
    BadRange {
        /// Start IOVA.
        iova: u64,
        /// Length in bytes.
        length: u64,
        /// Bytes per bit.
        page_size: u64,
        /// Which rule it breaks.
        why: &'static str,
    },
    /// The caller's bitmap buffer is smaller than the range needs.
    #[error("dirty bitmap buffer of {have} words, the range needs {need}")]
    BufferTooSmall {
        /// Words given.
        have: usize,
        /// Words needed.
        need: usize,
    },
}

impl HwptError {
    /// The kernel's errno, for an ioctl that failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            HwptError::Ioctl { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// An IOVA range to read dirty bits of, checked: non-empty, `iova` and `length` multiples of
/// `page_size`, `page_size` a power of two, no overflow, at most `MAX_DIRTY_BITMAP_PAGES`
/// pages. Its fields are private so that a range, once built, is always one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRange {
    iova: u64,
    length: u64,
    page_size: u64,
}

impl DirtyRange {
    /// Checks and builds a range.
    pub fn new(iova: u64, length: u64, page_size: u64) -> Result<Self, HwptError> {
        let bad = |why| HwptError::BadRange {
            iova,
            length,
            page_size,
            why,
        };
        if !page_size.is_power_of_two() {
            return Err(bad("page size is not a power of two"));
        }
        if length == 0 {
            return Err(bad("empty range"));
        }
        if iova % page_size != 0 || length % page_size != 0 {
            return Err(bad("iova and length must be multiples of the page size"));
        }
        if iova.checked_add(length - 1).is_none() {
            return Err(bad("range passes the end of the address space"));
        }
        if length / page_size > MAX_DIRTY_BITMAP_PAGES {
            return Err(bad("more pages than one read may ask for"));
        }
        Ok(Self {
            iova,
            length,
            page_size,
        })
    }

    /// Start IOVA.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Length in bytes.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Bytes per bit.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Pages (bits) in the range.
    pub fn pages(&self) -> u64 {
        self.length / self.page_size
    }

    /// 64-bit words of bitmap the range needs.
    pub fn bitmap_words(&self) -> usize {
        // At most 2^31 / 64 words: fits any usize of 32 bits or more.
        self.pages().div_ceil(64) as usize
    }
}

/// Whether a read clears what it reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Report and clear (the default): the next read reports only newer writes.
    #[default]
    Clear,
    /// Report and keep the bits (`IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR`).
    NoClear,
}

/// A paging HWPT of an iommufd whose dirty pages can be tracked and read.
///
/// Made by [`DirtyHwpt::alloc`] (owned: destroyed on drop) or [`DirtyHwpt::from_id`] (an HWPT
/// someone else allocated and destroys).
pub struct DirtyHwpt {
    iommufd: Arc<IommuFd>,
    id: u32,
    owned: bool,
}

impl std::fmt::Debug for DirtyHwpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyHwpt")
            .field("iommufd", &self.iommufd.as_raw_fd())
            .field("id", &self.id)
            .field("owned", &self.owned)
            .finish()
    }
}

impl DirtyHwpt {
    /// `IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` for the bound device
    /// `dev_id`, over the IOAS (or parent HWPT) `pt_id`. Fails with `EOPNOTSUPP` when the
    /// device's IOMMU cannot track dirty pages.
    pub fn alloc(iommufd: Arc<IommuFd>, dev_id: u32, pt_id: u32) -> Result<Self, HwptError> {
        let mut arg = iommu_hwpt_alloc {
            size: std::mem::size_of::<iommu_hwpt_alloc>() as u32,
            flags: iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id,
            pt_id,
            ..Default::default()
        };
        iommufd
            .alloc_iommu_hwpt(&mut arg)
            .map_err(|e| HwptError::Ioctl {
                op: "IOMMU_HWPT_ALLOC(DIRTY_TRACKING)",
                what: format!("device {dev_id} over IOAS/HWPT {pt_id}"),
                errno: iommufd_errno(&e),
            })?;
        Ok(Self {
            iommufd,
            id: arg.out_hwpt_id,
            owned: true,
        })
    }

    /// An existing HWPT `hwpt_id` of `iommufd` (allocated with the dirty-tracking flag by
    /// someone else, who also destroys it): nothing is checked until the first ioctl.
    pub fn from_id(iommufd: Arc<IommuFd>, hwpt_id: u32) -> Self {
        Self {
            iommufd,
            id: hwpt_id,
            owned: false,
        }
    }

    /// The HWPT's id (for `VFIO_DEVICE_ATTACH_IOMMUFD_PT`).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The iommufd it belongs to.
    pub fn iommufd(&self) -> &Arc<IommuFd> {
        &self.iommufd
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING`: on (clearing every dirty bit first) or off. An HWPT
    /// allocated without the dirty flag refuses with `EOPNOTSUPP`.
    pub fn set_dirty_tracking(&self, enable: bool) -> Result<(), HwptError> {
        let arg = iommu_hwpt_set_dirty_tracking {
            size: std::mem::size_of::<iommu_hwpt_set_dirty_tracking>() as u32,
            flags: if enable {
                iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id: self.id,
            __reserved: 0,
        };
        // SAFETY: `arg` is a complete iommu_hwpt_set_dirty_tracking whose `size` is its own
        // size; it carries no pointer, and the kernel only reads it. The fd is the iommufd
        // that `self.iommufd` keeps open.
        unsafe { ioctl::set_dirty_tracking(self.iommufd.as_raw_fd(), &arg) }.map_err(|errno| {
            HwptError::Ioctl {
                op: if enable {
                    "IOMMU_HWPT_SET_DIRTY_TRACKING(ENABLE)"
                } else {
                    "IOMMU_HWPT_SET_DIRTY_TRACKING(disable)"
                },
                what: format!("HWPT {}", self.id),
                errno,
            }
        })?;
        Ok(())
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` over `range`: a new bitmap of
    /// [`DirtyRange::bitmap_words`] words, bit `i` for the page at `iova + i * page_size`.
    pub fn read_dirty(&self, range: &DirtyRange, mode: ReadMode) -> Result<Vec<u64>, HwptError> {
        let mut bitmap = vec![0u64; range.bitmap_words()];
        self.read_dirty_into(range, mode, &mut bitmap)?;
        Ok(bitmap)
    }

    /// Like [`DirtyHwpt::read_dirty`] into the caller's `bitmap`, which needs at least
    /// [`DirtyRange::bitmap_words`] words: those are zeroed and then filled; any further words
    /// are left alone.
    pub fn read_dirty_into(
        &self,
        range: &DirtyRange,
        mode: ReadMode,
        bitmap: &mut [u64],
    ) -> Result<(), HwptError> {
        let need = range.bitmap_words();
        let Some(bitmap) = bitmap.get_mut(..need) else {
            return Err(HwptError::BufferTooSmall {
                have: bitmap.len(),
                need,
            });
        };
        // The kernel ORs bits in: start from nothing so that old bits are not reported again.
        bitmap.fill(0);
        let arg = iommu_hwpt_get_dirty_bitmap {
            size: std::mem::size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
            hwpt_id: self.id,
            flags: match mode {
                ReadMode::Clear => 0,
                ReadMode::NoClear => {
                    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
                }
            },
            __reserved: 0,
            iova: range.iova,
            length: range.length,
            page_size: range.page_size,
            data: bitmap.as_mut_ptr() as u64,
        };
        // SAFETY: `arg` is a complete iommu_hwpt_get_dirty_bitmap that the kernel only reads.
        // Its `data` points at `bitmap`, `need` writable u64 words borrowed mutably for the
        // whole call. `range` is a checked DirtyRange (power-of-two page size, iova and length
        // multiples of it), so the kernel writes at most ceil(pages / 8) bytes there
        // (iova_bitmap.c: one bit per page from `iova`), which is at most `need * 8`. The fd is
        // the iommufd that `self.iommufd` keeps open.
        unsafe { ioctl::get_dirty_bitmap(self.iommufd.as_raw_fd(), &arg) }.map_err(|errno| {
            HwptError::Ioctl {
                op: match mode {
                    ReadMode::Clear => "IOMMU_HWPT_GET_DIRTY_BITMAP",
                    ReadMode::NoClear => "IOMMU_HWPT_GET_DIRTY_BITMAP(NO_CLEAR)",
                },
                what: format!(
                    "HWPT {} iova {:#x} length {:#x} page size {:#x}",
                    self.id, range.iova, range.length, range.page_size
                ),
                errno,
            }
        })?;
        Ok(())
    }
}

impl Drop for DirtyHwpt {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.iommufd.destroy_iommu_object(self.id) {
                log::warn!("IOMMU_DESTROY of HWPT {}: {e}", self.id);
            }
        }
    }
}

/// The errno inside an iommufd-ioctls error (EIO for one that carries none).
fn iommufd_errno(e: &IommufdError) -> Errno {
    let raw = match e {
        IommufdError::IommuHwptAlloc(s) => s.errno(),
        IommufdError::OpenIommufd(io) => io.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    };
    Errno::from_raw(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_as_the_kernel_checks_them() {
        let page = 4096;
        // Accepted: bits = length / page size, words rounded up.
        let r = DirtyRange::new(0x100_0000, 65 * page, page).unwrap();
        assert_eq!((r.pages(), r.bitmap_words()), (65, 2));
        assert_eq!(
            DirtyRange::new(0, 64 * page, page).unwrap().bitmap_words(),
            1
        );
        // Refused, each for its own reason.
        for (iova, length, page_size) in [
            (0, page, 0),                                   // no page size
            (0, 3 * 4096, 3 * 4096),                        // not a power of two
            (0, 0, page),                                   // empty
            (page / 2, page, page),                         // iova unaligned
            (0, page + 1, page),                            // length unaligned
            (u64::MAX - page + 1, 2 * page, page),          // wraps
            (0, (MAX_DIRTY_BITMAP_PAGES + 1) * page, page), // too many bits
        ] {
            let e = DirtyRange::new(iova, length, page_size).unwrap_err();
            assert!(
                matches!(e, HwptError::BadRange { .. }),
                "{iova:#x}+{length:#x}/{page_size:#x}: {e}"
            );
        }
        // The largest range allowed is exactly the cap.
        let max = DirtyRange::new(0, MAX_DIRTY_BITMAP_PAGES * page, page).unwrap();
        assert_eq!(max.bitmap_words() as u64, MAX_DIRTY_BITMAP_PAGES / 64);
    }

    #[test]
    fn a_short_buffer_is_refused_before_any_ioctl() {
        // An iommufd that is not /dev/iommu: the buffer check must come first, so the ioctl
        // (which would fail differently) is never reached.
        let file = tempfile::tempfile().unwrap();
        let hwpt = DirtyHwpt::from_id(Arc::new(IommuFd::new_from_fd(file)), 1);
        let range = DirtyRange::new(0, 65 * 4096, 4096).unwrap();
        let mut one = [0u64; 1];
        let e = hwpt
            .read_dirty_into(&range, ReadMode::Clear, &mut one)
            .unwrap_err();
        assert!(
            matches!(e, HwptError::BufferTooSmall { have: 1, need: 2 }),
            "{e}"
        );
        // With room, the ioctl runs and the kernel refuses it on a regular file.
        let e = hwpt.read_dirty(&range, ReadMode::Clear).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOTTY), "{e}");
        let e = hwpt.set_dirty_tracking(true).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::ENOTTY), "{e}");
    }
}
