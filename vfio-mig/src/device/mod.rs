// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device access layer: what a VFIO device file descriptor offers, as a trait.
//!
//! Everything above this layer (the v1 and v2 protocol drivers, the engine) talks to a
//! [`DeviceIo`]. Three implementations exist: [`vfio::VfioDeviceIo`], a real device opened through
//! `vfio-ioctls` whose methods are the real syscalls on the device fd, the mock mediated
//! device in the `vfio-mig-mock` crate, an in-process vendor-driver emulation, and vfio-user
//! devices in the `vfio-mig-user` crate, each method a message on a server's socket. Because the trait speaks
//! the kernel's own byte-level ioctl formats (argsz-sized buffers, capability chains, the
//! `VFIO_DEVICE_FEATURE` argument), every line of protocol code runs against both.

pub(crate) mod backend;
#[cfg(feature = "iommufd")]
pub(crate) mod hwpt;
pub(crate) mod mapping;
pub(crate) mod pod;
pub(crate) mod region;
pub(crate) mod session;
pub(crate) mod vfio;

use std::io;

pub(crate) use mapping::Mapping;
pub(crate) use session::DataSession;

/// What identifies a device's migration data format, so a destination can refuse a stream
/// it cannot load (carried in the stream header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// A stable name of the device model, e.g. `mdev:mtty-2`, `pci:8086:1234` or `mock:v1`.
    pub model: String,
    /// A human-readable name of this instance (sysfs path, mock spec).
    pub instance: String,
}

/// The answer to `VFIO_DEVICE_GET_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`.
    pub flags: u32,
    /// Number of regions; region indexes run from 0 to `num_regions - 1`.
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
}

/// One IOVA range to log DMA writes in (`struct vfio_device_feature_dma_logging_range`:
/// `iova`, `length`), as [`DeviceIo::dma_logging_start`] takes them.
pub type DmaLoggingRange = vfio_bindings::bindings::vfio::vfio_device_feature_dma_logging_range;

/// The answer to `VFIO_MIG_GET_PRECOPY_INFO` (`struct vfio_precopy_info`).
pub(crate) type RawPrecopyInfo = vfio_bindings::bindings::vfio::vfio_precopy_info;

fn not_supported<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::ENOTTY))
}

/// The operations of a VFIO device file descriptor.
///
/// Methods mirror the kernel interface one to one and keep its semantics (offsets into the
/// device fd, errnos), but every argument is typed: no method takes a buffer that carries
/// addresses or descriptors, so no implementation or caller can be made to read or write
/// memory it was not given. Packing the `VFIO_DEVICE_FEATURE` argument (header, payload, the
/// addresses of a range array or a bitmap) happens inside the real device
/// ([`vfio::VfioDeviceIo`]), next to the ioctl that needs it. Implementations must be safe to
/// call from several threads, as a VMM's vCPU and migration threads may share a device.
///
/// The v2 migration methods (`VFIO_DEVICE_FEATURE`) default to `ENOTTY`, the answer of a
/// device (or kernel) without the feature ioctl, so a v1-only device implements none of them.
///
/// A raw feature buffer cannot be passed any more; this no longer compiles:
///
/// ```compile_fail,E0599
/// # fn f(dev: &dyn vfio_mig::backend::DeviceIo) {
/// let mut arg = [0u8; 32]; // a DMA_LOGGING_START header and a payload whose `ranges` is 0x10
/// dev.device_feature(&mut arg);
/// # }
/// ```
pub trait DeviceIo: Send + Sync {
    /// Who this device is, for logs and for the stream header.
    fn identity(&self) -> DeviceIdentity;

    /// `VFIO_DEVICE_GET_INFO`.
    fn device_info(&self) -> io::Result<DeviceInfo>;

    /// `VFIO_DEVICE_GET_REGION_INFO` on a caller-sized buffer that starts with a
    /// `vfio_region_info` whose `argsz` and `index` are set. As in the kernel, when the buffer
    /// is too small for the capability chain, only `argsz` is raised to the size needed and
    /// `VFIO_REGION_INFO_FLAG_CAPS` is set; [`region::query_region`] handles the retry. (The
    /// buffer holds only sizes, offsets and flags: the kernel writes within `argsz`, which an
    /// implementation checks against the buffer's length.)
    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()>;

    /// `pread(2)` on the device fd at an absolute device-fd offset.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// `pwrite(2)` on the device fd at an absolute device-fd offset.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize>;

    /// `mmap(2)` of `len` bytes of the device fd at an absolute device-fd offset, shared.
    fn mmap(&self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping>;

    /// `VFIO_DEVICE_RESET`, issued whether or not the device advertises
    /// `VFIO_DEVICE_FLAGS_RESET` (mtty resets without advertising it).
    fn reset(&self) -> io::Result<()>;

    /// `VFIO_DEVICE_FEATURE` with `PROBE`: `Ok` when the device offers feature `feature`
    /// (an index, at most `VFIO_DEVICE_FEATURE_MASK`) for the `access` bits
    /// (`VFIO_DEVICE_FEATURE_GET` and/or `VFIO_DEVICE_FEATURE_SET`).
    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        let _ = (feature, access);
        not_supported()
    }

