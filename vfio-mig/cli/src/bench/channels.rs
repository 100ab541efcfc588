// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 13 item 2: several channels. One unit of 4 mock devices migrated over mutual TLS on
//! loopback ([`handshake::send_channels`] and [`handshake::receive_channels`], the whole
//! session: handshake, CHANNEL binding, load, COMMIT), over 4 channels against 1 channel,
//! interleaved in the same run. The devices use `content=fast` (almost no CPU of their own),
//! so the stream (TLS encryption and decryption, CRCs, copies) is what costs CPU: a
//! CPU-bound stream. Certificates are minted (vfio-mig-testcerts) at start.
//!
//! Both ends run in this process on the same cores, so the figure also reports the CPU the
//! process used per wall second (1.0 = one core busy) of each subject, and the load average
//! before and after: the ceiling of any parallel speed-up is the idle cores left.

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_mig::backend::V2Device;
use vfio_mig::error::Report;
use vfio_mig::wire::StreamHeader;
use vfio_mig::{MigrationDevice, NoObserver, SaveOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::MockSpec;
use vfio_mig_session::handshake::{self, ChannelOpening, Opened};
use vfio_mig_session::transport::tls::{ServerConfig, TlsConfig};
use vfio_mig_session::transport::{
    accept_tls, connect, connect_tls, Address, ClientTls, Connection,
};
use vfio_mig_session::{Error, Result};
use vfio_mig_testcerts::{Ca, Usage};

use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::Config;

/// Devices of the unit.
pub const DEVICES: usize = 4;
/// Channels of the subject.
pub const CHANNELS: u16 = 4;

const WAIT: Duration = Duration::from_secs(10);

fn bench_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::invalid_input(format!("bench channels: {what}: {e}"))
}

/// A CA and the two sides' configurations, in `dir`.
fn pki(dir: &Path) -> Result<(Arc<ServerConfig>, ClientTls)> {
    let ca = Ca::new(dir, "bench-ca").map_err(|e| bench_err("certificates", Report(&e)))?;
    let config = |name: &str, usage| -> Result<TlsConfig> {
        let leaf = ca
            .leaf(dir, name, &[name], usage)
            .map_err(|e| bench_err("certificates", Report(&e)))?;
        Ok(TlsConfig {
            cert: leaf.cert,
            key: leaf.key,
            ca: ca.pem().to_owned(),
            server_name: (usage == Usage::Client).then(|| "dst.example".to_owned()),
        })
    };
    let server = config("dst.example", Usage::Server)?
        .server_config()
        .map_err(|e| bench_err("server config", e))?;
    let client = ClientTls::new(config("src.example", Usage::Client)?)?;
    Ok((server, client))
}

fn open(size: u64, seed: usize) -> Result<Box<dyn MigrationDevice>> {
    open_spec(&format!(
        "mock:v2,size={},seed={seed},content=fast",
        format_size(size)
    ))
}

fn open_spec(spec: &str) -> Result<Box<dyn MigrationDevice>> {
    let spec: MockSpec = spec.parse()?;
    let (io, _handle) = vfio_mig_mock::open(&spec).map_err(|e| Error::device("mock", e))?;
    Ok(Box::new(V2Device::open(io)?))
}

/// How the channels of a measured migration are carried.
enum Link<'a> {
    /// Mutual TLS 1.3 over TCP loopback.
    Tls(&'a Arc<ServerConfig>, &'a ClientTls),
    /// Plain TCP loopback (a device-bound figure, where the link is not what is measured).
    Plain,
}

/// CPU seconds (user + system) this process used so far.
fn cpu_seconds() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one `struct rusage` into the pointer it is given, which points
    // to a zeroed, properly aligned `rusage` owned by this frame.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage returned 0, so it filled the structure (it was zeroed before anyway).
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One migration of the unit over `channels` TLS channels; its wall seconds, and the CPU
/// seconds used meanwhile.
fn migrate(
    size: u64,
    channels: u16,
    server: &Arc<ServerConfig>,
    client: &ClientTls,
) -> Result<(f64, f64)> {
    let srcs = (0..DEVICES)
        .map(|i| open(size, i))
        .collect::<Result<Vec<_>>>()?;
    let dsts = (0..DEVICES)
        .map(|i| open(size, i))
        .collect::<Result<Vec<_>>>()?;
    migrate_unit(srcs, dsts, channels, &Link::Tls(server, client))
}

