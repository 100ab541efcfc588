// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Waiting for pre-copy data that a device counts but cannot give yet.
//!
//! The uAPI (vfio.h, `VFIO_MIG_GET_PRECOPY_INFO`): at pre-copy's temporary end a read returns
//! ENOMSG and "userspace can wait for more data (which may never come) by using poll". A v1
//! driver whose `pending_bytes` is an estimate stages an empty chunk instead. Either way a
//! round comes back empty while the device still reports pending bytes; reading again at
//! once would spin, and counting such rounds would let the policy's round and stall bounds
//! switch over before the device had a chance to produce its data. So the engine waits:
//! `poll(2)` on the data fd where there is one, a sleep otherwise, each wait twice the last
//! (from [`FIRST_WAIT`] up to [`LONGEST_WAIT`]); the policy's time bound still applies.
//!
//! Not every data fd's poll says something: a driver without a `.poll` file operation (mtty)
//! polls readable at once. A wait that poll ended early and that is followed by another empty
//! round shows that; from then on the engine sleeps instead.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{Error, Result};
use crate::migration::MigrationDevice;

/// The first wait after an empty round.
pub(crate) const FIRST_WAIT: Duration = Duration::from_millis(1);
/// The longest single wait.
pub(crate) const LONGEST_WAIT: Duration = Duration::from_millis(50);

/// The backoff between empty pre-copy rounds of one device.
#[derive(Debug)]
pub(crate) struct DataWait {
    next: Duration,
    /// The data fd's poll has not (yet) been seen to wake without data.
    poll_trusted: bool,
    /// The last wait ended because poll said readable.
    last_woke: bool,
}

impl DataWait {
    pub(crate) fn new() -> Self {
        Self {
            next: FIRST_WAIT,
            poll_trusted: true,
            last_woke: false,
        }
    }

    /// A round moved data: the next empty round starts the backoff again.
    pub(crate) fn reset(&mut self) {
        self.next = FIRST_WAIT;
        self.last_woke = false;
    }

    /// Waits after an empty round of `dev`.
    pub(crate) fn wait(&mut self, dev: &dyn MigrationDevice) -> Result<()> {
        if self.last_woke {
            // Poll said readable, yet the round found nothing: this fd's poll tells nothing.
            self.poll_trusted = false;
        }
        let timeout = self.next;
        self.next = (self.next * 2).min(LONGEST_WAIT);
        self.last_woke = match dev.data_fd().filter(|_| self.poll_trusted) {
            Some(fd) => poll_readable(fd, timeout)?,
            None => {
                std::thread::sleep(timeout);
                false
            }
        };
        Ok(())
    }
}

/// Polls `fd` for input up to `timeout`; true when it became readable (or hung up) first.
fn poll_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    poll_any(&[fd], timeout)
}

/// Polls `fds` for input up to `timeout`; true when one became readable (or hung up) first.
/// No fds: sleeps `timeout` (nothing can signal) and answers false.
pub(crate) fn poll_any(fds: &[BorrowedFd<'_>], timeout: Duration) -> Result<bool> {
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return Ok(false);
    }
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(Errno::EINTR) if Instant::now() < deadline => continue,
            Err(Errno::EINTR) => return Ok(false),
            Err(e) => {
                return Err(Error::device(
                    "poll the data fd for pre-copy data",
                    std::io::Error::from(e),
                ))
            }
        }
    }
}
