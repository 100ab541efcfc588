// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 22, target 4: four fast devices (`mock:v2,profile=xe,data-fd=memfd`, alike) migrated
//! as one unit, against one of them migrated alone: the unit's stop-copy window over the
//! slowest device's own (the devices are alike: any one is the slowest alone).
//!
//! Subject: `migrate_pairs` of the four into four like devices (one stream over one
//! socketpair: a save thread per device, the demultiplexer and a load thread per device on the
//! destination). Baseline: `migrate_local` of one such device. Both windows run from the
//! first source's STOP to the last destination's END_OF_PHASE applied ([`super::window`]).

use std::sync::Arc;

use vfio_mig::MigrationDevice;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig::SaveOptions;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_session::{Error, Result};

use super::rated::{load1, migrate_unit, DEVICES};
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::v2path::summary;
use super::window::{DestinationSide, SourceSide, Window};
use super::Config;

fn spec(cfg: &Config, seed: usize) -> Result<MockSpec> {
    Ok(format!(
        "mock:v2,size={},seed={seed},profile=xe,content=fast,data-fd=memfd",
        format_size(cfg.multi_size)
    )
    .parse()?)
}

/// `DEVICES` sources and as many destinations, built once (the state files outside the runs).
struct Devices {
    srcs: Vec<MockV2>,
    dsts: Vec<MockV2>,
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

/// Milliseconds of the stop-copy window: the first `n` devices as one unit (`n` > 1) or the
/// first alone, with the save pumps' `pipeline` depth.
fn run(cfg: &Config, devs: &Devices, n: usize, pipeline: usize) -> Result<f64> {
    let opts = SaveOptions {
        buffer: cfg.buffer,
        pipeline,
        ..SaveOptions::default()
    };
    let window = Window::default();
    let mut srcs = opened(&devs.srcs[..n])?;
    let mut dsts = opened(&devs.dsts[..n])?;
    if n == 1 {
        migrate_local(
            srcs[0].as_mut(),
            dsts[0].as_mut(),
            &opts,
            &SourceSide(&window),
            &DestinationSide(&window),
        )?;
    } else {
        migrate_unit(
            &mut srcs,
            &mut dsts,
            &opts,
            &SourceSide(&window),
            &DestinationSide(&window),
        )?;
    }
    rerun(&devs.srcs[..n])?;
    let span = window
        .span(n)
        .ok_or_else(|| Error::invalid_input("bench: a device's stop-copy was not observed"))?;
    Ok(span.as_secs_f64() * 1e3)
}

/// Measures the unit figure.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let load_before = load1();
    let mut devs = Devices {
        srcs: Vec::new(),
        dsts: Vec::new(),
    };
    for i in 0..DEVICES {
        let s = spec(cfg, i)?;
        devs.srcs
            .push(MockV2::new(&s).map_err(|e| Error::device("mock", e))?);
        devs.dsts
            .push(MockV2::new(&s).map_err(|e| Error::device("mock", e))?);
    }
    let depth = super::PIPELINED;
    let mut alone = || run(cfg, &devs, 1, depth);
    let mut unit = || run(cfg, &devs, DEVICES, depth);
    let mut alone_inline = || run(cfg, &devs, 1, 0);
    let mut unit_inline = || run(cfg, &devs, DEVICES, 0);
    let series = run_rotating(
        cfg.reps,
        cfg.warmup,
        &mut [&mut alone, &mut unit, &mut alone_inline, &mut unit_inline],
    )?;
    let f = Figure::from_paired(
        format!("unit.memfd.x{DEVICES}"),
        4,
        "fast devices: downtime of 4 as one unit",
        "the unit's stop-copy window (migrate_pairs, one socketpair)",
        "one device alone (migrate_local)",
        "ms",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_most(1.1)),
    )
    .note(format!(
        "{DEVICES} x {}; window: the first source's STOP to the last destination's END_OF_PHASE \
         applied; the unit moves {DEVICES} times the bytes over one stream; ratio = unit / alone; \
         available CPUs {}; load average {load_before} -> {}",
        spec(cfg, 0)?,
        vfio_mig::workspace::available_cores(),
        load1()
    ));
    let inline = Figure::from_paired(
        format!("unit.memfd.x{DEVICES}.inline"),
        0,
        "fast devices: downtime of 4 as one unit",
        "the unit's window, save pumps inline (pipeline 0)",
        "one device alone, pipeline 0",
        "ms",
        &Paired::from_series(&series, 2, 3),
        false,
        None,
    )
    .note("the same runs with every save pump on one thread (no reader thread per device)");
    eprintln!("bench: {}", summary(&f));
    eprintln!("bench: {}", summary(&inline));
    Ok(vec![f, inline])
}
