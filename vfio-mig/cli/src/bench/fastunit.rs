// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 22, target 4: four fast devices (`mock:v2,profile=xe,data-fd=memfd`, alike) migrated
//! as one unit, against one of them migrated alone: the unit's stop-copy window over the
//! slowest device's own (the devices are alike: any one is the slowest alone).
//!
//! Subject: the front door's migration of the four into four like devices as one unit
//! ([`super::front::migrate`]: one stream over one socketpair, a save thread per device on the
//! source, the destination's devices loaded in parallel per batch of records). Baseline: one
//! such device migrated alone the same way. Both windows run from the first source's STOP to
//! the last destination's END_OF_PHASE applied ([`super::window`]).
//!
//! Twice: with memfd devices (nothing bounds them but the CPU: on a machine with fewer cores
//! than the unit's busy threads the unit cannot overlap), and with devices bound by their own
//! rate (`rate=`, a device thread producing the state at that many bytes per second, as
//! firmware or DMA bounds a real one), where the parallel path shows.

use std::cell::RefCell;
use std::sync::Arc;

use vfio_mig::MigrationDevice;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::{Error, Result};

use super::rated::{load1, DEVICES};
use super::report::{Figure, Target};
use super::stats::{process_cpu, run_rotating, Paired, Stat};
use super::v2path::summary;
use super::window::{DestinationSide, SourceSide, Window};
use super::Config;

/// Each device's own rate in the rated figure: four of them (600 MB/s) fit what one process
/// moves through both ends of a migration on two CPUs (about 1 GB/s, docs/benchmarks.md).
const RATE: u64 = 150_000_000;

/// The device: a memfd data fd (`rate: None`), or a pipe its thread fills at `rate` bytes per
/// second.
fn spec(cfg: &Config, seed: usize, rate: Option<u64>) -> Result<MockSpec> {
    let size = match rate {
        None => cfg.multi_size,
        // About a second alone at the rate.
        Some(r) => cfg.multi_size.min(r.next_power_of_two() / 2),
    };
    let data = match rate {
        None => "data-fd=memfd".to_owned(),
        Some(r) => format!("rate={r}"),
    };
    Ok(format!(
        "mock:v2,size={},seed={seed},profile=xe,content=fast,{data}",
        format_size(size)
    )
    .parse()?)
}

/// `DEVICES` sources and as many destinations, built once (the state files outside the runs).
struct Devices {
    srcs: Vec<MockV2>,
    dsts: Vec<MockV2>,
    /// Each device's state size.
    bytes: u64,
}

fn opened(mocks: &[MockV2]) -> Result<Vec<Box<dyn MigrationDevice>>> {
    mocks
        .iter()
        .map(|m| -> Result<Box<dyn MigrationDevice>> {
            Ok(Box::new(V2Device::open(Arc::new(m.clone()))?))
        })
        .collect()
}

/// The sources run again for the next run (the migration left them stopped).
fn rerun(srcs: &[MockV2]) -> Result<()> {
    for s in srcs {
        feature::set_state(s, MigState::Running).map_err(|e| Error::device("RUNNING", e))?;
    }
    Ok(())
}

/// Milliseconds of the stop-copy window: the first `n` devices as one unit (or the first
/// alone, `n` = 1); the process's CPU milliseconds per GiB moved go to `cpu`.
fn run(cfg: &Config, devs: &Devices, n: usize, cpu: &RefCell<Vec<f64>>) -> Result<f64> {
    let window = Window::default();
    let cpu0 = process_cpu();
    super::front::migrate(
        opened(&devs.srcs[..n])?,
        opened(&devs.dsts[..n])?,
        cfg.buffer,
        &SourceSide(&window),
        &DestinationSide(&window),
    )?;
    let used = process_cpu() - cpu0;
    let gib = (devs.bytes * n as u64) as f64 / (1u64 << 30) as f64;
    cpu.borrow_mut().push(used / gib * 1e3);
    rerun(&devs.srcs[..n])?;
    let span = window
        .span(n)
        .ok_or_else(|| Error::invalid_input("bench: a device's stop-copy was not observed"))?;
    Ok(span.as_secs_f64() * 1e3)
}

fn built(cfg: &Config, rate: Option<u64>) -> Result<Devices> {
    let mut devs = Devices {
        srcs: Vec::new(),
        dsts: Vec::new(),
        bytes: spec(cfg, 0, rate)?.size,
    };
    for i in 0..DEVICES {
        let s = spec(cfg, i, rate)?;
        devs.srcs
            .push(MockV2::new(&s).map_err(|e| Error::device("mock", e))?);
        devs.dsts
            .push(MockV2::new(&s).map_err(|e| Error::device("mock", e))?);
    }
    Ok(devs)
}

/// Measures the unit figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let load_before = load1();
    let fast = built(cfg, None)?;
    let rated = built(cfg, Some(RATE))?;
    let cpu: [RefCell<Vec<f64>>; 4] = Default::default();
    let mut alone = || run(cfg, &fast, 1, &cpu[0]);
    let mut unit = || run(cfg, &fast, DEVICES, &cpu[1]);
    let mut rated_alone = || run(cfg, &rated, 1, &cpu[2]);
    let mut rated_unit = || run(cfg, &rated, DEVICES, &cpu[3]);
    let series = run_rotating(
        cfg.reps,
        cfg.warmup,
        &mut [&mut alone, &mut unit, &mut rated_alone, &mut rated_unit],
    )?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let c = |i: usize| {
        let v = cpu[i].borrow();
        Stat::of(&v[cfg.warmup.min(v.len())..]).median
    };
    let f = Figure::from_paired(
        format!("unit.memfd.x{DEVICES}"),
        4,
        "fast devices: downtime of 4 as one unit",
        "the unit's stop-copy window (front door, one socketpair)",
        "one device alone (front door)",
        "ms",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_most(1.1)),
    )
    .note(format!(
        "{DEVICES} x {}; window: the first source's STOP to the last destination's END_OF_PHASE \
         applied; the unit moves {DEVICES} times the bytes over one stream, every byte CPU on \
         both sides; ratio = unit / alone; CPUs {cpus}; the process's CPU per GiB moved: \
         alone {:.0} ms, unit {:.0} ms; load average {load_before} -> {}",
        spec(cfg, 0, None)?,
        c(0),
        c(1),
        load1()
    ));
    let rated_figure = Figure::from_paired(
        format!("unit.rated.x{DEVICES}"),
        4,
        "fast devices: downtime of 4 as one unit",
        format!(
            "the unit's window, devices bound by their own rate ({} MB/s each)",
            RATE / 1_000_000
        ),
        "one such device alone",
        "ms",
        &Paired::from_series(&series, 2, 3),
        false,
        Some(Target::at_most(1.1)),
    )
    .note(format!(
        "{DEVICES} x {}: each device's thread produces its state at its rate, as a real \
         device's DMA or firmware bounds it; the same runs, interleaved; the process's CPU per \
         GiB moved: alone {:.0} ms, unit {:.0} ms",
        spec(cfg, 0, Some(RATE))?,
        c(2),
        c(3)
    ));
    eprintln!("bench: {}", summary(&f));
    eprintln!("bench: {}", summary(&rated_figure));
    Ok(vec![f, rated_figure])
}
