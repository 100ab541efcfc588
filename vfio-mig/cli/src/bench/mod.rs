// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfio-mig bench`: the project measured against the limits of the machine and against the
//! obvious alternative, in the same run.
//!
//! Every figure is a ratio against a baseline measured in the same process, interleaved with
//! the subject and repeated ([`stats`]): the machines are shared and noisy, absolute numbers
//! are not comparable from one run to the next, ratios mostly are. The report is a table
//! ([`report::Report::markdown`]) or JSON. `scripts/bench.sh` runs the suite and draws the
//! plot; `docs/benchmarks.md` records the numbers and how to read them.
//!
//! | suite      | target | subject                                   | baseline                              |
//! |------------|--------|-------------------------------------------|---------------------------------------|
//! | `v2`       | 1      | engine saving a v2 pipe data fd           | read/write loop over the same fd kind |
//! | `v1`       | 2      | engine saving a v1 region, trapped / mmap | raw pread / memcpy of the same region |
//! | `memory`   | 3      | peak RSS of save and load (child process) | reading the whole state first         |
//! | `downtime` | 4      | measured stop-copy time                   | 1.1 x remaining / bandwidth + 5 ms    |
//! | `multi`    | 5      | 4 devices saved in parallel               | the same saved one after another      |
//! | `channels` | #13: 2 | 4 devices as one unit over 4 TLS channels (loopback, CPU-bound stream) | the same over 1 TLS channel |
//! | `fast`     | #22: 1 | the front door's `Source` saving an xe-profile memfd data fd (page-cache speed, no device thread) | read/write loop over the same fd |
//! | `load`     | #22: 2 | the front door's `Destination` loading a memfd xe device from TCP loopback | read loop from the same socket into the device's write |
//! | `xe`       | #22: 3 | an 8 GiB xe stop-copy migration in one process (`Source` -> socketpair -> `Destination`): window and peak RSS | raw copy loop, two threads over a socketpair |
//! | `unit`     | #22: 4 | 4 fast devices as one unit through the front door: stop-copy window; and 4 rate-bound ones | one of them migrated alone |
//! | `crc`      | #22    | the stream's CRC32C (`crc-fast` in this build) | the `crc32c` crate, same buffer, same value |
//! | `rated`    | #13: 1, 2, 5 | bandwidth-modelled devices: 4 in parallel, one device, 4 as one unit's downtime | one after another; a raw loop at the rate; one device alone |
//!
//! Target 6 (per-transition overhead on mtty) runs in the QEMU guest:
//! `tests/tests/guest/bench.rs`.
//!
//! Speed is never asserted by a test: these are measurements.

pub mod channels;
pub mod crc;
pub mod downtime;
pub mod fastload;
pub mod fastunit;
pub mod front;
pub mod io;
pub mod memory;
pub mod multi;
pub mod rated;
pub mod report;
pub mod stats;
pub mod v1path;
pub mod v2path;
pub mod window;
pub mod xe;

use std::path::PathBuf;

use vfio_mig_session::Result;

pub use report::{Machine, Report};

/// The pipelined pump's depth the figures compare with the inline pump (`pipeline: 0`): the
/// default where the thread may run on three CPUs or more ([`vfio_mig::workspace::default_pipeline`]),
/// measured on any machine.
pub const PIPELINED: usize = 3;

/// What to measure and how often.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device state per data-path run (targets 1 and 2).
    pub size: u64,
    /// Interleaved repetitions per figure.
    pub reps: usize,
    /// Unrecorded warm-up rounds per figure.
    pub warmup: usize,
    /// The engine's (and the baselines') buffer.
    pub buffer: usize,
    /// Directory of the file sink.
    pub file_dir: PathBuf,
    /// State sizes of the memory figures (target 3).
    pub memory_sizes: Vec<u64>,
    /// Device state of the downtime runs (target 4), per run.
    pub downtime_sizes: Vec<u64>,
    /// Dirty rates of the downtime runs, bytes per second.
    pub dirty_rates: Vec<u64>,
    /// Downtime budgets of the downtime runs' pre-copy policy, in milliseconds.
    pub downtime_budgets_ms: Vec<u64>,
    /// Device state per device of the multi-device figure (target 5).
    pub multi_size: u64,
    /// Data rate of a bandwidth-modelled device (`rated` suite), bytes per second.
    pub rated_rate: u64,
    /// State per bandwidth-modelled device (`rated` suite).
    pub rated_size: u64,
    /// State per device of the channels suite.
    pub channels_size: u64,
    /// State of the xe suite's device.
    pub xe_size: u64,
    /// The `vfio-mig` executable, for the memory figures' child processes.
    pub exe: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            size: 1 << 30,
            reps: 5,
            warmup: 1,
            buffer: vfio_mig::DEFAULT_BUFFER,
            file_dir: default_file_dir(),
            memory_sizes: vec![1 << 30, 4 << 30],
            downtime_sizes: vec![64 << 20, 256 << 20, 1 << 30],
            dirty_rates: vec![0, 32 << 20, 128 << 20, 512 << 20],
            downtime_budgets_ms: vec![300, 30],
            multi_size: 256 << 20,
            rated_rate: 300 << 20,
            rated_size: 128 << 20,
            channels_size: 128 << 20,
            xe_size: 8 << 30,
            exe: std::env::current_exe().ok(),
        }
    }
}

/// `/dev/shm` when it exists (a file sink in memory: no disk writeback noise), else the
/// temporary directory.
pub fn default_file_dir() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::env::temp_dir()
    }
}

/// The suites.
pub const SUITES: [&str; 12] = [
    "crc", "fast", "load", "xe", "unit", "v2", "v1", "memory", "downtime", "multi", "rated",
    "channels",
];

/// Runs the named suites (any of [`SUITES`]) and returns the report.
pub fn run(cfg: &Config, suites: &[String]) -> Result<Report> {
    let machine = Machine::detect();
    let date = report::utc_now();
    let mut figures = Vec::new();
    for suite in suites {
        eprintln!("bench: suite {suite}");
        let f = match suite.as_str() {
            "v2" => v2path::figures(
                cfg,
                &[v2path::Source::Mock, v2path::Source::Fast],
                &[
                    io::SinkKind::Null,
                    io::SinkKind::File(cfg.file_dir.clone()),
                    io::SinkKind::Tcp,
                ],
            )?,
            "fast" => v2path::figures(
                cfg,
                &[v2path::Source::Memfd],
                &[
                    io::SinkKind::Null,
                    io::SinkKind::File(cfg.file_dir.clone()),
                    io::SinkKind::Tcp,
                ],
            )?,
            "load" => fastload::figures(cfg)?,
            "xe" => xe::figures(cfg)?,
            "unit" => fastunit::figures(cfg)?,
            "v1" => v1path::figures(cfg)?,
            "memory" => memory::figures(cfg)?,
            "downtime" => downtime::figures(cfg)?,
            "multi" => multi::figures(cfg)?,
            "crc" => crc::figures(cfg)?,
            "rated" => rated::figures(cfg)?,
            "channels" => channels::figures(cfg)?,
            other => {
                return Err(vfio_mig_session::Error::invalid_input(format!(
                    "unknown bench suite `{other}` (known: {})",
                    SUITES.join(", ")
                )))
            }
        };
        figures.extend(f);
    }
    Ok(Report {
        date,
        machine,
        reps: cfg.reps,
        figures,
    })
}
