// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-only tests on a second real VFIO migration driver: `igb-vfio-pci` (a `vfio-pci-core`
//! variant driver for the Intel 82576 VF, 8086:10ca) on QEMU's emulated igb VFs with the
//! migration DVSEC (`x-vf-migration=on`). They run inside the third guest that
//! `scripts/guest/igb/boot.sh` boots (see docs/guest-tests.md); run anywhere else, every test
//! fails on purpose.
//!
//! Environment set by the guest's `/init` (scripts/guest/igb/init.sh):
//! - `VFIO_MIG_IGB_VFS`: the sysfs paths of four VFs bound to igb-vfio-pci, in this order:
//!   VF 0 and VF 1 of PF A, VF 0 and VF 1 of PF B (each PF behind a PCIe root port of its own).
//! - `VFIO_MIG_BIN`: the static `vfio-mig` command; `VFIO_MIG_BACKEND`: `group`.
//!
//! The guest runs the project's own kernel (scripts/guest/ikernel.sh, with
//! `CONFIG_IOMMUFD_DRIVER`, so DMA_LOGGING_REPORT works) with both PFs' interfaces up (their
//! driver answers the VFs' mailbox messages only then).
//!
//! What the tests expect comes from the driver (`driver/main.c` of the fixture), the device
//! model (`hw/net/igb_migration.c` of the QEMU patch), the VFIO uAPI (`linux/vfio.h`) and the
//! 82576 datasheet's VF register map, never from vfio-mig itself. Tests run one at a time
//! (`--test-threads=1`). Opening a VF resets it (vfio-pci-core's open does a function level
//! reset, and igb-vfio-pci's open puts its migration state back to RUNNING), which clears the
//! queue enable bits but keeps the ring base registers the tests use as the VF's state.

#[path = "guest_igb/dirty.rs"]
mod dirty;
#[path = "guest_igb/driver.rs"]
mod driver;
#[path = "guest_igb/faults.rs"]
mod faults;
#[path = "guest_igb/migration.rs"]
mod migration;
#[path = "guest_igb/retry.rs"]
mod retry;
#[path = "guest_igb/signals.rs"]
mod signals;
#[path = "guest_igb/vf.rs"]
mod vf;
#[path = "guest_igb/vf_driver.rs"]
mod vf_driver;
