// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vfio-mig
//!
//! The userspace (VMM) side of Linux VFIO device migration.
//!
//! Layers, bottom up:
//! - [`device`]: what a VFIO device fd offers, as the [`device::DeviceIo`] trait, implemented
//!   by the real device ([`device::vfio::VfioDeviceIo`]) and by the mock mediated device.
//! - [`v1`]: the v1 protocol (the migration region): state rules, field access, the saving and
//!   resuming sequences.
//! - [`engine`]: protocol-neutral phases (pre-copy, stop-and-copy, resume), rollback and the
//!   [`engine::MigrationDevice`] trait both protocols implement.
//! - the stream format and the command line on top.

pub mod device;
pub mod engine;
pub mod error;
pub mod fence;
pub mod handshake;
pub mod migration;
pub mod open;
pub mod stream;
pub mod transport;
pub mod v1;
pub mod v2;

pub use error::{Error, Result};
