// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A write that a silent peer cut short. A blocking `send(2)` under `SO_SNDTIMEO` whose
//! timeout expires after the kernel took part of the buffer returns that part, not `EAGAIN`;
//! the peer then accepted nothing for the whole timeout, exactly as when the call fails. Taken
//! for progress, the next write waited the timeout again (twice more over TCP, as the
//! socket's buffers filled in steps), so a peer cut off by a partition held a source for
//! several timeouts instead of one.

use std::time::Duration;

/// Whether a write that was asked `asked` bytes, took `taken` and returned after `took`
/// ended because a socket `timeout` expired: it returned short (only a timeout or a signal
/// returns a blocking write short) at or after the timeout.
pub(super) fn expired_part_way(
    taken: usize,
    asked: usize,
    took: Duration,
    timeout: Option<Duration>,
) -> bool {
    taken < asked && timeout.is_some_and(|t| took >= t)
}
