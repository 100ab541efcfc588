// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mock's own migration state rules, written from the kernel's uAPI text and drivers and
//! from QEMU, without reference to the `vfio-mig` driver's rule code (`vfio_mig::backend::v1_state`,
//! `vfio_mig::backend::v2_state`), so that a test comparing the two can find a mistake in either.
//!
//! * [`v2_arcs`]: the v2 FSM: a port of the kernel's `vfio_mig_get_next_state()`
//!   (drivers/vfio/vfio_main.c), the arcs a vendor driver must implement, mtty's step function.
//! * [`v1_table`]: the v1 `device_state` bit rules of the v5.17 uAPI text and the writes QEMU
//!   5.2 to 7.0 issued.
//!
//! Only constants and structs of `vfio-bindings` are shared with the driver. Where the two
//! readings differ, `tests/tests/oracle.rs` lists each case (see `docs/mock-device.md`).

pub mod v1_table;
pub mod v2_arcs;
