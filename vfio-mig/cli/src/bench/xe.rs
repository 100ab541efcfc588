// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 22, target 3: an xe-class stop-copy migration (8 GiB of VRAM state by default,
//! `--xe-size`) with source and destination in one process, and its peak memory.
//!
//! Subject: the front door's migration of a `mock:v2,profile=xe,data-fd=memfd` device into a
//! like one ([`super::front::migrate`]: a `Source` on one thread writing into a socketpair
//! behind the session's write buffer, a `Destination` reading it on another, the CRC32C on
//! both sides). Baseline: the raw copy loop for the same bytes, two threads over a
//! socketpair: `read` of the source's data fd and `write` into the socket, `read` of the
//! socket and the destination device's write of what was read ([`super::io::DeviceSink`]). Both windows run from the source's
//! STOP transition to the last stop-copy byte in the destination's data fd (the engine: its
//! END_OF_PHASE applied); the destination device's RESUMING -> STOP (the mock checks all
//! 8 GiB) follows on both and is left out.
//!
//! Memory: the states are memfds (shared memory the devices own, as VRAM is the GPU's), read
//! and written with `read`/`write`, never mapped, so they are not in the process's resident
//! set. The figure is the process's peak resident set during the run (`VmHWM` after resetting
//! it with `/proc/self/clear_refs`), whole: the engine's buffers and threads, the mocks'
//! bookkeeping, the program itself.

use std::cell::RefCell;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig::MigrationDevice;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::{Error, Result};

use super::io::{copy_loop, DeviceSink};
use super::memory::{peak_rss_kib, LIMIT_MIB};
use super::rated::load1;
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired, Stat};
use super::v2path::summary;
use super::window::{DestinationSide, SourceSide, Window};
use super::Config;

/// The target: the engine's downtime over the raw loop's.
const DOWNTIME_RATIO: f64 = 1.15;
/// Repetitions of the xe figures at most.
const XE_REPS: usize = 3;

/// 64 KiB content pages: the mocks' own per-page tables (generations, pages received) live in
/// this process, and at 4 KiB pages they take 16 MiB per device at 8 GiB (the first run
/// measured the raw loop's process at 68 MiB: the mocks', not the engine's).
fn spec(cfg: &Config) -> Result<MockSpec> {
    Ok(format!(
        "mock:v2,size={},seed=13,page=64K,profile=xe,content=fast,data-fd=memfd",
        format_size(cfg.xe_size)
    )
    .parse()?)
}

fn set(dev: &MockV2, state: MigState, what: &str) -> Result<Option<std::os::fd::OwnedFd>> {
    Ok(feature::set_state(dev, state)
        .map_err(|e| Error::device(what, e))?
        .and_then(|s| s.into_fd()))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
fn mem_available() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kib| kib << 10)
}

/// The two states (the source's image, the destination's resuming memfd) live in memory at
/// once: refuses, before building anything, a size the machine cannot hold with a quarter
/// to spare, rather than have the kernel's OOM killer pick a process.
fn check_memory(size: u64) -> Result<()> {
    let need = 2 * size + size / 2;
    match mem_available() {
        Some(avail) if avail < need => Err(Error::invalid_input(format!(
            "bench xe: two {} memfds need about {} MiB, MemAvailable is {} MiB: give a \
             smaller --xe-size",
            format_size(size),
            need >> 20,
            avail >> 20
        ))),
        _ => Ok(()),
    }
}

/// Resets the peak resident set to the current one (`clear_refs` 5, Linux 4.0+).
fn reset_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| Error::transport("bench: reset VmHWM (/proc/self/clear_refs)", e))
}

struct Run {
    ms: f64,
    peak_mib: f64,
}

/// The raw copy loop: the window in milliseconds.
fn raw_loop(cfg: &Config, src: &MockV2, dst: &MockV2) -> Result<f64> {
    let (tx, rx) = UnixStream::pair().map_err(|e| Error::transport("socketpair", e))?;
    let mut into = V2Device::open(Arc::new(dst.clone()))?;
    into.start_resume()?;
    let t0 = Instant::now();
    let (sent, received) = std::thread::scope(|s| {
        let sender = s.spawn(move || -> Result<u64> {
            let mut tx = tx;
            set(src, MigState::Stop, "STOP")?;
            let from = set(src, MigState::StopCopy, "STOP_COPY")?
                .ok_or_else(|| Error::invalid_input("no data fd"))?;
            Ok(copy_loop(
                from.as_fd(),
                &mut tx,
                &mut vec![0u8; cfg.buffer],
            )?)
        });
        let received = copy_loop(
            rx.as_fd(),
            &mut DeviceSink(&mut into),
            &mut vec![0u8; cfg.buffer],
        )
        .map(|n| (n, Instant::now()));
        (sender.join(), received)
    });
    let sent = sent.map_err(|_| Error::invalid_input("bench: the sender panicked"))??;
    let (received, t1) = received?;
    if sent != received || sent == 0 {
        return Err(Error::invalid_input(format!(
            "bench: the loop sent {sent} bytes and received {received}"
        )));
    }
    // RESUMING -> STOP: the mock checks the state.
    into.load_state()?;
    drop(into);
    set(dst, MigState::Running, "destination RUNNING")?;
    set(src, MigState::Stop, "STOP")?;
    set(src, MigState::Running, "RUNNING")?;
    Ok(t1.duration_since(t0).as_secs_f64() * 1e3)
}