/// One migration of the unit `srcs` into `dsts` over `channels` channels of `link`.
fn migrate_unit(
    mut srcs: Vec<Box<dyn MigrationDevice>>,
    mut dsts: Vec<Box<dyn MigrationDevice>>,
    channels: u16,
    link: &Link<'_>,
) -> Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| bench_err("bind", e))?;
    let addr = Address::from(listener.local_addr().map_err(|e| bench_err("addr", e))?);
    let accept_one = |deadline: Option<Instant>| -> Result<Opened<Connection>> {
        let (sock, _) = listener.accept().map_err(|e| bench_err("accept", e))?;
        let conn = Connection::tcp(sock).map_err(|e| bench_err("tcp", e))?;
        let conn = match link {
            Link::Tls(server, _) => accept_tls(conn, (*server).clone(), WAIT)?,
            Link::Plain => conn,
        };
        handshake::open_connection(conn, deadline)
    };
    let cpu = cpu_seconds();
    let started = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let dsts = &mut dsts;
        let accept_one = &accept_one;
        let loader = s.spawn(move || -> Result<()> {
            let mut d: Vec<&mut dyn MigrationDevice> =
                dsts.iter_mut().map(|x| x.as_mut() as _).collect();
            let Opened::Session(opening) = accept_one(None)? else {
                return Err(bench_err("accept", "a channel before the session"));
            };
            let mut accept = |deadline: Instant| -> Result<ChannelOpening<Connection>> {
                match accept_one(Some(deadline))? {
                    Opened::Channel(c) => Ok(c),
                    Opened::Session(_) => Err(bench_err("accept", "a second session")),
                }
            };
            let mut fence = MemoryFence::new();
            handshake::receive_channels(
                &mut d,
                *opening,
                &mut fence,
                &NoObserver,
                channels,
                &mut accept,
            )?;
            Ok(())
        });
        let mut s: Vec<&mut dyn MigrationDevice> =
            srcs.iter_mut().map(|x| x.as_mut() as _).collect();
        let header = StreamHeader::new(&s.iter().map(|d| &**d).collect::<Vec<_>>(), false, 1)?;
        let mut connect = |_: u16| match link {
            Link::Tls(_, client) => connect_tls(&addr, WAIT, client, WAIT),
            Link::Plain => connect(&addr, WAIT),
        };
        let conn = connect(0)?;
        let sent = handshake::send_channels(
            &mut s,
            conn,
            &header,
            &SaveOptions::default(),
            &NoObserver,
            channels,
            &mut connect,
        );
        let received = loader
            .join()
            .map_err(|_| bench_err("destination", "panicked"))?;
        sent?;
        received
    })?;
    Ok((started.elapsed().as_secs_f64(), cpu_seconds() - cpu))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Measures the channels figure.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir().map_err(|e| bench_err("tempdir", e))?;
    let (server, client) = pki(dir.path())?;
    let size = cfg.channels_size;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_before = loadavg();
    let busy = std::cell::RefCell::new([Vec::new(), Vec::new()]);
    let run = |slot: usize, channels: u16| -> Result<f64> {
        let (wall, cpu) = migrate(size, channels, &server, &client)?;
        busy.borrow_mut()[slot].push(cpu / wall);
        Ok(wall)
    };
    let mut one = || run(0, 1);
    let mut four = || run(1, CHANNELS);
    let series = run_rotating(cfg.reps, cfg.warmup, &mut [&mut one, &mut four])?;
    let load_after = loadavg();
    let mut busy = busy.into_inner();
    let (busy_one, busy_four) = (median(&mut busy[0]), median(&mut busy[1]));
    let f = Figure::from_paired(
        format!("channels.tls.x{DEVICES}.c{CHANNELS}"),
        13,
        "several channels: 4 TLS channels vs 1",
        format!("{CHANNELS} TLS channels"),
        "1 TLS channel",
        "s",
        &Paired::from_series(&series, 0, 1),
        true,
        Some(Target::at_least(1.7)),
    )
    .note(format!(
        "{DEVICES} x mock:v2 of {} each (content=fast), one unit, mutual TLS 1.3 over loopback, \
         both ends in this process on {cpus} CPUs; ratio = 1-channel time / {CHANNELS}-channel \
         time; CPU busy per wall second (median, both ends): 1 channel {busy_one:.2}, \
         {CHANNELS} channels {busy_four:.2}; load average {load_before} before, {load_after} \
         after",
        format_size(size)
    ));
    eprintln!("bench: {}", super::v2path::summary(&f));
    let mut figures = vec![f];
    figures.extend(rated_figures(cfg)?);
    Ok(figures)
}

