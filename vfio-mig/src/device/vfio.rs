// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The real device: a VFIO device opened through `vfio-ioctls`, driven with the real syscalls
//! on its file descriptor.
//!
//! `vfio-ioctls` opens the device, either through a type1 container and the device's group or
//! through iommufd and the device's cdev (see [`super::backend`]), and hands us the device;
//! beyond that we issue the calls ourselves on its fd, because its own wrappers fall short for
//! migration: region reads and writes swallow errors, the region list is keyed by position
//! rather than by region index, and the v2 `data_fd` is kept private so it cannot be polled or
//! spliced.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use nix::sys::uio::{pread, pwrite};
use vfio_bindings::bindings::vfio::{vfio_device_info, vfio_precopy_info, VFIO_BASE, VFIO_TYPE};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd};

use super::backend::{Backend, DeviceAccess, Route};
use super::pod::{read_pod, write_pod};
use super::{DeviceIdentity, DeviceInfo, DeviceIo, Mapping};

mod ioctls {
    use super::{VFIO_BASE, VFIO_TYPE};
    use nix::{ioctl_none_bad, ioctl_readwrite_bad, request_code_none};

    ioctl_readwrite_bad!(
        device_get_info,
        request_code_none!(VFIO_TYPE, VFIO_BASE + 7),
        u8
    );
    ioctl_readwrite_bad!(
        device_get_region_info,
        request_code_none!(VFIO_TYPE, VFIO_BASE + 8),
        u8
    );
    ioctl_none_bad!(device_reset, request_code_none!(VFIO_TYPE, VFIO_BASE + 11));
    ioctl_readwrite_bad!(
        device_feature,
        request_code_none!(VFIO_TYPE, VFIO_BASE + 17),
        u8
    );
    ioctl_readwrite_bad!(
        mig_get_precopy_info,
        request_code_none!(VFIO_TYPE, VFIO_BASE + 21),
        u8
    );
}

/// A VFIO device opened by its sysfs path, through a type1 container and its group or through
/// iommufd and its cdev.
pub struct VfioDeviceIo {
    device: VfioDevice,
    path: PathBuf,
    model: String,
    access: DeviceAccess,
}

impl std::fmt::Debug for VfioDeviceIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDeviceIo")
            .field("path", &self.path)
            .field("model", &self.model)
            .field("access", &self.access)
            .finish()
    }
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// An error and its causes on one line (`vfio-ioctls` puts the errno in a source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// What the descriptor `fd` of this process refers to (`/proc/self/fd/N`): the cdev's path
/// for iommufd, `anon_inode:[vfio-device]` for a device fd from a group.
fn fd_target(fd: i32) -> String {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("? ({e})"))
}

