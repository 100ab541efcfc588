// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! # vfio-mig-session
//!
//! The session layer of [vfio-mig](vfio_mig): what moves a device's migration stream between
//! two hosts safely, kept out of the core so that a VMM with its own migration channel builds
//! none of it.
//!
//! - [`handshake`]: the session protocol around the stream (HELLO, REFUSE, LOADED, COMMIT,
//!   RESUMED), the destination's admission checks and fencing
//!   ([`vfio_mig_fence`]), several channels, and [`handshake::migrate_local`];
//! - [`transport`]: addresses, connections, listeners, and (feature `tls`) mutually
//!   authenticated TLS 1.3;
//! - [`StreamKey`]: the HMAC-SHA256 [`vfio_mig::wire::StreamAuth`] of authenticated stream
//!   files;
//! - [`Error`]: this layer's errors, wrapping the core's.

pub mod error;
pub mod handshake;
mod mac;
pub mod transport;

pub use error::{Error, Result};
pub use mac::{StreamKey, MIN_KEY_LEN};
pub use vfio_mig_fence::ReasonCode;