    /// GET of `VFIO_DEVICE_FEATURE_MIGRATION`: the `VFIO_MIGRATION_*` flags.
    fn migration_flags(&self) -> io::Result<u64> {
        not_supported()
    }

    /// GET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: the raw `vfio_device_mig_state`.
    fn mig_state(&self) -> io::Result<u32> {
        not_supported()
    }

    /// SET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` to the raw state `state`. Returns the data
    /// session the transition opened (a kernel device: its `data_fd` >= 0, a new descriptor
    /// owned by the caller), or `None` when it opened none (-1).
    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        let _ = state;
        not_supported()
    }

    /// GET of `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the estimated `stop_copy_length`.
    fn mig_data_size(&self) -> io::Result<u64> {
        not_supported()
    }

    /// SET of `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (an empty payload): opts in to
    /// `VFIO_PRECOPY_INFO_REINIT` in [`DeviceIo::precopy_info`]'s flags.
    fn enable_precopy_info_v2(&self) -> io::Result<()> {
        not_supported()
    }

    /// `VFIO_MIG_GET_PRECOPY_INFO` on a data `session` this device opened.
    fn precopy_info(&self, session: &DataSession) -> io::Result<RawPrecopyInfo> {
        let _ = session;
        not_supported()
    }

    /// SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` for `ranges` with `page_size` as the
    /// requested granularity. Returns the page size the device chose.
    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        let _ = (ranges, page_size);
        not_supported()
    }

    /// SET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
    fn dma_logging_stop(&self) -> io::Result<()> {
        not_supported()
    }

    /// GET of `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: reads and clears the log of
    /// `[iova, iova + length)` at `page_size` granularity into `bitmap` (bit `n`, i.e. word
    /// `n / 64` bit `n % 64`, is page `iova + n * page_size`; bits are only set). A `bitmap`
    /// shorter than the `ceil(ceil(length / page_size) / 64)` words the kernel may write is
    /// refused with `EINVAL` before any call.
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        let _ = (iova, length, page_size, bitmap);
        not_supported()
    }

    /// One read of a data `session` this device opened, with `read(2)`'s answers (0 at the
    /// end, ENOMSG at pre-copy's temporary end). The default is the syscall on the session's
    /// fd, which is what a kernel device needs. An emulated device overrides it when its data
    /// fd must answer what a real fd it can create cannot (ENOMSG), and a device without a
    /// data fd moves the data itself.
    fn read_data(&self, session: &DataSession, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(session.require_fd()?, buf)?)
    }

    /// One write to a data `session` this device opened, with `write(2)`'s answers (see
    /// [`DeviceIo::read_data`]: an emulated device may refuse bad data inside the write, with
    /// the errno its kernel driver returns).
    fn write_data(&self, session: &DataSession, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(session.require_fd()?, buf)?)
    }
}

/// How many `u64` words a DMA logging bitmap for `length` bytes at `page_size` needs (one bit
/// per page, as the kernel's `iova_bitmap` counts them); `None` for a zero page size.
pub fn dma_bitmap_words(length: u64, page_size: u64) -> Option<u64> {
    if page_size == 0 {
        return None;
    }
    Some(length.div_ceil(page_size).div_ceil(64))
}

/// Checks that a bitmap of `words` `u64`s holds every bit of a DMA logging report of
/// `length` bytes at `page_size`: `EINVAL` for a zero page size, else an
/// [`io::ErrorKind::InvalidInput`] error saying how many words it needs.
pub fn check_dma_bitmap(length: u64, page_size: u64, words: usize) -> io::Result<()> {
    let need = dma_bitmap_words(length, page_size)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    if (words as u64) < need {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a DMA log of {length} bytes at {page_size}-byte pages needs {need} bitmap \
                 words, not {words}"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_bitmap_needs_one_bit_per_page() {
        assert_eq!(dma_bitmap_words(0x8000, 4096), Some(1));
        assert_eq!(dma_bitmap_words(65 * 4096, 4096), Some(2));
        assert_eq!(dma_bitmap_words(1, 4096), Some(1));
        assert_eq!(dma_bitmap_words(0, 4096), Some(0));
        assert_eq!(dma_bitmap_words(1, 0), None);
        assert!(check_dma_bitmap(65 * 4096, 4096, 2).is_ok());
        let short = check_dma_bitmap(65 * 4096, 4096, 1).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            check_dma_bitmap(1, 0, 8).unwrap_err().raw_os_error(),
            Some(libc::EINVAL)
        );
        assert!(check_dma_bitmap(0, 4096, 0).is_ok());
    }
}