impl VfioDeviceIo {
    /// Opens the device at `path` (e.g. `/sys/bus/mdev/devices/<uuid>` or
    /// `/sys/bus/pci/devices/0000:01:00.0`) through `backend`. A forced backend the kernel does not
    /// offer for the device is an [`io::ErrorKind::Unsupported`] error naming what is missing.
    pub fn open_with(path: &Path, backend: Backend) -> io::Result<Self> {
        let route = backend.route(path)?;
        let (device, detail) = match &route {
            Route::Group { group } => {
                let container = VfioContainer::new(None).map_err(|e| {
                    io::Error::other(format!(
                        "open VFIO container /dev/vfio/vfio: {}",
                        error_chain(&e)
                    ))
                })?;
                let device = VfioDevice::new(path, Arc::new(container), false).map_err(|e| {
                    io::Error::other(format!(
                        "open VFIO device {} through group {group}: {}",
                        path.display(),
                        error_chain(&e)
                    ))
                })?;
                let detail = format!(
                    "group {group} (/dev/vfio/{group}) in a type1 container (/dev/vfio/vfio); \
                     device fd {}",
                    fd_target(device.as_raw_fd())
                );
                (device, detail)
            }
            Route::Iommufd { cdev } => {
                let iommufd = IommuFd::new().map_err(|e| {
                    io::Error::other(format!("open /dev/iommu: {}", error_chain(&e)))
                })?;
                let iommufd = VfioIommufd::new(Arc::new(iommufd), None, None).map_err(|e| {
                    io::Error::other(format!(
                        "allocate an IOAS in /dev/iommu: {}",
                        error_chain(&e)
                    ))
                })?;
                let iommufd = Arc::new(iommufd);
                let ioas = iommufd.ioas().id();
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(cdev)
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("open {}: {e}", cdev.display()))
                    })?;
                // Bind to the iommufd and attach to its IOAS, as a VMM does (the cdev's
                // device ioctls work only once bound).
                let device = VfioDevice::new_from_fd(file, iommufd, true).map_err(|e| {
                    io::Error::other(format!(
                        "bind {} ({}) to /dev/iommu: {}",
                        cdev.display(),
                        path.display(),
                        error_chain(&e)
                    ))
                })?;
                let detail = format!(
                    "cdev {} bound to /dev/iommu (iommufd device id {}), attached to IOAS {ioas}; \
                     device fd {}",
                    cdev.display(),
                    device
                        .iommufd_dev_id()
                        .map_or_else(|| "?".to_string(), |id| id.to_string()),
                    fd_target(device.as_raw_fd())
                );
                (device, detail)
            }
        };
        log::debug!("{} ({}): {detail}", path.display(), route.backend());
        Ok(Self {
            device,
            path: path.to_path_buf(),
            model: model_of(path),
            access: DeviceAccess {
                backend: route.backend(),
                detail,
            },
        })
    }

    /// Wraps a device a VMM already opened through its own container or iommufd (so that all
    /// of a VM's devices share the address space that maps guest memory).
    pub fn from_vfio_device(device: VfioDevice, path: &Path) -> Self {
        let backend = if device.iommufd_dev_id().is_some() {
            Backend::Iommufd
        } else {
            Backend::Group
        };
        let detail = format!(
            "opened by the caller ({backend}); device fd {}",
            fd_target(device.as_raw_fd())
        );
        Self {
            device,
            path: path.to_path_buf(),
            model: model_of(path),
            access: DeviceAccess { backend, detail },
        }
    }

    /// How the device was opened: the backend (group or iommufd) and what it opened.
    pub fn access(&self) -> &DeviceAccess {
        &self.access
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.device`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }
}

/// The device model from sysfs: the mdev type name, or the PCI vendor and device ids.
fn model_of(path: &Path) -> String {
    if let Ok(link) = std::fs::read_link(path.join("mdev_type")) {
        if let Some(name) = link.file_name() {
            return format!("mdev:{}", name.to_string_lossy());
        }
    }
    let id = |file: &str| {
        std::fs::read_to_string(path.join(file))
            .map(|s| s.trim().trim_start_matches("0x").to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!("pci:{}:{}", id("vendor"), id("device"))
}

impl DeviceIo for VfioDeviceIo {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: self.model.clone(),
            instance: self.path.display().to_string(),
        }
    }

    fn device_info(&self) -> io::Result<DeviceInfo> {
        let mut buf = vec![0u8; std::mem::size_of::<vfio_device_info>()];
        let query = vfio_device_info {
            argsz: buf.len() as u32,
            ..Default::default()
        };
        write_pod(&mut buf, 0, &query);
        // SAFETY: `buf` is a writable buffer of `argsz` bytes holding a vfio_device_info, which
        // is what VFIO_DEVICE_GET_INFO reads and fills; the fd is a live VFIO device.
        unsafe { ioctls::device_get_info(self.device.as_raw_fd(), buf.as_mut_ptr()) }
            .map_err(errno)?;
        let info: vfio_device_info = read_pod(&buf, 0).expect("sized above");
        Ok(DeviceInfo {
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        })
    }

    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()> {
        let argsz: u32 =
            read_pod(buf, 0).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if (argsz as usize) > buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: the kernel writes at most `argsz` bytes, and `buf` is at least that long.
        unsafe { ioctls::device_get_region_info(self.device.as_raw_fd(), buf.as_mut_ptr()) }
            .map_err(errno)?;
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(pread(self.fd(), buf, offset)?)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(pwrite(self.fd(), buf, offset)?)
    }

    fn mmap(&self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        Mapping::new(self.fd(), offset, len, writable)
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a live VFIO device.
        unsafe { ioctls::device_reset(self.device.as_raw_fd()) }.map_err(errno)?;
        Ok(())
    }

    fn device_feature(&self, arg: &mut [u8]) -> io::Result<i32> {
        let argsz: u32 =
            read_pod(arg, 0).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if (argsz as usize) > arg.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: `arg` holds a vfio_device_feature header and payload of `argsz` bytes; the
        // kernel reads and writes within `argsz`.
        let ret = unsafe { ioctls::device_feature(self.device.as_raw_fd(), arg.as_mut_ptr()) }
            .map_err(errno)?;
        Ok(ret)
    }

    fn precopy_info(&self, data_fd: BorrowedFd<'_>) -> io::Result<vfio_precopy_info> {
        let mut buf = vec![0u8; std::mem::size_of::<vfio_precopy_info>()];
        let query = vfio_precopy_info {
            argsz: buf.len() as u32,
            ..Default::default()
        };
        write_pod(&mut buf, 0, &query);
        // SAFETY: `buf` holds a vfio_precopy_info of `argsz` bytes, which the ioctl fills;
        // `data_fd` is a live migration data fd of this device.
        unsafe { ioctls::mig_get_precopy_info(data_fd.as_raw_fd(), buf.as_mut_ptr()) }
            .map_err(errno)?;
        Ok(read_pod(&buf, 0).expect("sized above"))
    }
}
