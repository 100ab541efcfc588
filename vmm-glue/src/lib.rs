// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vmm-glue
//!
//! What a rust-vmm VMM calls to migrate its VFIO devices with vfio-mig:
//!
//! - [`traits`]: the small traits VMMs already implement for their own devices (shaped like
//!   Cloud Hypervisor's `vm-migration`): [`Pausable`], [`Snapshottable`], [`Migratable`];
//! - [`VfioMigratable`]: a VFIO device (v1 or v2, real or mock) that implements them;
//! - [`dirty`]: device dirty tracking (v2 DMA logging, the type1 container's dirty-page bitmap,
//!   and with feature `iommufd` an iommufd HWPT's dirty bitmap, [`iommufd`]) merged into a
//!   vm-memory dirty bitmap, next to KVM's own dirty log;
//! - [`dma`]: one VFIO container for the VM's devices, with guest memory DMA-mapped;
//! - [`kvm`] (feature `kvm`): the KVM VFIO device that VFIO groups are attached to.

pub mod dirty;
pub mod dma;
pub mod error;
#[cfg(feature = "iommufd")]
pub mod iommufd;
#[cfg(feature = "kvm")]
pub mod kvm;
pub mod migratable;
pub mod traits;

pub use error::{GlueError, Result};
pub use migratable::VfioMigratable;
pub use traits::{Migratable, Pausable, Snapshottable};
