// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The command line: `probe`, `save`, `load`, `migrate`, `send`, `recv`, `inspect`, `demo`
//! and `bench`. The guide is `docs/cli.md`.

mod bench;
mod config;
mod devices;
mod diag;
mod fencing;
mod net;
pub mod outcome;
mod output;
mod private;
mod probe;
mod progress;
mod recover;
mod serve;
pub mod signals;
mod tls;
mod transfer;

pub use bench::BenchArgs;
pub use config::ConfigArgs;
pub use fencing::{DirArgs, StoreArgs};
pub use net::NetArgs;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use vfio_mig::PreCopyPolicy;

use vfio_mig::SaveOptions;

use vfio_mig::DEFAULT_BUFFER;

use config::ConfigFile;
use fencing::{FenceSettings, Fencing};
use tls::{AuthorizeArgs, TlsArgs, TlsSettings};
use vfio_mig_session::Result;

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
    /// How real devices are opened: `group` (container + /dev/vfio/GROUP), `iommufd`
    /// (/dev/iommu + /dev/vfio/devices/vfioN) or `auto` (group when offered, else iommufd).
    /// A forced backend the kernel lacks is an error.
    #[arg(long, global = true, value_name = "BACKEND", env = "VFIO_MIG_BACKEND",
          default_value = "auto", value_parser = devices::parse_backend)]
    pub backend: vfio_mig::Backend,
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
        /// The output file (a regular file, replaced only once the stream is complete), or
        /// `-` for standard output.
        #[arg(short, long)]
        output: PathBuf,
        /// Authenticate the file with the key in FILE (HMAC-SHA256 over header and records);
        /// `load` and `inspect` with the same key refuse any other or altered file.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Replace an existing output file (without it, an existing output is refused before
        /// the device is touched).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        transfer: TransferArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Resume a device from a saved file.
    Load {
        /// The device.
        device: String,
        /// The input file.
        #[arg(short, long)]
        input: PathBuf,
        /// Require the file to be authenticated with the key in FILE (see save --key-file).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Migrate between two devices of this host.
    Migrate {
        /// Source and destination devices, in pairs: `SRC DST [SRC DST ...]`. Several pairs
        /// migrate as one unit (all quiesced before any stops; one failing rolls all back).
        #[arg(required = true, num_args = 2.., value_names = ["SRC", "DST"])]
        devices: Vec<String>,
        /// Channels (socketpairs) of the unit; device i travels on channel i mod N.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u16).range(1..=16))]
        channels: u16,
        #[command(flatten)]
        transfer: TransferArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Migrate a device to a `recv` on another host (tcp:HOST:PORT, unix:PATH; file:PATH
    /// saves).
    Send {
        /// The source devices (several migrate as one unit; the `recv` gives as many).
        #[arg(required = true, num_args = 1..)]
        devices: Vec<String>,
        /// The destination: `tcp:HOST:PORT`, `tcp:[IPV6]:PORT`, `unix:PATH` or `file:PATH`.
        #[arg(long, value_name = "ADDR")]
        to: vfio_mig_session::transport::Address,
        /// Retry the handoff of this session (32 hex digits, as printed by an earlier send)
        /// instead of starting a new one: a destination that completed it answers
        /// ALREADY_COMPLETED.
        #[arg(long, value_name = "HEX", value_parser = fencing::parse_session)]
        session: Option<vfio_mig::wire::SessionId>,
        /// `file:` only: replace an existing file (see save --force).
        #[arg(long)]
        force: bool,
        /// The name the destination's certificate must carry (default: the host of --to).
        #[arg(long, value_name = "NAME")]
        tls_server_name: Option<String>,
        #[command(flatten)]
        transfer: TransferArgs,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Receive a migration from a `send` into a device (serves until one migration
    /// completes).
    Recv {
        /// The destination devices, in the order of the `send`'s devices.
        #[arg(required = true, num_args = 1..)]
        devices: Vec<String>,
        /// Where to listen: tcp:HOST:PORT (port 0: any), unix:PATH, or file:PATH (loads it).
        #[arg(long, value_name = "ADDR")]
        listen: vfio_mig_session::transport::Address,
        /// End after the first session whatever its outcome, instead of waiting for a retry
        /// after a failed one. Connections that are not a session (closed early, not TLS, not
        /// authorized, turned away as busy) and sources refused before any device was
        /// touched do not count.
        #[arg(long)]
        once: bool,
        /// Several devices: receive them as one unit even if some lack the P2P states. This
        /// destination's own decision, whatever the source opted in to: refused by default, as
        /// in QEMU, since such a device cannot wait quiesced and may run (and do DMA) before a
        /// peer is loaded.
        #[arg(long)]
        allow_non_p2p_unit: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        authorization: AuthorizeArgs,
        #[command(flatten)]
        host: HostArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Decode and verify a saved stream.
    Inspect {
        /// The stream file.
        file: PathBuf,
        /// Verify the file's authentication with the key in FILE (see save --key-file).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report a device's migration state and bring a device left in a non-running state
    /// (a killed migration) back to RUNNING: the recovery transition, else a reset.
    Recover {
        /// The device.
        device: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        host: HostArgs,
    },
    /// The main job on an embedded default: a live migration between two 256 MiB mock v1
    /// devices, with progress.
    Demo {
        #[command(flatten)]
        host: HostArgs,
    },
    /// Measure throughput, memory, downtime and parallel saves against baselines measured in
    /// the same run (mock devices; see docs/benchmarks.md).
    Bench(BenchArgs),
    /// The host configuration file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `vfio-mig config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print its settings (key files by path; their
    /// contents are never printed). Exit status 0 when valid, 2 when not.
    Check {
        /// The file (default: $VFIO_MIG_CONFIG, else /etc/vfio-mig/config.toml).
        #[arg(env = "VFIO_MIG_CONFIG", default_value = config::DEFAULT_PATH)]
        path: PathBuf,
    },
}

/// The host settings of a command that locks devices: the configuration file and the lock
/// and state directories.
#[derive(Debug, Args, Clone, Default)]
pub struct HostArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    dirs: DirArgs,
}

impl HostArgs {
    /// The command's fencing: its options over the configuration file, with `store` if it
    /// hands devices off.
    fn fencing(&self, store: Option<&StoreArgs>) -> Result<(Fencing, Option<ConfigFile>)> {
        let file = self.config.load()?;
        let fencing = FenceSettings::resolve(&self.dirs, store, file.as_ref()).fencing()?;
        Ok((fencing, file))
    }
}

/// Options of the commands that save.
#[derive(Debug, Args, Clone)]
pub struct TransferArgs {
    /// Pre-copy while the device runs before stopping it.
    #[arg(long)]
    pub live: bool,
    /// Pre-copy: the downtime budget in milliseconds; switch over once the remaining bytes
    /// would cross the link within it at the measured bandwidth.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Pre-copy: also switch over when at most this many bytes are pending.
    #[arg(long, default_value_t = 0)]
    pub switchover_bytes: u64,
    /// Pre-copy: most rounds before switching over.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Pre-copy: most seconds before switching over.
    #[arg(long, default_value_t = 60.0, value_parser = parse_secs)]
    pub max_precopy_secs: f64,
    /// Pre-copy: fail instead of switching over past the downtime budget when pre-copy does
    /// not converge or reaches its bounds.
    #[arg(long)]
    pub strict_downtime: bool,
    /// Transfer buffer size in bytes.
    #[arg(long, default_value_t = DEFAULT_BUFFER)]
    pub buffer: usize,
    /// Several devices: migrate them as one unit even if some lack the P2P states (every v1
    /// device; v2 without VFIO_MIGRATION_P2P). Refused by default, as in QEMU: such a device
    /// cannot be quiesced, so it may keep doing DMA into a peer device that is already
    /// stopped (and, on the destination, run before a peer is loaded).
    #[arg(long)]
    pub allow_non_p2p_unit: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The handoff's epoch; a destination refuses epochs below the highest it accepted.
    /// Default: the time in milliseconds since 1970, or more if this host recorded a higher
    /// epoch for the device.
    #[arg(long, value_name = "N")]
    pub epoch: Option<u64>,
}

impl TransferArgs {
    pub(crate) fn save_options(&self) -> SaveOptions {
        SaveOptions {
            live: self.live,
            policy: self.policy(),
            buffer: self.buffer(),
            allow_non_p2p_unit: self.allow_non_p2p_unit,
            ..SaveOptions::default()
        }
    }

    /// The front door's options of these, with `epoch` (the caller adds the session, key and
    /// observer).
    pub(crate) fn source_options(&self, epoch: vfio_mig::Epoch) -> vfio_mig::SourceOptions {
        vfio_mig::SourceOptions::new(epoch)
            .pre_copy(self.live)
            .buffer(self.buffer())
            .allow_non_p2p_unit(self.allow_non_p2p_unit)
    }

    /// When pre-copy switches over.
    pub(crate) fn policy(&self) -> PreCopyPolicy {
        PreCopyPolicy {
            downtime_budget: Duration::from_millis(self.downtime_ms),
            switchover_bytes: self.switchover_bytes,
            max_rounds: self.max_rounds,
            max_time: Duration::from_secs_f64(self.max_precopy_secs.max(0.0)),
            strict: self.strict_downtime,
            ..PreCopyPolicy::default()
        }
    }

    fn buffer(&self) -> usize {
        self.buffer.clamp(4096, vfio_mig::wire::MAX_FRAGMENT)
    }
}

/// Writes `text` to standard output. A reader that went away (`vfio-mig probe | head -1`)
/// is not an error: the output is simply not wanted any more.
pub(crate) fn output_text(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(vfio_mig_session::Error::transport(
            "write standard output",
            e,
        )),
    }
}

/// Parses a number of seconds: finite, not negative, at most 10^9 (NaN and infinity are
/// refused here rather than panicking in `Duration`).
pub fn parse_secs(text: &str) -> std::result::Result<f64, String> {
    parse_secs_in(text, 0.0, 1e9)
}

/// Parses a number of seconds from `min` to `max` (finite; out of range is refused, never
/// clamped).
pub fn parse_secs_in(text: &str, min: f64, max: f64) -> std::result::Result<f64, String> {
    let v: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    check_secs(v, min, max).map_err(|e| format!("`{text}`: {e}"))?;
    Ok(v)
}

/// Refuses a number of seconds that is not finite or not from `min` to `max` (the options'
/// parsers and the configuration file's values alike).
pub fn check_secs(v: f64, min: f64, max: f64) -> std::result::Result<(), String> {
    if !v.is_finite() || !(min..=max).contains(&v) {
        return Err(format!(
            "expected a finite number of seconds from {min} to {max}"
        ));
    }
    Ok(())
}

/// Sets up `tracing` output on stderr; the library's `log` records reach it too.
pub fn init_logging(verbose: u8) {
    let _ = tracing_log::LogTracer::init();
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
        .event_format(diag::LogFormat)
        .try_init();
}

impl Command {
    /// Combinations of options the parser cannot express: a usage error (status 2).
    pub fn usage_conflict(&self) -> Option<String> {
        match self {
            Command::Save {
                output, transfer, ..
            } if output.as_os_str() == "-" && transfer.json => Some(
                "--json with -o -: the report and the stream cannot share standard output".into(),
            ),
            _ => None,
        }
    }

    /// Records for [`outcome`] what this command drives, and whether it prints JSON.
    pub fn begin_outcome(&self) {
        use outcome::Side::{Destination, Source};
        let side = |names: &[String], side| names.iter().map(|n| (n.clone(), side)).collect();
        let (name, json, devices): (_, _, Vec<_>) = match self {
            Command::Probe { device: _, json } => ("probe", *json, Vec::new()),
            Command::Save {
                device, transfer, ..
            } => ("save", transfer.json, vec![(device.clone(), Source)]),
            Command::Load { device, json, .. } => {
                ("load", *json, vec![(device.clone(), Destination)])
            }
            Command::Migrate {
                devices, transfer, ..
            } => {
                let pairs = devices
                    .iter()
                    .enumerate()
                    .map(|(i, d)| (d.clone(), if i % 2 == 0 { Source } else { Destination }))
                    .collect();
                ("migrate", transfer.json, pairs)
            }
            Command::Send {
                devices, transfer, ..
            } => ("send", transfer.json, side(devices, Source)),
            Command::Recv { devices, json, .. } => ("recv", *json, side(devices, Destination)),
            Command::Inspect { json, .. } => ("inspect", *json, Vec::new()),
            Command::Recover { json, .. } => ("recover", *json, Vec::new()),
            Command::Bench(args) => ("bench", args.json, Vec::new()),
            Command::Demo { .. } => ("demo", false, Vec::new()),
            Command::Config(_) => ("config", false, Vec::new()),
        };
        outcome::begin(name, json, devices);
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    devices::set_backend(cli.backend);
    // A signal that came while the command line was parsed (or was pending at start) ends
    // the command here, before it touches anything.
    signals::check("start the command")?;
    match cli.command {
        Command::Probe { device, json } => probe::run(&device, json),
        Command::Save {
            device,
            output,
            key_file,
            force,
            transfer,
            host,
            store,
        } => {
            let (fence, _) = host.fencing(Some(&store))?;
            let target = transfer::SaveTarget {
                output: &output,
                replace: force,
                key_file: key_file.as_deref(),
            };
            transfer::save(&device, &target, &transfer, &fence)
        }
        Command::Load {
            device,
            input,
            key_file,
            json,
            host,
            store,
        } => {
            let (fence, _) = host.fencing(Some(&store))?;
            transfer::load_keyed(&device, &input, key_file.as_deref(), json, &fence)
        }
        Command::Migrate {
            devices,
            channels,
            transfer,
            host,
            store,
        } => {
            let (fence, _) = host.fencing(Some(&store))?;
            transfer::migrate(&devices, channels, &transfer, &fence)
        }
        Command::Send {
            devices,
            to,
            session,
            force,
            tls_server_name,
            transfer,
            mut net,
            tls,
            host,
            store,
        } => {
            let (fence, file) = host.fencing(Some(&store))?;
            net.tls = TlsSettings::resolve(&tls, None, tls_server_name, file.as_ref(), &to);
            let target = net::SendTarget {
                to: &to,
                session,
                replace: force,
            };
            net::send(&devices, &target, &transfer, &net, &fence)
        }
        Command::Recv {
            devices,
            listen,
            once,
            allow_non_p2p_unit,
            json,
            mut net,
            tls,
            authorization,
            host,
            store,
        } => {
            let (fence, file) = host.fencing(Some(&store))?;
            net.tls =
                TlsSettings::resolve(&tls, Some(&authorization), None, file.as_ref(), &listen);
            let opts = net::RecvOptions {
                once,
                json,
                allow_non_p2p_unit,
            };
            net::recv(&devices, &listen, &opts, &net, &fence)
        }
        Command::Inspect {
            file,
            key_file,
            json,
        } => transfer::inspect(&file, key_file.as_deref(), json),
        Command::Recover { device, json, host } => {
            let (fence, _) = host.fencing(None)?;
            recover::run(&device, json, &fence.config)
        }
        Command::Bench(args) => bench::run(&args),
        Command::Demo { host } => {
            let (fence, _) = host.fencing(None)?;
            let dev = format!("mock:v1,size={DEMO_SIZE},seed=3,dirty-rate=16M");
            eprintln!("demo: live migration {dev} -> {dev}");
            let args = TransferArgs {
                live: true,
                downtime_ms: 300,
                switchover_bytes: 0,
                max_rounds: 30,
                max_precopy_secs: 60.0,
                strict_downtime: false,
                buffer: DEFAULT_BUFFER,
                allow_non_p2p_unit: false,
                json: false,
                epoch: None,
            };
            transfer::migrate(&[dev.clone(), dev], 1, &args, &fence)
        }
        // Its own statuses (0 valid, 2 not), not the outcomes of a handoff: it touches no
        // device.
        Command::Config(command) => std::process::exit(config::run(&command).into()),
    }
}
