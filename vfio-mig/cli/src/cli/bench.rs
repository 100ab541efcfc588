// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `bench`: measures the data paths, memory, downtime estimate and parallel saves, each as a
//! ratio against a baseline measured in the same run (see [`crate::bench`]).

use std::path::PathBuf;

use clap::Args;

use crate::bench::{self, Config};
use vfio_mig_mock::spec::parse_size;
use vfio_mig_session::{Error, Result};

/// Options of `bench`.
#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Suites to run, comma separated: crc, fast, load, xe, unit, v2, v1, memory, downtime,
    /// multi, rated, channels (default: all).
    #[arg(long, value_delimiter = ',', value_name = "SUITE")]
    pub suite: Vec<String>,
    /// Device state per data-path run (fast, v2, v1 suites).
    #[arg(long, default_value = "1G", value_parser = size_arg)]
    pub size: u64,
    /// Interleaved repetitions per figure (the median and min..max are reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Unrecorded warm-up rounds per figure.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Transfer buffer of the engine and of the baselines, in bytes.
    #[arg(long, default_value_t = vfio_mig::DEFAULT_BUFFER)]
    pub buffer: usize,
    /// Directory of the file sink (default /dev/shm, else the temporary directory).
    #[arg(long, value_name = "DIR")]
    pub file_dir: Option<PathBuf>,
    /// State sizes of the memory suite, comma separated.
    #[arg(long, value_delimiter = ',', value_parser = size_arg, default_value = "1G,4G")]
    pub memory_sizes: Vec<u64>,
    /// State sizes of the downtime suite, comma separated.
    #[arg(long, value_delimiter = ',', value_parser = size_arg, default_value = "64M,256M,1G")]
    pub downtime_sizes: Vec<u64>,
    /// Dirty rates (bytes per second) of the downtime suite, comma separated.
    #[arg(long, value_delimiter = ',', value_parser = size_arg, default_value = "0,32M,128M,512M")]
    pub dirty_rates: Vec<u64>,
    /// Pre-copy downtime budgets (ms) of the downtime suite, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "300,30")]
    pub downtime_budgets: Vec<u64>,
    /// State per device of the multi suite.
    #[arg(long, default_value = "256M", value_parser = size_arg)]
    pub multi_size: u64,
    /// Data rate of each bandwidth-modelled device of the rated suite, bytes per second.
    #[arg(long, default_value = "300M", value_parser = size_arg)]
    pub rated_rate: u64,
    /// State per bandwidth-modelled device of the rated suite.
    #[arg(long, default_value = "128M", value_parser = size_arg)]
    pub rated_size: u64,
    /// State per device of the channels suite (4 devices over 1 and 4 TLS channels).
    #[arg(long, default_value = "128M", value_parser = size_arg)]
    pub channels_size: u64,
    /// State of the xe suite's device (its source and destination are two memfds this size).
    #[arg(long, default_value = "8G", value_parser = size_arg)]
    pub xe_size: u64,
    /// Small sizes and 3 repetitions: a smoke run of every suite in about a minute.
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the Markdown table to this file.
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// Internal: run one measured child of the memory suite and print its peak RSS.
    #[arg(long, hide = true, value_name = "SPEC")]
    pub child: Option<String>,
}

fn size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("`{s}` is not a size (e.g. 4096, 64M, 1G)"))
}

impl BenchArgs {
    fn config(&self) -> Config {
        let mut cfg = Config {
            size: self.size,
            reps: self.reps.max(1),
            warmup: self.warmup,
            buffer: self.buffer.clamp(4096, vfio_mig::wire::MAX_FRAGMENT),
            file_dir: self
                .file_dir
                .clone()
                .unwrap_or_else(bench::default_file_dir),
            memory_sizes: self.memory_sizes.clone(),
            downtime_sizes: self.downtime_sizes.clone(),
            dirty_rates: self.dirty_rates.clone(),
            downtime_budgets_ms: self.downtime_budgets.clone(),
            multi_size: self.multi_size,
            rated_rate: self.rated_rate,
            rated_size: self.rated_size,
            channels_size: self.channels_size,
            xe_size: self.xe_size,
            ..Config::default()
        };
        if self.quick {
            cfg.size = 128 << 20;
            cfg.reps = 3;
            cfg.warmup = 0;
            cfg.memory_sizes = vec![64 << 20, 256 << 20];
            cfg.downtime_sizes = vec![64 << 20];
            cfg.dirty_rates = vec![0, 128 << 20];
            cfg.multi_size = 32 << 20;
            cfg.rated_size = 32 << 20;
            cfg.channels_size = 32 << 20;
            cfg.xe_size = 512 << 20;
        }
        cfg
    }
}

/// Runs `bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    if let Some(spec) = &args.child {
        return bench::memory::child(spec);
    }
    let suites: Vec<String> = if args.suite.is_empty() {
        bench::SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        args.suite.clone()
    };
    let report = bench::run(&args.config(), &suites)?;
    let table = report.markdown();
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table)
            .map_err(|e| Error::transport(format!("write {}", path.display()), e))?;
    }
    if args.json {
        eprintln!("{table}");
        super::transfer::print_json(&report)
    } else {
        println!("{table}");
        Ok(())
    }
}
