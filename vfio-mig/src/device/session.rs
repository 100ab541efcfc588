// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A migration data transfer session, as a state transition opens it.
//!
//! A kernel device answers a transition into PRE_COPY, STOP_COPY or RESUMING with a data fd
//! that carries the device state; a device whose state moves by messages (vfio-user's
//! `VFIO_USER_MIG_DATA_READ` / `WRITE`) opens a session without one. The protocol driver
//! holds the session and hands it back to [`DeviceIo::read_data`](super::DeviceIo::read_data),
//! [`write_data`](super::DeviceIo::write_data) and
//! [`precopy_info`](super::DeviceIo::precopy_info); only where it has an fd can the engine
//! poll or splice it.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// One data transfer session of a device: its data fd, or none where the device moves its
/// state by other means.
#[derive(Debug)]
pub struct DataSession {
    fd: Option<OwnedFd>,
}

impl DataSession {
    /// A session carried by a data fd (the kernel's `data_fd`).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd: Some(fd) }
    }

    /// A session without a descriptor: the device's [`DeviceIo`](super::DeviceIo) moves the
    /// data itself.
    pub fn without_fd() -> Self {
        Self { fd: None }
    }

    /// The data fd, to poll or splice, where the session has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|fd| fd.as_fd())
    }

    /// The data fd, or `EBADF` for a session without one (what a syscall on no descriptor
    /// answers).
    pub fn require_fd(&self) -> io::Result<BorrowedFd<'_>> {
        self.fd()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    /// Gives the descriptor back (for a caller that drives the session itself).
    pub fn into_fd(self) -> Option<OwnedFd> {
        self.fd
    }
}
