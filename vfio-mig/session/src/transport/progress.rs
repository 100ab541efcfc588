// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A floor under the rate at which a peer's bytes arrive, so that a peer trickling bytes
//! (each within the idle timeout) cannot hold a reader without end. It is a token bucket of
//! waiting time: the reads of a connection may wait for the peer at most `reserve` in all,
//! and every byte received gives back `1 / bytes_per_sec` seconds, up to `reserve` again.
//! A peer that sends at least `bytes_per_sec` on average, with pauses that fit in the
//! reserve, is never stopped; one that sends less runs the reserve down and its next read
//! fails. Only time spent waiting in a read counts, never the reader's own work.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The rule: the reserve of waiting time and the rate that refills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgressFloor {
    /// The most the reads may wait in all while nothing arrives (also the bucket's size).
    pub reserve: Duration,
    /// Bytes that give back one second of waiting.
    pub bytes_per_sec: u64,
}

/// What is left of the reserve, shared by every handle of one connection.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress(Arc<Mutex<Option<Bucket>>>);

#[derive(Debug)]
struct Bucket {
    floor: ProgressFloor,
    left: Duration,
    received: u64,
    waited: Duration,
}

impl Progress {
    fn bucket(&self) -> std::sync::MutexGuard<'_, Option<Bucket>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts (a full reserve) or with `None` ends the rule.
    pub(crate) fn set(&self, floor: Option<ProgressFloor>) {
        *self.bucket() = floor.map(|floor| Bucket {
            floor,
            left: floor.reserve,
            received: 0,
            waited: Duration::ZERO,
        });
    }

    /// How long the next read may wait (`None`: no rule), or the error once the reserve is
    /// spent.
    pub(crate) fn allowance(&self, peer: &str) -> io::Result<Option<Duration>> {
        match &*self.bucket() {
            None => Ok(None),
            Some(b) if b.left.is_zero() => Err(too_slow(peer, b)),
            Some(b) => Ok(Some(b.left)),
        }
    }

    /// Accounts a read that waited `waited` and brought `bytes`.
    pub(crate) fn record(&self, waited: Duration, bytes: usize) {
        if let Some(b) = self.bucket().as_mut() {
            let earned = Duration::from_secs_f64(bytes as f64 / b.floor.bytes_per_sec as f64);
            // A read that waited out the reserve spent it, whatever it then brought.
            b.left = match b.left.checked_sub(waited) {
                Some(left) if !left.is_zero() => (left + earned).min(b.floor.reserve),
                _ => Duration::ZERO,
            };
            b.received += bytes as u64;
            b.waited += waited;
        }
    }

    /// The error of a read that waited out the rest of the reserve.
    pub(crate) fn exhausted(&self, peer: &str) -> Option<io::Error> {
        let mut guard = self.bucket();
        let b = guard.as_mut()?;
        b.left = Duration::ZERO;
        Some(too_slow(peer, b))
    }
}

fn too_slow(peer: &str, b: &Bucket) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "timed out: {peer} is too slow: {} bytes in {:.1} s of waiting, under the floor \
             of {} bytes/s (with a reserve of {:?} for pauses)",
            b.received,
            b.waited.as_secs_f64(),
            b.floor.bytes_per_sec,
            b.floor.reserve
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLOOR: ProgressFloor = ProgressFloor {
        reserve: Duration::from_secs(10),
        bytes_per_sec: 1000,
    };

    #[test]
    fn a_peer_at_the_floor_keeps_its_reserve_and_a_trickler_spends_it() {
        let p = Progress::default();
        assert_eq!(p.allowance("p").unwrap(), None, "no rule by default");
        p.set(Some(FLOOR));
        // An hour at twice the floor, in reads of one second: never short.
        for _ in 0..3600 {
            p.record(Duration::from_secs(1), 2000);
            assert_eq!(p.allowance("p").unwrap(), Some(FLOOR.reserve));
        }
        // A pause within the reserve passes; then a trickle of 1 byte per 2 s runs it down.
        p.record(Duration::from_secs(9), 0);
        assert!(p.allowance("p").unwrap().is_some());
        let mut reads = 0;
        while p.allowance("p").is_ok() {
            p.record(Duration::from_secs(2), 1);
            reads += 1;
            assert!(reads < 10, "the trickle was never cut");
        }
        let e = p.allowance("p").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("too slow"), "{e}");
    }
}
