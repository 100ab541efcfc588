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
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[cfg(feature = "iommufd")]
use iommufd_ioctls::IommuFd;
use nix::sys::uio::{pread, pwrite};
use vfio_bindings::bindings::vfio::{
    vfio_device_feature_dma_logging_control, vfio_device_feature_dma_logging_report,
    vfio_device_feature_mig_data_size, vfio_device_feature_mig_state,
    vfio_device_feature_migration, vfio_device_info, vfio_precopy_info,
    VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
#[cfg(feature = "iommufd")]
use vfio_ioctls::VfioIommufd;
use vfio_ioctls::{VfioContainer, VfioDevice};

use super::backend::{Backend, DeviceAccess, Route};
use super::pod::{read_pod, write_pod, Pod};
use super::{
    check_dma_bitmap, DataSession, DeviceIdentity, DeviceInfo, DeviceIo, DmaLoggingRange, Mapping,
};

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

/// Size of the `vfio_device_feature` header (`argsz`, `flags`) before a feature's payload.
const FEATURE_HEADER_LEN: usize = 8;
/// The largest feature argument issued: the header and a DMA logging report.
const MAX_FEATURE_ARG: usize =
    FEATURE_HEADER_LEN + size_of::<vfio_device_feature_dma_logging_report>();

/// A `VFIO_DEVICE_FEATURE` payload: a kernel struct, or nothing.
trait FeaturePayload {
    /// Writes the payload at the start of `out`.
    fn put(&self, out: &mut [u8]);
    /// Reads the answered payload from the start of `from`.
    fn take(&mut self, from: &[u8]);
}

impl FeaturePayload for () {
    fn put(&self, _out: &mut [u8]) {}
    fn take(&mut self, _from: &[u8]) {}
}

impl<T: Pod> FeaturePayload for T {
    fn put(&self, out: &mut [u8]) {
        write_pod(out, 0, self);
    }
    fn take(&mut self, from: &[u8]) {
        if let Some(v) = read_pod(from, 0) {
            *self = v;
        }
    }
}

/// The `vfio_device_feature` argument for `flags` and `payload`: the buffer and its length
/// (`argsz`).
fn pack_feature<T: FeaturePayload>(flags: u32, payload: &T) -> ([u8; MAX_FEATURE_ARG], usize) {
    let len = FEATURE_HEADER_LEN + size_of::<T>();
    let mut buf = [0u8; MAX_FEATURE_ARG];
    buf[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&flags.to_ne_bytes());
    payload.put(&mut buf[FEATURE_HEADER_LEN..len]);
    (buf, len)
}

/// A VFIO device: opened by its sysfs path (through a type1 container and its group, or
/// through iommufd and its cdev), or the device fd a VMM already holds.
pub struct VfioDeviceIo {
    /// What keeps the device fd open: the `VfioDevice` this crate opened (with its container
    /// or iommufd), or the VMM's own holder. Only the fd is used.
    device: Box<dyn AsRawFd + Send + Sync>,
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
    crate::error::Report(e).to_string()
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
            Route::Iommufd { cdev } => open_cdev(path, cdev)?,
        };
        log::debug!("{} ({}): {detail}", path.display(), route.backend());
        Ok(Self {
            device: Box::new(device),
            path: path.to_path_buf(),
            model: model_of(path),
            access: DeviceAccess {
                backend: route.backend(),
                detail,
            },
        })
    }

    /// Wraps the VFIO device fd a VMM already holds, in whatever keeps it open: an
    /// [`OwnedFd`] (a `dup` of the VMM's fd), an `Arc<File>`, any type that implements
    /// [`AsFd`](std::os::fd::AsFd). Its container or IOAS and its DMA maps stay the VMM's:
    /// this issues only device ioctls, reads, writes and mmaps on the fd. `path` is the
    /// device's sysfs path, for its model and name. A descriptor that is not a VFIO device
    /// (neither a group's `anon_inode:[vfio-device]` nor a `vfio-dev` cdev) is refused with
    /// [`io::ErrorKind::InvalidInput`].
    pub fn from_fd<F>(holder: F, path: &Path) -> io::Result<Self>
    where
        F: std::os::fd::AsFd + Send + Sync + 'static,
    {
        Self::from_holder(Box::new(FdHolder(holder)), path)
    }

    /// [`from_fd`](Self::from_fd) for a holder that offers only [`AsRawFd`], such as
    /// `Arc<VfioDevice>` of any vfio-ioctls version (Cloud Hypervisor's holder).
    ///
    /// # Safety
    /// `holder.as_raw_fd()` must return the same open descriptor for as long as `holder`
    /// lives, and nothing may close it meanwhile (what [`AsFd`](std::os::fd::AsFd) promises
    /// for the types that implement it).
    pub unsafe fn from_raw_fd_holder<F>(holder: F, path: &Path) -> io::Result<Self>
    where
        F: AsRawFd + Send + Sync + 'static,
    {
        Self::from_holder(Box::new(holder), path)
    }

    fn from_holder(device: Box<dyn AsRawFd + Send + Sync>, path: &Path) -> io::Result<Self> {
        let target = fd_target(device.as_raw_fd());
        let backend = vfio_fd_backend(device.as_raw_fd(), &target).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: descriptor {} ({target}) is not a VFIO device fd",
                    path.display(),
                    device.as_raw_fd()
                ),
            )
        })?;
        let detail = format!("the caller's device fd ({backend}); {target}");
        Ok(Self {
            device,
            path: path.to_path_buf(),
            model: model_of(path),
            access: DeviceAccess { backend, detail },
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
            device: Box::new(device),
            path: path.to_path_buf(),
            model: model_of(path),
            access: DeviceAccess { backend, detail },
        }
    }

    /// How the device was opened: the backend (group or iommufd) and what it opened.
    pub fn access(&self) -> &DeviceAccess {
        &self.access
    }

    /// `VFIO_DEVICE_FEATURE` with `flags` and the payload `payload` (`()` for none): packs
    /// the `vfio_device_feature` header and the payload into one buffer, issues the ioctl
    /// and copies the answered payload back.
    fn feature<T: FeaturePayload>(&self, flags: u32, payload: &mut T) -> io::Result<()> {
        let (mut buf, len) = pack_feature(flags, payload);
        let arg = &mut buf[..len];
        // SAFETY: `arg` is a writable `vfio_device_feature` of `argsz` = its length bytes: the
        // header then the payload, within which the kernel reads and writes. The payloads
        // that carry addresses (DMA logging START and REPORT) are built by this type's
        // methods from slices borrowed across this call and sized for what the kernel
        // accesses there; no payload carries a descriptor in.
        unsafe { ioctls::device_feature(self.device.as_raw_fd(), arg.as_mut_ptr()) }
            .map_err(errno)?;
        payload.take(&arg[FEATURE_HEADER_LEN..]);
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.device`, which outlives the borrow.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }
}

/// The device fd (for a VMM that hands a `dup` of it to another holder).
impl std::os::fd::AsFd for VfioDeviceIo {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// A holder that keeps a descriptor open by the I/O-safe [`AsFd`](std::os::fd::AsFd).
struct FdHolder<F>(F);

impl<F: std::os::fd::AsFd> AsRawFd for FdHolder<F> {
    fn as_raw_fd(&self) -> i32 {
        self.0.as_fd().as_raw_fd()
    }
}

/// Which backend the descriptor `fd` (whose `/proc/self/fd` link reads `target`) belongs to,
/// if it is a VFIO device fd at all: a group's device fd is the anonymous inode
/// `[vfio-device]`; a cdev is a character device of the `vfio-dev` class in sysfs.
fn vfio_fd_backend(fd: i32, target: &str) -> Option<Backend> {
    if target == "anon_inode:[vfio-device]" {
        return Some(Backend::Group);
    }
    // SAFETY: fstat only reads the descriptor's metadata into the buffer nix provides; a
    // borrowed descriptor the holder keeps open for the duration of this call.
    let stat = nix::sys::stat::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFCHR {
        return None;
    }
    let (major, minor) = (libc::major(stat.st_rdev), libc::minor(stat.st_rdev));
    let class = std::fs::canonicalize(format!("/sys/dev/char/{major}:{minor}")).ok()?;
    let in_class = class
        .parent()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n == "vfio-dev");
    in_class.then_some(Backend::Iommufd)
}

/// Opens the device's cdev, bound to a new `/dev/iommu` and attached to an IOAS of it.
#[cfg(feature = "iommufd")]
fn open_cdev(path: &Path, cdev: &Path) -> io::Result<(VfioDevice, String)> {
    let iommufd = IommuFd::new()
        .map_err(|e| io::Error::other(format!("open /dev/iommu: {}", error_chain(&e))))?;
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
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", cdev.display())))?;
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
    Ok((device, detail))
}

/// Built without the `iommufd` feature: the cdev backend is not there.
#[cfg(not(feature = "iommufd"))]
fn open_cdev(path: &Path, cdev: &Path) -> io::Result<(VfioDevice, String)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{} needs the iommufd backend ({}), and vfio-mig was built without its `iommufd` \
             feature",
            path.display(),
            cdev.display()
        ),
    ))
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
        // SAFETY: the fd is this device's; the kernel maps only an mmap-capable area of one
        // of its regions (anything else fails with EINVAL), which stays backed while the
        // device is open, and a device region is never memory Rust code holds references to.
        unsafe { Mapping::new(self.fd(), offset, len, writable) }
    }

    fn reset(&self) -> io::Result<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is a live VFIO device.
        unsafe { ioctls::device_reset(self.device.as_raw_fd()) }.map_err(errno)?;
        Ok(())
    }

    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        let flags = VFIO_DEVICE_FEATURE_PROBE
            | (access & (VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET))
            | (feature & VFIO_DEVICE_FEATURE_MASK);
        self.feature(flags, &mut ())
    }

    fn migration_flags(&self) -> io::Result<u64> {
        let mut mig = vfio_device_feature_migration::default();
        self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            &mut mig,
        )?;
        Ok(mig.flags)
    }

    fn mig_state(&self) -> io::Result<u32> {
        let mut mig = vfio_device_feature_mig_state {
            device_state: 0,
            data_fd: -1,
        };
        self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &mut mig,
        )?;
        Ok(mig.device_state)
    }

    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        let mut mig = vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        };
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &mut mig,
        )?;
        if mig.data_fd < 0 {
            return Ok(None);
        }
        // SAFETY: the ioctl just succeeded and answered `data_fd` >= 0: the kernel installed a
        // new descriptor for the data session (`fd_install`) and this is its only reference in
        // the process; nothing else owns or closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(mig.data_fd) };
        Ok(Some(DataSession::from_fd(fd)))
    }

    fn mig_data_size(&self) -> io::Result<u64> {
        let mut size = vfio_device_feature_mig_data_size::default();
        self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            &mut size,
        )?;
        Ok(size.stop_copy_length)
    }

    fn enable_precopy_info_v2(&self) -> io::Result<()> {
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
            &mut (),
        )
    }

    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        let num_ranges =
            u32::try_from(ranges.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
        let mut control = vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges,
            __reserved: 0,
            // The kernel reads `num_ranges` ranges from this address (copy_from_user): the
            // slice is borrowed for the whole call and holds exactly that many.
            ranges: ranges.as_ptr() as u64,
        };
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            &mut control,
        )?;
        Ok(control.page_size)
    }

    fn dma_logging_stop(&self) -> io::Result<()> {
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            &mut (),
        )
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        if length == 0 {
            // No page to report. Not passed on: the kernel's bitmap walk counts from
            // `length - 1`, and its writes must stay inside `bitmap`.
            return Ok(());
        }
        check_dma_bitmap(length, page_size, bitmap.len())?;
        let mut report = vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            // The kernel sets bits of pages in [iova, iova + length) at this address
            // (iova_bitmap): the slice is mutably borrowed for the whole call and was checked
            // above to hold every word those bits fall in.
            bitmap: bitmap.as_mut_ptr() as u64,
        };
        self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            &mut report,
        )
    }

    fn precopy_info(&self, session: &DataSession) -> io::Result<vfio_precopy_info> {
        let data_fd = session.require_fd()?;
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

#[cfg(test)]
mod tests {
    /// A descriptor that is no VFIO device is refused, before any ioctl is issued on it.
    #[test]
    fn a_fd_that_is_no_vfio_device_is_refused() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let err =
            super::VfioDeviceIo::from_fd(file, std::path::Path::new("/sys/nothing")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().contains("not a VFIO device fd"), "{err}");
        let memfd =
            nix::sys::memfd::memfd_create("not-vfio", nix::sys::memfd::MFdFlags::empty()).unwrap();
        assert!(super::VfioDeviceIo::from_fd(memfd, std::path::Path::new("/x")).is_err());
    }

    use super::*;

    fn packed<T: FeaturePayload>(flags: u32, payload: &T) -> Vec<u8> {
        let (buf, len) = pack_feature(flags, payload);
        buf[..len].to_vec()
    }

    fn bytes(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    // A descriptor that is no VFIO device is refused before any call is issued on it.
    #[test]
    fn feature_arguments_have_the_uapi_layout() {
        let probe = VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_GET | 1;
        assert_eq!(
            packed(probe, &()),
            bytes(&[&8u32.to_ne_bytes(), &0x0005_0001u32.to_ne_bytes()])
        );
        let state = vfio_device_feature_mig_state {
            device_state: 3,
            data_fd: -1,
        };
        assert_eq!(
            packed(
                VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                &state
            ),
            bytes(&[
                &16u32.to_ne_bytes(),
                &0x0002_0002u32.to_ne_bytes(),
                &3u32.to_ne_bytes(),
                &(-1i32).to_ne_bytes(),
            ])
        );
        let ranges = [DmaLoggingRange {
            iova: 0x1000,
            length: 0x4000,
        }];
        let control = vfio_device_feature_dma_logging_control {
            page_size: 4096,
            num_ranges: 1,
            __reserved: 0,
            ranges: ranges.as_ptr() as u64,
        };
        assert_eq!(
            packed(
                VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                &control
            ),
            bytes(&[
                &32u32.to_ne_bytes(),
                &0x0002_0006u32.to_ne_bytes(),
                &4096u64.to_ne_bytes(),
                &1u32.to_ne_bytes(),
                &0u32.to_ne_bytes(),
                &(ranges.as_ptr() as u64).to_ne_bytes(),
            ])
        );
        // The range array the address points at: iova, length pairs.
        assert_eq!(size_of::<DmaLoggingRange>(), 16);
        let report = vfio_device_feature_dma_logging_report {
            iova: 0x1000,
            length: 0x8000,
            page_size: 4096,
            bitmap: 0xdead_b000,
        };
        let arg = packed(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            &report,
        );
        assert_eq!(arg.len(), MAX_FEATURE_ARG);
        assert_eq!(
            arg,
            bytes(&[
                &40u32.to_ne_bytes(),
                &0x0001_0008u32.to_ne_bytes(),
                &0x1000u64.to_ne_bytes(),
                &0x8000u64.to_ne_bytes(),
                &4096u64.to_ne_bytes(),
                &0xdead_b000u64.to_ne_bytes(),
            ])
        );
        assert_eq!(
            packed(
                VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
                &()
            ),
            bytes(&[&8u32.to_ne_bytes(), &0x0002_000cu32.to_ne_bytes()])
        );
    }

    #[test]
    fn an_answered_payload_is_read_back() {
        let mut answer = vfio_device_feature_mig_state::default();
        let mut from = [0u8; 8];
        from[4..8].copy_from_slice(&42i32.to_ne_bytes());
        answer.take(&from);
        assert_eq!(answer.data_fd, 42);
    }
}
