// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Interleaved, repeated measurements and their summaries.
//!
//! The machines this runs on are shared and noisy, so a figure is never an absolute number
//! alone: the baseline and the subject run in the same process, one after the other, `reps`
//! times, alternating which goes first, and the figure is the median of the per-pair ratios
//! with their spread (min and max).

use serde::Serialize;

/// Median, min and max of a series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    /// The median (mean of the two middle values for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Stat {
    /// Summarizes `values` (all zero when empty).
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }

    /// Half the min..max range relative to the median, in percent: the spread printed next
    /// to a median.
    #[cfg(test)]
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median.abs() * 100.0
        }
    }
}

/// The values of `reps` interleaved runs of a baseline and a subject.
#[derive(Debug, Clone, Default)]
pub struct Paired {
    /// Baseline values, in run order.
    pub baseline: Vec<f64>,
    /// Subject values, in run order.
    pub subject: Vec<f64>,
}

impl Paired {
    /// Runs `baseline` and `subject` `reps` times each, alternating which runs first, after
    /// `warmup` unrecorded runs of each.
    #[cfg(test)]
    pub fn run<E>(
        reps: usize,
        warmup: usize,
        mut baseline: impl FnMut() -> std::result::Result<f64, E>,
        mut subject: impl FnMut() -> std::result::Result<f64, E>,
    ) -> std::result::Result<Self, E> {
        for _ in 0..warmup {
            baseline()?;
            subject()?;
        }
        let mut out = Self::default();
        for i in 0..reps.max(1) {
            if i % 2 == 0 {
                out.baseline.push(baseline()?);
                out.subject.push(subject()?);
            } else {
                out.subject.push(subject()?);
                out.baseline.push(baseline()?);
            }
        }
        Ok(out)
    }

    /// Per-pair `subject / baseline`.
    pub fn ratios(&self) -> Vec<f64> {
        self.baseline
            .iter()
            .zip(&self.subject)
            .map(|(b, s)| if *b == 0.0 { 0.0 } else { s / b })
            .collect()
    }

    /// Per-pair `baseline / subject` (for values where lower is better, such as times).
    pub fn inverse_ratios(&self) -> Vec<f64> {
        self.baseline
            .iter()
            .zip(&self.subject)
            .map(|(b, s)| if *s == 0.0 { 0.0 } else { b / s })
            .collect()
    }
}

/// Runs each of `subjects` `reps` times, rotating which goes first in each repetition, after
/// `warmup` unrecorded rounds; returns one series per subject, in run order.
pub fn run_rotating<E>(
    reps: usize,
    warmup: usize,
    subjects: &mut [&mut dyn FnMut() -> std::result::Result<f64, E>],
) -> std::result::Result<Vec<Vec<f64>>, E> {
    let k = subjects.len();
    for _ in 0..warmup {
        for s in subjects.iter_mut() {
            s()?;
        }
    }
    let mut out = vec![Vec::new(); k];
    for rep in 0..reps.max(1) {
        for j in 0..k {
            let i = (rep + j) % k;
            out[i].push((subjects[i])()?);
        }
    }
    Ok(out)
}

impl Paired {
    /// Pairs series `subject` with series `baseline` of a [`run_rotating`] result.
    pub fn from_series(series: &[Vec<f64>], baseline: usize, subject: usize) -> Self {
        Self {
            baseline: series[baseline].clone(),
            subject: series[subject].clone(),
        }
    }
}

/// CPU time of the calling thread so far, in seconds.
pub fn thread_cpu() -> f64 {
    clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU seconds of the whole process so far (every thread, user and system).
pub fn process_cpu() -> f64 {
    clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// The time of clock `id`, in seconds.
fn clock_seconds(id: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Stat::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!(Stat::of(&[]), Stat::default());
        assert!((Stat::of(&[9.0, 10.0, 11.0]).spread_pct() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn runs_interleave_and_pair_up() {
        let order = std::cell::RefCell::new(Vec::new());
        let p = Paired::run::<std::convert::Infallible>(
            3,
            1,
            || {
                order.borrow_mut().push('b');
                Ok(2.0)
            },
            || {
                order.borrow_mut().push('s');
                Ok(1.0)
            },
        )
        .unwrap();
        assert_eq!(
            order.into_inner(),
            vec!['b', 's', 'b', 's', 's', 'b', 'b', 's']
        );
        assert_eq!(p.ratios(), vec![0.5; 3]);
        assert_eq!(p.inverse_ratios(), vec![2.0; 3]);
        let order = std::cell::RefCell::new(Vec::new());
        let mut a = || {
            order.borrow_mut().push('a');
            Ok::<f64, std::convert::Infallible>(1.0)
        };
        let mut b = || {
            order.borrow_mut().push('b');
            Ok(2.0)
        };
        let mut c = || {
            order.borrow_mut().push('c');
            Ok(3.0)
        };
        let series = run_rotating(3, 0, &mut [&mut a, &mut b, &mut c]).unwrap();
        assert_eq!(order.into_inner(), "abcbcacab".chars().collect::<Vec<_>>());
        assert_eq!(series, vec![vec![1.0; 3], vec![2.0; 3], vec![3.0; 3]]);
        assert_eq!(Paired::from_series(&series, 0, 2).ratios(), vec![3.0; 3]);
        assert!(thread_cpu() > 0.0);
    }
}
