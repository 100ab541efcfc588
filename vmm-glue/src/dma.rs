// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One VFIO container per VM: its devices, guest memory DMA-mapped into it, and the type1
//! container's dirty-page tracking.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_bitmap, vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get, VFIO_BASE,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd};
use vfio_mig::backend::DeviceIo;
use vfio_mig::VfioDeviceIo;
use vm_memory::GuestMemoryBackend;

use crate::dirty::{DirtyTracker, MemoryRange};
use crate::error::{GlueError, Result};

nix::ioctl_readwrite_bad!(
    /// `VFIO_IOMMU_DIRTY_PAGES` on a type1 container fd, with an argsz-sized buffer.
    iommu_dirty_pages,
    nix::request_code_none!(VFIO_TYPE, VFIO_BASE + 17),
    u8
);

/// The VM's VFIO container (type1), shared by all its devices.
pub struct VmContainer {
    container: Arc<VfioContainer>,
}

impl std::fmt::Debug for VmContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmContainer")
            .field("fd", &self.container.as_raw_fd())
            .finish()
    }
}

impl VmContainer {
    /// Opens `/dev/vfio/vfio`. With `kvm_device` (see [`crate::kvm`]), every group added to the
    /// container is also registered with KVM's VFIO device, as a VMM must do.
    pub fn new(kvm_device: Option<Arc<VfioDeviceFd>>) -> Result<Self> {
        let container = VfioContainer::new(kvm_device).map_err(|e| GlueError::Open {
            what: "VFIO container /dev/vfio/vfio".into(),
            source: e,
        })?;
        Ok(Self {
            container: Arc::new(container),
        })
    }

    /// Opens the device at `path` in this container, ready for vfio-mig.
    pub fn open_device(&self, path: &Path) -> Result<Arc<dyn DeviceIo>> {
        let device =
            VfioDevice::new(path, self.container.clone(), false).map_err(|e| GlueError::Open {
                what: path.display().to_string(),
                source: e,
            })?;
        Ok(Arc::new(VfioDeviceIo::from_vfio_device(device, path)))
    }

    /// DMA-maps every region of guest memory at IOVA = guest physical address.
    ///
    /// # Safety
    /// The caller keeps `mem` mapped (and does not remap it) until
    /// [`unmap_guest_memory`](Self::unmap_guest_memory), and never creates Rust references to
    /// memory a device may write (vm-memory's volatile accessors are fine).
    pub unsafe fn map_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        // SAFETY: forwarded to the caller, see this function's contract.
        unsafe { self.container.vfio_map_guest_memory(mem) }.map_err(|source| GlueError::DmaMap {
            what: "map",
            source,
        })
    }

    /// Removes the DMA mappings of guest memory.
    pub fn unmap_guest_memory<M: GuestMemoryBackend>(&self, mem: &M) -> Result<()> {
        self.container
            .vfio_unmap_guest_memory(mem)
            .map_err(|source| GlueError::DmaMap {
                what: "unmap",
                source,
            })
    }

    /// The container's dirty-page tracker (type1 `VFIO_IOMMU_DIRTY_PAGES`).
    pub fn dirty_tracker(&self) -> ContainerDirtyPages {
        ContainerDirtyPages {
            container: self.container.clone(),
            started: false,
        }
    }
}

/// The type1 container's dirty-page bitmap: the pages the IOMMU (or, for mediated devices,
/// the vendor driver's pinning) saw written, for all devices of the container.
pub struct ContainerDirtyPages {
    container: Arc<VfioContainer>,
    started: bool,
}

impl std::fmt::Debug for ContainerDirtyPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDirtyPages")
            .field("fd", &self.container.as_raw_fd())
            .field("started", &self.started)
            .finish()
    }
}

impl ContainerDirtyPages {
    fn ioctl(&self, buf: &mut [u8], what: &str) -> Result<()> {
        // SAFETY: `buf` starts with a vfio_iommu_type1_dirty_bitmap whose argsz covers the
        // buffer (and, for GET_BITMAP, its payload points at a live bitmap of the size it
        // declares); the container fd is owned by `self.container`.
        unsafe { iommu_dirty_pages(self.container.as_raw_fd(), buf.as_mut_ptr()) }.map_err(
            |e| GlueError::DirtyLog {
                id: "type1 container".into(),
                detail: format!("VFIO_IOMMU_DIRTY_PAGES {what}: {e}"),
            },
        )?;
        Ok(())
    }

    fn control(&self, flag: u32, what: &str) -> Result<()> {
        let header = std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>();
        let mut buf = vec![0u8; header];
        buf[0..4].copy_from_slice(&(header as u32).to_ne_bytes());
        buf[4..8].copy_from_slice(&flag.to_ne_bytes());
        self.ioctl(&mut buf, what)
    }
}

impl DirtyTracker for ContainerDirtyPages {
    fn start(&mut self, _ranges: &[MemoryRange], _page_size: u64) -> Result<()> {
        // The container tracks every DMA mapping; the ranges are chosen at report time.
        self.control(VFIO_IOMMU_DIRTY_PAGES_FLAG_START, "START")?;
        self.started = true;
        Ok(())
    }

    fn report(&mut self, range: MemoryRange, page_size: u64) -> Result<Vec<u64>> {
        let pages = range.length.div_ceil(page_size.max(1));
        let mut bitmap = vec![0u64; pages.div_ceil(64) as usize];
        let header = std::mem::size_of::<vfio_iommu_type1_dirty_bitmap>();
        let get = vfio_iommu_type1_dirty_bitmap_get {
            iova: range.gpa,
            size: range.length,
            bitmap: vfio_bitmap {
                pgsize: page_size,
                size: (bitmap.len() * 8) as u64,
                data: bitmap.as_mut_ptr(),
            },
        };
        let total = header + std::mem::size_of::<vfio_iommu_type1_dirty_bitmap_get>();
        let mut buf = vec![0u8; total];
        buf[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
        buf[4..8].copy_from_slice(&VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP.to_ne_bytes());
        // SAFETY: `buf` has room for the payload after the header; `get` is a plain struct
        // whose bytes are copied as is (its pointer stays valid: `bitmap` outlives the ioctl).
        unsafe {
            std::ptr::write_unaligned(
                buf.as_mut_ptr()
                    .add(header)
                    .cast::<vfio_iommu_type1_dirty_bitmap_get>(),
                get,
            )
        };
        self.ioctl(&mut buf, "GET_BITMAP")?;
        Ok(bitmap)
    }

    fn stop(&mut self) -> Result<()> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        self.control(VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, "STOP")
    }
}

impl Drop for ContainerDirtyPages {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("{}", vfio_mig::error::Report(&e));
        }
    }
}