/// The front door's migration: the window in milliseconds.
fn engine(cfg: &Config, src: &MockV2, dst: &MockV2) -> Result<f64> {
    let s = V2Device::open(Arc::new(src.clone()))?;
    let d = V2Device::open(Arc::new(dst.clone()))?;
    let window = Window::default();
    super::front::migrate(
        vec![s],
        vec![d],
        cfg.buffer,
        &SourceSide(&window),
        &DestinationSide(&window),
    )?;
    // The source is stopped after the handoff: it runs again for the next run.
    set(src, MigState::Running, "RUNNING")?;
    let span = window
        .span(1)
        .ok_or_else(|| Error::invalid_input("bench: no stop-copy window observed"))?;
    Ok(span.as_secs_f64() * 1e3)
}

fn measured(f: impl FnOnce() -> Result<f64>) -> Result<Run> {
    reset_peak()?;
    let ms = f()?;
    Ok(Run {
        ms,
        peak_mib: peak_rss_kib() as f64 / 1024.0,
    })
}

/// Measures the xe figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let spec = spec(cfg)?;
    check_memory(cfg.xe_size)?;
    let load_before = load1();
    let built = Instant::now();
    let src = MockV2::new(&spec).map_err(|e| Error::device("source mock", e))?;
    let dst = MockV2::new(&spec).map_err(|e| Error::device("destination mock", e))?;
    eprintln!(
        "bench: xe: the {} state file built in {:.1} s",
        format_size(cfg.xe_size),
        built.elapsed().as_secs_f64()
    );
    let peaks: RefCell<[Vec<f64>; 2]> = RefCell::default();
    let mut base = || {
        let r = measured(|| raw_loop(cfg, &src, &dst))?;
        peaks.borrow_mut()[0].push(r.peak_mib);
        Ok::<f64, Error>(r.ms)
    };
    let mut subject = || {
        let r = measured(|| engine(cfg, &src, &dst))?;
        peaks.borrow_mut()[1].push(r.peak_mib);
        Ok(r.ms)
    };
    // Each run moves the whole state twice over (about ten seconds at 8 GiB on a busy
    // machine, and as long again for the destination's check): at most 3 repetitions.
    let series = run_rotating(
        cfg.reps.min(XE_REPS),
        cfg.warmup,
        &mut [&mut base, &mut subject],
    )?;
    let peaks = peaks.into_inner();
    let size = format_size(cfg.xe_size);
    let downtime = Figure::from_paired(
        format!("xe.{size}.downtime"),
        3,
        "xe-class stop-copy migration, one process",
        "front door: Source -> socketpair -> Destination",
        "raw copy loop, two threads over a socketpair",
        "ms",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_most(DOWNTIME_RATIO)),
    )
    .note(format!(
        "{spec}; window: the source's STOP to the last stop-copy byte in the destination's data \
         fd (its RESUMING -> STOP check left out on both); ratio = engine / loop; load average \
         {load_before} -> {}",
        load1()
    ));
    let recorded = |i: usize| peaks[i][cfg.warmup.min(peaks[i].len())..].to_vec();
    let memory = Figure::from_paired(
        format!("xe.{size}.peak-rss"),
        3,
        "xe-class stop-copy migration, one process",
        "peak RSS of the process during the front door's migration",
        "peak RSS during the raw copy loop",
        "MiB",
        &Paired {
            baseline: recorded(0),
            subject: recorded(1),
        },
        false,
        Some(Target::subject_at_most(LIMIT_MIB)),
    )
    .note(format!(
        "VmHWM after writing 5 to /proc/self/clear_refs before each run: the whole process \
         (program, both mocks' tables, the engine's ring and threads); the two {size} states \
         are unmapped memfds (shmem), in no process's RSS; engine peak max {:.1} MiB",
        Stat::of(&recorded(1)).max
    ));
    eprintln!("bench: {}", summary(&downtime));
    eprintln!("bench: {}", summary(&memory));
    Ok(vec![downtime, memory])
}
