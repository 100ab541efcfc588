// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The KVM side: the VM's KVM VFIO device (`KVM_DEV_TYPE_VFIO`), to which a VMM attaches every
//! VFIO group (or cdev) so KVM can coordinate with it, and KVM's own dirty log.

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_CREATE_DEVICE_TEST};
use kvm_ioctls::{DeviceFd, VmFd};
use vfio_ioctls::VfioDeviceFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::dirty::MemoryRangeTable;
use crate::error::{GlueError, Result};

fn kvm_err(what: &str, e: impl std::fmt::Display) -> GlueError {
    GlueError::Kvm {
        what: what.into(),
        detail: e.to_string(),
    }
}

/// Whether `vm` can create a KVM VFIO device (`KVM_CREATE_DEVICE` with the test flag).
pub fn vfio_device_supported(vm: &VmFd) -> Result<bool> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: KVM_CREATE_DEVICE_TEST,
    };
    match vm.create_device(&mut dev) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == libc::ENODEV => Ok(false),
        Err(e) => Err(kvm_err("KVM_CREATE_DEVICE (test)", e)),
    }
}

/// Creates the VM's KVM VFIO device.
pub fn create_vfio_device(vm: &VmFd) -> Result<DeviceFd> {
    let mut dev = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut dev)
        .map_err(|e| kvm_err("KVM_CREATE_DEVICE (VFIO)", e))
}

/// The handle [`crate::dma::VmContainer::new`] takes so that groups are attached to KVM.
pub fn container_handle(device: DeviceFd) -> std::sync::Arc<VfioDeviceFd> {
    std::sync::Arc::new(VfioDeviceFd::new_from_kvm(device))
}

/// Merges KVM's dirty log of memory slot `slot` (backing `region`) into vm-memory's bitmap
/// of that region, so one bitmap holds vCPU and device writes.
pub fn merge_kvm_dirty_log(
    vm: &VmFd,
    slot: u32,
    mem: &GuestMemoryMmap<AtomicBitmap>,
    region_index: usize,
    page_size: u64,
) -> Result<MemoryRangeTable> {
    let region = mem.iter().nth(region_index).ok_or_else(|| {
        kvm_err(
            "dirty log",
            format!("no guest memory region {region_index}"),
        )
    })?;
    let words = vm
        .get_dirty_log(slot, region.len() as usize)
        .map_err(|e| kvm_err("KVM_GET_DIRTY_LOG", e))?;
    let table = MemoryRangeTable::from_bitmap(&words, region.start_addr().0, page_size);
    table.mark_dirty(mem);
    Ok(table)
}
