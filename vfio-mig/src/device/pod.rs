// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Reading and writing kernel structs at byte offsets of an ioctl buffer.
//!
//! The VFIO ioctls that return capability chains (`VFIO_DEVICE_GET_REGION_INFO`) and the
//! variable-size `VFIO_DEVICE_FEATURE` argument are byte buffers whose layout is a kernel struct
//! followed by more structs at offsets chosen by the kernel. Reading them at arbitrary offsets
//! needs unaligned, bounds-checked access: that is all this module does.

use std::mem::size_of;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_dma_logging_control, vfio_device_feature_dma_logging_range,
    vfio_device_feature_dma_logging_report, vfio_device_feature_mig_data_size,
    vfio_device_feature_mig_state, vfio_device_feature_migration, vfio_device_info,
    vfio_info_cap_header, vfio_precopy_info, vfio_region_info, vfio_region_info_cap_type,
    vfio_region_sparse_mmap_area,
};

/// Plain-old-data kernel structs: every bit pattern is a valid value and there is no padding
/// whose content matters.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs made of integers (and zero-sized array markers).
pub unsafe trait Pod: Copy + Default {}

// SAFETY: integers accept any bit pattern.
unsafe impl Pod for u32 {}
// SAFETY: as above.
unsafe impl Pod for u64 {}
// SAFETY: all of these are bindgen-generated `#[repr(C)]` structs of integer fields and
// zero-length `__IncompleteArrayField` markers; any bit pattern is a valid value.
unsafe impl Pod for vfio_region_info {}
// SAFETY: as above.
unsafe impl Pod for vfio_info_cap_header {}
// SAFETY: as above.
unsafe impl Pod for vfio_region_info_cap_type {}
// SAFETY: as above.
unsafe impl Pod for vfio_region_sparse_mmap_area {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_info {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_migration {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_mig_state {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_mig_data_size {}
// SAFETY: as above.
unsafe impl Pod for vfio_precopy_info {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_dma_logging_control {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_dma_logging_range {}
// SAFETY: as above.
unsafe impl Pod for vfio_device_feature_dma_logging_report {}

/// Reads a `T` at byte offset `offset` of `bytes`; `None` if it does not fit.
pub fn read_pod<T: Pod>(bytes: &[u8], offset: usize) -> Option<T> {
    let end = offset.checked_add(size_of::<T>())?;
    let src = bytes.get(offset..end)?;
    // SAFETY: `src` holds exactly size_of::<T>() initialized bytes, `read_unaligned` has no
    // alignment requirement, and `T: Pod` accepts any bit pattern.
    Some(unsafe { std::ptr::read_unaligned(src.as_ptr().cast::<T>()) })
}

/// Writes `value` at byte offset `offset` of `bytes`; `false` if it does not fit.
pub fn write_pod<T: Pod>(bytes: &mut [u8], offset: usize, value: &T) -> bool {
    let Some(end) = offset.checked_add(size_of::<T>()) else {
        return false;
    };
    let Some(dst) = bytes.get_mut(offset..end) else {
        return false;
    };
    // SAFETY: `dst` has room for exactly size_of::<T>() bytes and `write_unaligned` has no
    // alignment requirement; `T: Copy` so no destructor is skipped.
    unsafe { std::ptr::write_unaligned(dst.as_mut_ptr().cast::<T>(), *value) };
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_at_unaligned_offset() {
        let mut buf = [0u8; 64];
        let info = vfio_region_info {
            argsz: 32,
            flags: 9,
            index: 3,
            cap_offset: 32,
            size: 0x1234_5678_9abc,
            offset: 1 << 40,
        };
        assert!(write_pod(&mut buf, 3, &info));
        let back: vfio_region_info = read_pod(&buf, 3).unwrap();
        assert_eq!(back.size, info.size);
        assert_eq!(back.offset, info.offset);
        assert_eq!(back.index, 3);
    }

    #[test]
    fn out_of_bounds_is_refused() {
        let mut buf = [0u8; 16];
        assert!(read_pod::<vfio_region_info>(&buf, 0).is_none());
        assert!(read_pod::<vfio_info_cap_header>(&buf, usize::MAX - 2).is_none());
        assert!(write_pod(&mut buf, 8, &vfio_info_cap_header::default()));
        assert!(!write_pod(&mut buf, 12, &vfio_info_cap_header::default()));
    }
}
