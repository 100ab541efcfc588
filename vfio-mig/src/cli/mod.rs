// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: `probe`, `save`, `load`, `migrate`, `inspect` and `demo`.

mod probe;
mod progress;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::engine::{PreCopyPolicy, SaveOptions, DEFAULT_BUFFER};
use crate::error::Result;

/// The size of the demo's mock devices.
pub const DEMO_SIZE: &str = "256M";

/// Drives VFIO device migration: v1 (migration region) and v2 (device feature) devices,
/// real (by sysfs path) or mock (`mock:v1,size=64M,seed=7`).
#[derive(Debug, Parser)]
#[command(name = "vfio-mig", version, about, long_about = None)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a device's migration protocol, flags, regions and sizes.
    Probe {
        /// The device: a sysfs path or `mock:v1[,options]`.
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Save a device's state into a file (stop-and-copy; with --live, pre-copy first).
    Save {
        /// The device.
        device: String,
        /// The output file.
        #[arg(short, long)]
        output: PathBuf,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Resume a device from a saved file.
    Load {
        /// The device.
        device: String,
        /// The input file.
        #[arg(short, long)]
        input: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Migrate between two devices of this host.
    Migrate {
        /// The source device.
        source: String,
        /// The destination device.
        destination: String,
        #[command(flatten)]
        transfer: TransferArgs,
    },
    /// Decode and verify a saved stream.
    Inspect {
        /// The stream file.
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The main job on an embedded default: a live migration between two 256 MiB mock v1
    /// devices, with progress.
    Demo,
}

/// Options of the commands that save.
#[derive(Debug, Args, Clone)]
pub struct TransferArgs {
    /// Pre-copy while the device runs before stopping it.
    #[arg(long)]
    pub live: bool,
    /// Pre-copy: switch over when at most this many bytes are pending.
    #[arg(long, default_value_t = 0)]
    pub switchover_bytes: u64,
    /// Pre-copy: most rounds before switching over.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Pre-copy: most seconds before switching over.
    #[arg(long, default_value_t = 60.0)]
    pub max_precopy_secs: f64,
    /// Transfer buffer size in bytes.
    #[arg(long, default_value_t = DEFAULT_BUFFER)]
    pub buffer: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl TransferArgs {
    fn save_options(&self) -> SaveOptions {
        SaveOptions {
            live: self.live,
            policy: PreCopyPolicy {
                switchover_bytes: self.switchover_bytes,
                max_rounds: self.max_rounds,
                max_time: Duration::from_secs_f64(self.max_precopy_secs.max(0.0)),
            },
            buffer: self.buffer.clamp(4096, crate::stream::MAX_FRAGMENT),
        }
    }
}

/// Sets up `tracing` output on stderr.
pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Probe { device, json } => probe::run(&device, json),
        Command::Save {
            device,
            output,
            transfer,
        } => transfer::save(&device, &output, &transfer),
        Command::Load {
            device,
            input,
            json,
        } => transfer::load(&device, &input, json),
        Command::Migrate {
            source,
            destination,
            transfer,
        } => transfer::migrate(&source, &destination, &transfer),
        Command::Inspect { file, json } => transfer::inspect(&file, json),
        Command::Demo => {
            let dev = format!("mock:v1,size={DEMO_SIZE},seed=3,dirty-rate=16M");
            eprintln!("demo: live migration {dev} -> {dev}");
            let args = TransferArgs {
                live: true,
                switchover_bytes: 1 << 20,
                max_rounds: 30,
                max_precopy_secs: 60.0,
                buffer: DEFAULT_BUFFER,
                json: false,
            };
            transfer::migrate(&dev, &dev, &args)
        }
    }
}
