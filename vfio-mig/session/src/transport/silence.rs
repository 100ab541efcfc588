// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Writes that a silent peer holds one timeout at most. A blocking write under `SO_SNDTIMEO`
//! can wait longer: the kernel restarts the timeout for every buffer it allocates within one
//! call (a unix socket's `writev` of 1 MiB was seen waiting 10 s under a 5 s timeout before it
//! returned short), and a write that returns short after the timeout looks like progress to
//! the next one, which waits again (2 timeouts over a unix socket, 3 over TCP or TLS). So a
//! peer cut off by a partition held the source for several timeouts. Here a write sends
//! without blocking what the socket takes and otherwise waits, in `poll(2)`, for room: at
//! most the timeout since the peer last accepted anything, then it fails.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, MsgFlags};

/// Sends what of `bufs` the socket `fd` accepts, waiting at most `timeout` (`None`: for
/// ever) for it to accept anything; `WouldBlock` when it accepted nothing for that long.
fn send_within(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    timeout: Option<Duration>,
) -> io::Result<usize> {
    if bufs.iter().all(|b| b.is_empty()) {
        return Ok(0);
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    loop {
        match sendmsg::<()>(fd.as_raw_fd(), bufs, &[], flags, None) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_for_room(fd, deadline)?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Sends all of `bufs` as one blocking write would (one call of the caller, however many
/// the socket needs), each wait for room at most `timeout` since the peer last accepted
/// anything. Returns what was sent, and the error that stopped it short.
pub(super) fn send_all_within(
    fd: BorrowedFd<'_>,
    bufs: &[IoSlice<'_>],
    timeout: Option<Duration>,
) -> (usize, Option<io::Error>) {
    let mut rest: Vec<IoSlice<'_>> = bufs.to_vec();
    let mut rest = &mut rest[..];
    let mut sent = 0;
    while rest.iter().any(|b| !b.is_empty()) {
        match send_within(fd, rest, timeout) {
            Ok(0) => return (sent, Some(io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                sent += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) => return (sent, Some(e)),
        }
    }
    (sent, None)
}

/// Waits until `fd` has room to write, or `deadline` passes (`WouldBlock`).
fn wait_for_room(fd: BorrowedFd<'_>, deadline: Option<Instant>) -> io::Result<()> {
    let wait = match deadline {
        None => PollTimeout::NONE,
        Some(end) => {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Rounded up to a millisecond: a wait that rounds down to 0 would spin.
            let left = left.max(Duration::from_millis(1));
            PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLOUT)];
    match poll(&mut fds, wait) {
        Ok(0) => Err(io::ErrorKind::WouldBlock.into()),
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
