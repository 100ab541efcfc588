// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v1 migration protocol: the migration region (Linux 5.8 to 5.17 uAPI).
//!
//! A device-specific region of type 3, subtype 1 starts with `vfio_device_migration_info`
//! (`device_state`, `pending_bytes`, `data_offset`, `data_size`) followed by a data section
//! through which the device's opaque state is read (saving) or written (resuming).

pub(crate) mod driver;
pub(crate) mod region;
pub mod state;

pub(crate) use driver::V1Device;
