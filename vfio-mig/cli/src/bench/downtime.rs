// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 4: downtime. A live save through the front door (pre-copy rounds under the default
//! policy, then stop-and-copy) of a `mock:v2` device that dirties its state at a given rate, into
//! `/dev/null`; the measured stop-and-copy wall time ([`SaveReport::stop_copy_time`]) against
//! the bound `1.1 x remaining bytes / measured bandwidth + 5 ms`, where the bandwidth is the
//! one pre-copy measured ([`SaveReport::bandwidth`]) and the remaining bytes are those
//! stop-and-copy sent. The estimate the policy switched over on
//! ([`SaveReport::estimated_downtime`], from the bytes pending at the switch) is reported
//! next to it.

use std::sync::Arc;
use std::time::Duration;

use vfio_mig::backend::V2Device;
use vfio_mig::{NoObserver, PreCopyPolicy, SaveReport, DEFAULT_BUFFER};
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::{Error, Result};

use super::io::SinkKind;
use super::report::{Figure, Target};
use super::stats::{Paired, Stat};
use super::Config;

/// Slack of the target, on top of 1.1 x the transfer time.
pub const SLACK: Duration = Duration::from_millis(5);

/// One live save under a `budget` downtime budget; its report.
pub fn live_save(size: u64, dirty_rate: u64, budget: Duration, seed: u64) -> Result<SaveReport> {
    let spec: MockSpec = format!(
        "mock:v2,size={},seed={seed},dirty-rate={}",
        format_size(size),
        format_size(dirty_rate)
    )
    .parse()?;
    let mock = MockV2::new(&spec).map_err(|e| Error::device("mock", e))?;
    let dev = V2Device::open(Arc::new(mock))?;
    let mut sink = SinkKind::Null.open()?;
    let policy = PreCopyPolicy {
        downtime_budget: budget,
        ..PreCopyPolicy::default()
    };
    let (_, mut reports) = super::front::save(
        vec![dev],
        &mut sink.conn,
        DEFAULT_BUFFER,
        Some(&policy),
        &NoObserver,
    )?;
    sink.finish()?;
    Ok(reports.remove(0))
}

/// The target's bound for a save: 1.1 x stop-copy bytes / bandwidth + 5 ms.
pub fn bound(r: &SaveReport) -> Option<Duration> {
    let bw = r.bandwidth.filter(|b| *b > 0)? as f64;
    Some(Duration::from_secs_f64(1.1 * r.stop_copy_bytes as f64 / bw) + SLACK)
}

/// Measures the downtime figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    for &budget_ms in &cfg.downtime_budgets_ms {
        let budget = Duration::from_millis(budget_ms);
        for &size in &cfg.downtime_sizes {
            for &rate in &cfg.dirty_rates {
                let mut p = Paired::default();
                let mut estimates = Vec::new();
                let mut remaining = Vec::new();
                let mut rounds = Vec::new();
                let mut bws = Vec::new();
                for rep in 0..cfg.reps.max(1) {
                    let r = live_save(size, rate, budget, 100 + rep as u64)?;
                    let Some(b) = bound(&r) else {
                        continue;
                    };
                    p.baseline.push(b.as_secs_f64() * 1e3);
                    p.subject.push(r.stop_copy_time.as_secs_f64() * 1e3);
                    estimates.push(r.estimated_downtime.map_or(0.0, |d| d.as_secs_f64() * 1e3));
                    remaining.push(r.stop_copy_bytes as f64 / (1 << 20) as f64);
                    rounds.push(f64::from(r.rounds));
                    bws.push(r.bandwidth.unwrap_or(0) as f64 / 1e9);
                }
                let f = Figure::from_paired(
                    format!(
                        "downtime.{}.dirty{}.budget{budget_ms}ms",
                        format_size(size),
                        format_size(rate)
                    ),
                    4,
                    "downtime: stop-and-copy wall time vs 1.1 x remaining / bandwidth + 5 ms",
                    "measured stop-copy",
                    "bound",
                    "ms",
                    &p,
                    false,
                    Some(Target::at_most(1.0)),
                )
                .note(format!(
                "mock:v2 {} dirtying {}/s, live, {budget_ms} ms budget: {:.0} rounds, {:.1} MiB \
                 left for stop-copy, pre-copy bandwidth {:.2} GB/s, policy's estimate {:.1} ms \
                 (median)",
                format_size(size),
                format_size(rate),
                Stat::of(&rounds).median,
                Stat::of(&remaining).median,
                Stat::of(&bws).median,
                Stat::of(&estimates).median
            ));
                eprintln!("bench: {}", super::v2path::summary(&f));
                out.push(f);
            }
        }
    }
    Ok(out)
}
