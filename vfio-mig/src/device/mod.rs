// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device access layer: what a VFIO device file descriptor offers, as a trait.
//!
//! Everything above this layer (the v1 and v2 protocol drivers, the engine) talks to a
//! [`DeviceIo`]. Two implementations exist: [`vfio::VfioDeviceIo`], a real device opened through
//! `vfio-ioctls` whose methods are the real syscalls on the device fd, and the mock mediated
//! device in the `vfio-mig-mock` crate, an in-process vendor-driver emulation. Because the trait speaks
//! the kernel's own byte-level ioctl formats (argsz-sized buffers, capability chains, the
//! `VFIO_DEVICE_FEATURE` argument), every line of protocol code runs against both.

pub mod backend;
pub mod mapping;
pub mod pod;
pub mod region;
pub mod vfio;

use std::io;
use std::os::fd::BorrowedFd;

pub use mapping::Mapping;
pub use region::{RegionCap, RegionInfo, SparseArea};

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

/// The operations of a VFIO device file descriptor.
///
/// Methods mirror the kernel interface one to one and keep its semantics (offsets into the
/// device fd, ioctl argument buffers). Implementations must be safe to call from several
/// threads, as a VMM's vCPU and migration threads may share a device.
pub trait DeviceIo: Send + Sync {
    /// Who this device is, for logs and for the stream header.
    fn identity(&self) -> DeviceIdentity;

    /// `VFIO_DEVICE_GET_INFO`.
    fn device_info(&self) -> io::Result<DeviceInfo>;

    /// `VFIO_DEVICE_GET_REGION_INFO` on a caller-sized buffer that starts with a
    /// `vfio_region_info` whose `argsz` and `index` are set. As in the kernel, when the buffer
    /// is too small for the capability chain, only `argsz` is raised to the size needed and
    /// `VFIO_REGION_INFO_FLAG_CAPS` is set; [`region::query_region`] handles the retry.
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

    /// `VFIO_DEVICE_FEATURE` on a buffer that starts with a `vfio_device_feature` whose
    /// `argsz` and `flags` are set, followed by the feature's payload. Returns the ioctl's
    /// non-negative return value. A `data_fd` returned in the payload (v2 state changes) is a
    /// new descriptor owned by the caller, for the mock exactly as for the kernel.
    fn device_feature(&self, arg: &mut [u8]) -> io::Result<i32>;

    /// `VFIO_MIG_GET_PRECOPY_INFO` on a migration `data_fd` this device returned.
    fn precopy_info(
        &self,
        data_fd: BorrowedFd<'_>,
    ) -> io::Result<vfio_bindings::bindings::vfio::vfio_precopy_info>;

    /// `read(2)` on a migration `data_fd` this device returned. The default is the syscall,
    /// which is what a kernel device needs. An emulated device overrides it when its data fd
    /// must answer what a real fd it can create cannot (ENOMSG at pre-copy's temporary end);
    /// it still performs the read on `data_fd` itself.
    fn read_data(&self, data_fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
        Ok(nix::unistd::read(data_fd, buf)?)
    }

    /// `write(2)` on a migration `data_fd` this device returned (see [`DeviceIo::read_data`]:
    /// an emulated device may refuse bad data inside the write, with the errno its kernel
    /// driver returns).
    fn write_data(&self, data_fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
        Ok(nix::unistd::write(data_fd, buf)?)
    }
}
