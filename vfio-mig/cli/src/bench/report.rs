// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Figures and the report: a table for people, JSON for scripts.

use serde::Serialize;

use super::stats::{Paired, Stat};

/// How a figure's ratio is judged.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    /// `">="` (must reach `value`) or `"<="` (must stay at or under it).
    pub op: &'static str,
    /// The bound.
    pub value: f64,
    /// The bound applies to the subject's median (in the figure's unit), not to the ratio.
    pub on_subject: bool,
}

impl Target {
    /// The ratio must be at least `value`.
    pub fn at_least(value: f64) -> Self {
        Self {
            op: ">=",
            value,
            on_subject: false,
        }
    }

    /// The ratio must be at most `value`.
    pub fn at_most(value: f64) -> Self {
        Self {
            op: "<=",
            value,
            on_subject: false,
        }
    }

    /// The subject's median must be at most `value` (in the figure's unit).
    pub fn subject_at_most(value: f64) -> Self {
        Self {
            op: "<=",
            value,
            on_subject: true,
        }
    }

    /// Whether `ratio` meets the target.
    pub fn met(&self, ratio: f64) -> bool {
        match self.op {
            ">=" => ratio >= self.value,
            _ => ratio <= self.value,
        }
    }
}

/// One measured figure: a subject against a baseline measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// Stable identifier, e.g. `v2.mock.null.engine`.
    pub id: String,
    /// The target this figure belongs to (1 to 6), 0 for a diagnostic figure.
    pub target_no: u8,
    /// Group heading.
    pub group: String,
    /// What the subject is.
    pub subject_name: String,
    /// What the baseline is.
    pub baseline_name: String,
    /// Unit of `baseline` and `subject`.
    pub unit: String,
    /// The baseline's values.
    pub baseline: Stat,
    /// The subject's values.
    pub subject: Stat,
    /// The figure: per-run ratio (see `ratio_meaning`).
    pub ratio: Stat,
    /// What the ratio is, e.g. `subject/baseline throughput`.
    pub ratio_meaning: String,
    /// The target for the ratio's median.
    pub target: Option<Target>,
    /// Whether the median meets the target.
    pub met: Option<bool>,
    /// Runs behind each statistic.
    pub runs: usize,
    /// Anything a reader needs to interpret the figure.
    pub note: String,
}

impl Figure {
    /// A figure from interleaved runs; `inverse` takes baseline/subject as the ratio (times,
    /// memory: lower is better).
    #[allow(clippy::too_many_arguments)]
    pub fn from_paired(
        id: impl Into<String>,
        target_no: u8,
        group: impl Into<String>,
        subject_name: impl Into<String>,
        baseline_name: impl Into<String>,
        unit: impl Into<String>,
        p: &Paired,
        inverse: bool,
        target: Option<Target>,
    ) -> Self {
        let ratios = if inverse {
            p.inverse_ratios()
        } else {
            p.ratios()
        };
        let ratio = Stat::of(&ratios);
        Self {
            id: id.into(),
            target_no,
            group: group.into(),
            subject_name: subject_name.into(),
            baseline_name: baseline_name.into(),
            unit: unit.into(),
            baseline: Stat::of(&p.baseline),
            subject: Stat::of(&p.subject),
            ratio,
            ratio_meaning: if inverse {
                "baseline/subject".into()
            } else {
                "subject/baseline".into()
            },
            met: target.map(|t| {
                t.met(if t.on_subject {
                    Stat::of(&p.subject).median
                } else {
                    ratio.median
                })
            }),
            target,
            runs: p.baseline.len(),
            note: String::new(),
        }
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPU model name.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Total memory in MiB.
    pub mem_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `/proc/loadavg` when the run started: the machine is shared, other work competes.
    pub loadavg: String,
}

impl Machine {
    /// Reads the facts from /proc.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_mib: mem_kib / 1024,
            kernel,
            loadavg,
        }
    }
}

/// A whole run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it ran (UTC, RFC 3339 to the second).
    pub date: String,
    /// Where it ran.
    pub machine: Machine,
    /// Repetitions per figure.
    pub reps: usize,
    /// The figures, in the order they were measured.
    pub figures: Vec<Figure>,
}

/// Formats a value with 3 significant digits.
pub fn sig3(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

impl Report {
    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Measured {} on {} ({} CPUs, {} MiB, Linux {}, load average {} at the start), {} \
             interleaved runs per figure.\n\n",
            self.date,
            self.machine.cpu,
            self.machine.cpus,
            self.machine.mem_mib,
            self.machine.kernel,
            self.machine.loadavg,
            self.reps
        );
        out += "| # | figure | subject | baseline | ratio (median, min..max) | target | met |\n";
        out += "|---|--------|---------|----------|--------------------------|--------|-----|\n";
        for f in &self.figures {
            let target = f
                .target
                .map(|t| {
                    if t.on_subject {
                        format!("subject {} {} {}", t.op, sig3(t.value), f.unit)
                    } else {
                        format!("{} {}", t.op, sig3(t.value))
                    }
                })
                .unwrap_or_else(|| "-".into());
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            out += &format!(
                "| {} | {} | {}: {} {} | {}: {} {} | {} ({}..{}) | {} | {} |\n",
                if f.target_no == 0 {
                    "-".to_string()
                } else {
                    f.target_no.to_string()
                },
                f.id,
                f.subject_name,
                sig3(f.subject.median),
                f.unit,
                f.baseline_name,
                sig3(f.baseline.median),
                f.unit,
                sig3(f.ratio.median),
                sig3(f.ratio.min),
                sig3(f.ratio.max),
                target,
                met
            );
        }
        let notes: Vec<&Figure> = self.figures.iter().filter(|f| !f.note.is_empty()).collect();
        if !notes.is_empty() {
            out += "\nNotes:\n\n";
            for f in notes {
                out += &format!("- `{}`: {}\n", f.id, f.note);
            }
        }
        out
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_table() {
        assert!(Target::at_least(0.95).met(0.95));
        assert!(!Target::at_least(0.95).met(0.94));
        assert!(Target::at_most(1.0).met(0.5));
        let p = Paired {
            baseline: vec![2.0, 2.0, 2.0],
            subject: vec![1.9, 2.0, 1.8],
        };
        let f = Figure::from_paired(
            "x.y",
            1,
            "g",
            "engine",
            "loop",
            "GB/s",
            &p,
            false,
            Some(Target::at_least(0.95)),
        );
        assert_eq!(f.ratio.median, 0.95);
        assert_eq!(f.met, Some(true));
        let r = Report {
            date: utc_now(),
            machine: Machine::detect(),
            reps: 3,
            figures: vec![f.note("n")],
        };
        let md = r.markdown();
        assert!(md.contains("| 1 | x.y | engine: 1.90 GB/s | loop: 2.00 GB/s | 0.950 (0.900..1.00) | >= 0.950 | yes |"), "{md}");
        assert!(md.contains("- `x.y`: n"));
        assert_eq!(utc_now().len(), 20);
    }
}
