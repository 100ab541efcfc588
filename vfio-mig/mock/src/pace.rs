// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pacing of a bandwidth-modelled device (`rate=`, `accept-rate=`): a token bucket in its
//! GCRA form (a theoretical arrival time), so a device moves at most `rate` bytes a second
//! on average and never more than a short burst ahead of it.
//!
//! A real device's data rate is set by its firmware and DMA, not by the host CPU; the mock
//! models it by *waiting* until the bucket allows the next piece (a sleep or a `poll`
//! timeout in the mock: the device is busy, it is not a test waiting for something). The
//! burst tolerance absorbs the coarse timers of a waiting thread: a thread that wakes 1 ms
//! late may send the next piece at once, so oversleeping does not accumulate into a lower
//! rate; a device held up longer (a reader not reading) does not earn more than the burst.

use std::time::{Duration, Instant};

/// How far ahead of the rate a device may run: absorbs timer granularity (`poll` takes
/// milliseconds) and wake-up latency on a loaded machine.
pub const BURST: Duration = Duration::from_millis(10);

/// A token bucket over bytes.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Bytes per second.
    rate: u64,
    /// When the bytes let through so far are paid for at `rate` (GCRA's theoretical
    /// arrival time); `None` before the first piece.
    paid_until: Option<Instant>,
}

impl Pacer {
    /// A pacer at `rate` bytes per second (`rate` 0 is treated as 1).
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            paid_until: None,
        }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// How long the device must wait at `now` before it may move its next piece; zero when
    /// it may go now.
    pub fn wait(&self, now: Instant) -> Duration {
        match self.paid_until {
            Some(t) => t.saturating_duration_since(now + BURST),
            None => Duration::ZERO,
        }
    }

    /// Records that `bytes` moved at `now` (after [`Pacer::wait`] said zero).
    pub fn took(&mut self, bytes: u64, now: Instant) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let from = self.paid_until.map_or(now, |t| t.max(now));
        self.paid_until = Some(from + cost);
    }

    /// Waits in the calling thread until `bytes` may move, then records them: for a device
    /// operation that blocks while the device works (a v1 chunk being staged).
    pub fn pace_blocking(&mut self, bytes: u64) {
        let d = self.wait(Instant::now());
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        self.took(bytes, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a pacer with a synthetic clock that jumps straight to each permitted time, plus
    /// `oversleep` (a sleeper waking late), and moves pieces for `until` of simulated time (or
    /// until 10x the bytes the rate allows: a pacer that never waits); returns the bytes
    /// moved and the simulated time.
    fn simulate(rate: u64, piece: u64, oversleep: Duration, until: Duration) -> (u64, Duration) {
        let start = Instant::now();
        let mut p = Pacer::new(rate);
        let mut now = start;
        let mut bytes = 0;
        let cap = 10.0 * rate as f64 * until.as_secs_f64();
        while now - start < until && (bytes as f64) < cap {
            let w = p.wait(now);
            if !w.is_zero() {
                now += w + oversleep;
                continue;
            }
            p.took(piece, now);
            bytes += piece;
        }
        (bytes, (now - start).max(Duration::from_nanos(1)))
    }

    #[test]
    fn the_long_run_rate_is_the_configured_rate() {
        // 300 MB/s in 256 KiB pieces over 10 simulated seconds: within one burst plus one
        // piece of rate x time.
        let rate = 300_000_000;
        let (bytes, t) = simulate(rate, 256 << 10, Duration::ZERO, Duration::from_secs(10));
        let ideal = rate as f64 * t.as_secs_f64();
        let slack = rate as f64 * BURST.as_secs_f64() + f64::from(256u32 << 10);
        assert!((bytes as f64 - ideal).abs() <= slack, "{bytes} vs {ideal}");
    }

    #[test]
    fn oversleeping_within_the_burst_does_not_lower_the_rate() {
        // A sleeper that always wakes 1 ms late (a poll rounding up) still moves the rate.
        let rate = 100_000_000;
        let (bytes, t) = simulate(
            rate,
            64 << 10,
            Duration::from_millis(1),
            Duration::from_secs(5),
        );
        let ratio = bytes as f64 / (rate as f64 * t.as_secs_f64());
        assert!((0.99..=1.01).contains(&ratio), "ratio {ratio}");
    }

    #[test]
    fn an_idle_device_earns_no_more_than_one_burst() {
        let rate = 1_000_000;
        let t0 = Instant::now();
        let mut p = Pacer::new(rate);
        p.took(1000, t0);
        // Idle for a second: then at most a burst's worth goes without waiting.
        let mut now = t0 + Duration::from_secs(1);
        let mut free = 0;
        while p.wait(now).is_zero() {
            p.took(100, now);
            free += 100;
        }
        let burst = rate as f64 * BURST.as_secs_f64();
        assert!(
            free as f64 <= burst + 100.0,
            "{free} bytes free after idling"
        );
        assert!(
            free as f64 >= burst - 100.0,
            "{free} bytes free after idling"
        );
        // And the wait then is the cost of what went beyond the burst.
        now += p.wait(now);
        assert!(p.wait(now).is_zero());
    }

    #[test]
    fn blocking_pacing_holds_the_rate_against_a_real_clock() {
        // 20 MB/s in 64 KiB pieces for 4 MB: at least the time the rate requires (minus
        // the burst), never faster. Only the lower bound on time is asserted: a loaded
        // machine may make it slower, never faster.
        let rate = 20_000_000u64;
        let piece = 64u64 << 10;
        let total = 4_000_000u64;
        let mut p = Pacer::new(rate);
        let t = Instant::now();
        let mut moved = 0;
        while moved < total {
            p.pace_blocking(piece);
            moved += piece;
        }
        let elapsed = t.elapsed().as_secs_f64();
        // What the rate lets through in `elapsed`: one burst and one piece over rate x time.
        let allowed = rate as f64 * (elapsed + BURST.as_secs_f64()) + piece as f64;
        assert!(
            (moved as f64) <= allowed,
            "{moved} bytes in {elapsed:.3} s at {rate} B/s"
        );
    }
}
