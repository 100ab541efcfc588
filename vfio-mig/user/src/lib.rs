// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vfio-user devices for vfio-mig.
//!
//! vfio-user is VFIO over a UNIX socket: a device emulated in another process (libvfio-user
//! based devices, SPDK's NVMe controllers) answers the VFIO device model's operations as
//! messages. [`VfioUserDevice`] connects to such a server and implements vfio-mig's
//! [`DeviceIo`](vfio_mig::backend::DeviceIo) over the socket, so the v2 driver and the engine
//! migrate it like a kernel device: state changes by `VFIO_USER_DEVICE_FEATURE`, the data by
//! `VFIO_USER_MIG_DATA_READ` / `WRITE` on a data session without an fd.
//!
//! ```no_run
//! use vfio_mig_user::ConnectOptions;
//!
//! // The engine's device, and the raw access underneath (to read BARs, say).
//! let opened = vfio_mig_user::open("vfio-user:/run/dev.sock", &ConnectOptions::default())?;
//! # let _ = opened;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! What of the protocol is not implemented is listed in the project's `docs/vfio-user.md`.
#![deny(missing_docs)]

pub mod conn;
pub mod device;
pub mod open;
pub mod version;
pub mod wire;

pub use device::{ConnectOptions, VfioUserDevice};
pub use open::{device_key, is_vfio_user, open, SCHEME};
