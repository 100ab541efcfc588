// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a device backend needs: the [`DeviceIo`] trait a device implements (the real VFIO
//! device, the mock mediated device of crate `vfio-mig-mock`, a vfio-user server's device),
//! the types its methods take, the region-info encoding it answers in, and the rules of the
//! two protocols a faithful emulation keeps ([`v1_state`], [`v2_state`], [`v2_feature`]).
//! The protocol drivers over a `DeviceIo` ([`V1Device`], [`V2Device`]) are here too, for
//! tools that look below the [`MigrationDevice`](crate::MigrationDevice) trait (`probe`).

pub use crate::device::mapping::Mapping;
pub use crate::device::pod::{read_pod, write_pod};
pub use crate::device::region::{query_region, RegionCap, RegionInfo, SparseArea};
pub use crate::device::session::DataSession;
pub use crate::device::{
    check_dma_bitmap, dma_bitmap_words, DeviceIdentity, DeviceInfo, DeviceIo, DmaLoggingRange,
};
#[cfg(feature = "v1")]
pub use crate::v1::driver::V1Device;
#[cfg(feature = "v1")]
pub use crate::v1::region::{find_migration_region, MigrationRegion};
#[cfg(feature = "v1")]
pub use crate::v1::state as v1_state;
pub use crate::v2::data::{DataFd, DataRead};
pub use crate::v2::driver::{OnFailure, V2Device};
pub use crate::v2::feature as v2_feature;
pub use crate::v2::state as v2_state;