/// Device rates of the rated channel figures (bytes per second): the rated suite's 300 MB/s,
/// and half of it, where the 4 devices' sum (600 MB/s through both ends of the session in
/// this process) leaves the 2 CPUs of a small machine some room.
const RATED_RATES: [u64; 2] = [300_000_000, 150_000_000];

/// Issue 13 target 1 over channels: 4 bandwidth-modelled devices (300 MB/s each,
/// `content=fast`) saved as one unit over 4 plain TCP channels, and over 1, against the same
/// 4 devices migrated one after another; the whole session each time (the destination loads
/// and verifies every page).
fn rated_figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    for rate in RATED_RATES {
        out.extend(rated_figures_at(cfg, rate)?);
    }
    Ok(out)
}

fn rated_figures_at(cfg: &Config, rate: u64) -> Result<Vec<Figure>> {
    let size = (cfg.channels_size / 2).max(1 << 20);
    let spec = |i: usize| {
        format!(
            "mock:v2,size={},seed={i},content=fast,rate={rate}",
            format_size(size)
        )
    };
    let unit = |channels: u16| -> Result<f64> {
        let srcs = (0..DEVICES)
            .map(|i| open_spec(&spec(i)))
            .collect::<Result<Vec<_>>>()?;
        let dsts = (0..DEVICES)
            .map(|i| open_spec(&spec(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(migrate_unit(srcs, dsts, channels, &Link::Plain)?.0)
    };
    let load_before = loadavg();
    let mut sequential = || -> Result<f64> {
        let mut total = 0.0;
        for i in 0..DEVICES {
            let (wall, _) = migrate_unit(
                vec![open_spec(&spec(i))?],
                vec![open_spec(&spec(i))?],
                1,
                &Link::Plain,
            )?;
            total += wall;
        }
        Ok(total)
    };
    let mut four = || unit(CHANNELS);
    let mut one = || unit(1);
    let series = run_rotating(
        cfg.reps,
        cfg.warmup,
        &mut [&mut sequential, &mut four, &mut one],
    )?;
    let load_after = loadavg();
    let note = format!(
        "{DEVICES} x mock:v2 of {} at {} MB/s each (content=fast), plain TCP loopback, the whole \
         session; ratio = one-after-another time / unit time (ideal {DEVICES}); load average \
         {load_before} before, {load_after} after",
        format_size(size),
        rate / 1_000_000
    );
    let mut out = Vec::new();
    for (index, channels) in [(1, CHANNELS), (2, 1)] {
        let f = Figure::from_paired(
            format!("channels.rated{}.x{DEVICES}.c{channels}", rate / 1_000_000),
            13,
            "4 rated devices as one unit vs one after another",
            format!("one unit, {channels} channel(s)"),
            "one after another",
            "s",
            &Paired::from_series(&series, 0, index),
            true,
            Some(Target::at_least(3.6)),
        )
        .note(note.clone());
        eprintln!("bench: {}", super::v2path::summary(&f));
        out.push(f);
    }
    Ok(out)
}
