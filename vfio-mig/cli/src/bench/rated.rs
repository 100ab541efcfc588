// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Bandwidth-modelled devices (`mock:v2,rate=...,content=fast`): devices bound by their own
//! data rate, as mlx5 or hisi are bound by firmware and DMA, at almost no host CPU of their
//! own, so that what several of them cost the engine shows on a small machine.
//!
//! | figure            | subject                                   | baseline                          |
//! |-------------------|-------------------------------------------|-----------------------------------|
//! | `rated.x4`        | 4 devices as one `Source` (and 4 threads) | the same 4 saved one after another |
//! | `rated.one.SINK`  | one device, the engine into a file / TCP  | a read/write loop at the same rate |
//! | `rated.unit`      | stop-and-copy window of 4 devices migrated as one unit (`migrate_pairs`) | one such device's own stop-copy time, migrated alone |
//!
//! Every subject and its baseline run interleaved in the same process; each figure's note
//! carries the load average when it was measured (the machine is shared).

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig::wire::StreamHeader;
use vfio_mig::MigrationDevice;
use vfio_mig::NoObserver;
use vfio_mig::Observer;
use vfio_mig::SaveOptions;
use vfio_mig::{Epoch, SourceOptions};
use vfio_mig_fence::MemoryFence;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::handshake::{migrate_local, migrate_pairs};
use vfio_mig_session::{Error, Result};

use super::io::{copy_loop, SinkKind};
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::window::{SourceSide, Window};
use super::Config;

/// Devices of the parallel and unit figures.
pub const DEVICES: usize = 4;
/// State-change latency of the unit figure's devices (firmware commands take milliseconds).
pub const UNIT_LATENCY: &str = "2ms";

/// The spec of bandwidth-modelled device `seed`.
fn spec(cfg: &Config, seed: usize, extra: &str) -> Result<MockSpec> {
    Ok(format!(
        "mock:v2,size={},seed={seed},rate={},content=fast{extra}",
        format_size(cfg.rated_size),
        format_size(cfg.rated_rate)
    )
    .parse::<MockSpec>()?)
}

fn device(spec: &MockSpec) -> Result<Box<dyn MigrationDevice>> {
    let mock = MockV2::new(spec).map_err(|e| Error::device("mock", e))?;
    Ok(Box::new(V2Device::open(Arc::new(mock))?))
}

fn devices(cfg: &Config, extra: &str) -> Result<Vec<Box<dyn MigrationDevice>>> {
    (0..DEVICES)
        .map(|i| device(&spec(cfg, i, extra)?))
        .collect()
}

/// The devices as the engine takes them.
pub fn refs(devs: &mut [Box<dyn MigrationDevice>]) -> Vec<&mut dyn MigrationDevice> {
    devs.iter_mut()
        .map(|d| -> &mut dyn MigrationDevice { d.as_mut() })
        .collect()
}

/// `/proc/loadavg`'s 1-minute figure now.
pub fn load1() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .next()
        .unwrap_or("?")
        .to_owned()
}

/// Saves one device into its own stream into `sink`; its stop-copy bytes.
fn save_one(dev: &mut dyn MigrationDevice, sink: &SinkKind, buffer: usize) -> Result<u64> {
    save_one_with(dev, sink, buffer, super::PIPELINED)
}

/// [`save_one`] with the pump's `pipeline` depth (0: read, CRC and write on one thread),
/// through the front door.
fn save_one_with(
    dev: &mut dyn MigrationDevice,
    sink: &SinkKind,
    buffer: usize,
    pipeline: usize,
) -> Result<u64> {
    let mut out = sink.open()?;
    let opts = SourceOptions::new(Epoch(1))
        .pre_copy(false)
        .buffer(buffer)
        .pipeline(Some(pipeline));
    let (_, reports) = super::front::save_with(vec![dev], &mut out.conn, &opts, None, &NoObserver)?;
    out.finish()?;
    Ok(reports[0].stop_copy_bytes)
}

// ---- (a) four devices in parallel ------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Parallel {
    OneAfterAnother,
    SaveAll,
    Threads,
}

/// Seconds to save `DEVICES` fresh devices into `/dev/null`.
fn run_four(cfg: &Config, how: Parallel) -> Result<f64> {
    let mut devs = devices(cfg, "")?;
    let t = Instant::now();
    match how {
        Parallel::OneAfterAnother => {
            for d in &mut devs {
                save_one(d.as_mut(), &SinkKind::Null, cfg.buffer)?;
            }
        }
        Parallel::Threads => std::thread::scope(|s| {
            let threads: Vec<_> = devs
                .iter_mut()
                .map(|d| s.spawn(move || save_one(d.as_mut(), &SinkKind::Null, cfg.buffer)))
                .collect();
            for t in threads {
                t.join()
                    .map_err(|_| Error::invalid_input("a bench save thread panicked"))??;
            }
            Ok::<(), Error>(())
        })?,
        Parallel::SaveAll => {
            let mut sink = SinkKind::Null.open()?;
            let opts = SourceOptions::new(Epoch(1))
                .pre_copy(false)
                .buffer(cfg.buffer)
                .allow_non_p2p_unit(true);
            super::front::save_with(refs(&mut devs), &mut sink.conn, &opts, None, &NoObserver)?;
            sink.finish()?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn parallel_figures(cfg: &Config, out: &mut Vec<Figure>) -> Result<()> {
    let load = load1();
    let mut seq = || run_four(cfg, Parallel::OneAfterAnother);
    let mut all = || run_four(cfg, Parallel::SaveAll);
    let mut thr = || run_four(cfg, Parallel::Threads);
    let series = run_rotating(cfg.reps, cfg.warmup, &mut [&mut seq, &mut all, &mut thr])?;
    let ideal = cfg.rated_size as f64 / cfg.rated_rate as f64;
    for (slot, id, name) in [
        (1, "save_all", "one Source of the 4 as a unit, one stream"),
        (
            2,
            "threads",
            "4 threads x a Source of one device, a stream each",
        ),
    ] {
        let f = Figure::from_paired(
            format!("rated.x{DEVICES}.{id}"),
            1,
            "bandwidth-modelled: 4 devices in parallel vs one after another",
            name,
            "a Source of one device, one after another",
            "s",
            &Paired::from_series(&series, 0, slot),
            true,
            Some(Target::at_least(3.6)),
        )
        .note(format!(
            "{DEVICES} x {} into /dev/null; one device alone takes {ideal:.3} s at its rate; \
             ratio = sequential time / parallel time (ideal 4); load average {load} -> {}",
            spec(cfg, 0, "")?,
            load1()
        ));
        eprintln!("bench: {}", super::v2path::summary(&f));
        out.push(f);
    }
    Ok(())
}

// ---- (b) one device: engine vs raw loop -----------------------------------------------

/// Seconds of one device's stop-and-copy into `sink`: the engine with the pump's `pipeline`
/// depth, or (`None`) the raw loop.
fn run_one(cfg: &Config, sink: &SinkKind, engine: Option<usize>) -> Result<f64> {
    let spec = spec(cfg, 7, "")?;
    let mock = MockV2::new(&spec).map_err(|e| Error::device("mock", e))?;
    if let Some(pipeline) = engine {
        let mut dev = V2Device::open(Arc::new(mock))?;
        let t = Instant::now();
        save_one_with(&mut dev, sink, cfg.buffer, pipeline)?;
        return Ok(t.elapsed().as_secs_f64());
    }
    let mut buf = vec![0u8; cfg.buffer];
    let mut out = sink.open()?;
    let t = Instant::now();
    feature::set_state(&mock, MigState::Stop).map_err(|e| Error::device("STOP", e))?;
    let fd = feature::set_state(&mock, MigState::StopCopy)
        .map_err(|e| Error::device("STOP_COPY", e))?
        .and_then(|s| s.into_fd())
        .ok_or_else(|| Error::invalid_input("no data fd"))?;
    copy_loop(fd.as_fd(), &mut out.conn, &mut buf)?;
    drop(fd);
    feature::set_state(&mock, MigState::Stop).map_err(|e| Error::device("STOP", e))?;
    out.finish()?;
    Ok(t.elapsed().as_secs_f64())
}

fn one_device_figures(cfg: &Config, out: &mut Vec<Figure>) -> Result<()> {
    for sink in [SinkKind::File(cfg.file_dir.clone()), SinkKind::Tcp] {
        let load = load1();
        let mut base = || run_one(cfg, &sink, None);
        let mut engine = || run_one(cfg, &sink, Some(super::PIPELINED));
        let mut inline = || run_one(cfg, &sink, Some(0));
        let series = run_rotating(
            cfg.reps,
            cfg.warmup,
            &mut [&mut base, &mut engine, &mut inline],
        )?;
        let f = Figure::from_paired(
            format!("rated.one.{}", sink.name()),
            2,
            "bandwidth-modelled: one device, engine vs raw loop",
            "front door (Source)",
            format!("read/write loop, {} KiB buffer", cfg.buffer >> 10),
            "s",
            &Paired::from_series(&series, 0, 1),
            true,
            Some(Target::at_least(0.98)),
        )
        .note(format!(
            "{} into {}; both runs include the STOP_COPY and STOP transitions; ratio = loop \
             time / engine time; load average {load} -> {}",
            spec(cfg, 7, "")?,
            sink.name(),
            load1()
        ));
        eprintln!("bench: {}", super::v2path::summary(&f));
        out.push(f);
        let f = Figure::from_paired(
            format!("rated.one.{}.inline", sink.name()),
            0,
            "bandwidth-modelled: one device, engine vs raw loop",
            "engine, pipeline off (read + CRC + write on one thread)",
            format!("read/write loop, {} KiB buffer", cfg.buffer >> 10),
            "s",
            &Paired::from_series(&series, 0, 2),
            true,
            None,
        )
        .note("the engine before issue 13 item 3, for comparison in the same run");
        eprintln!("bench: {}", super::v2path::summary(&f));
        out.push(f);
    }
    Ok(())
}

// ---- (c) downtime of four devices as one unit -----------------------------------------

/// Milliseconds: the stop-and-copy window of `DEVICES` devices migrated as one unit, or one
/// device's own stop-copy time migrated alone.
fn run_unit(cfg: &Config, unit: bool, pipeline: usize) -> Result<f64> {
    let extra = format!(",latency={UNIT_LATENCY}");
    let opts = SaveOptions {
        buffer: cfg.buffer,
        pipeline,
        ..SaveOptions::default()
    };
    if !unit {
        let mut src = device(&spec(cfg, 0, &extra)?)?;
        let mut dst = device(&spec(cfg, 0, &extra)?)?;
        let r = migrate_local(src.as_mut(), dst.as_mut(), &opts, &NoObserver, &NoObserver)?;
        return Ok(r.save.stop_copy_time.as_secs_f64() * 1e3);
    }
    let mut srcs = devices(cfg, &extra)?;
    let mut dsts = devices(cfg, &extra)?;
    let window = Window::default();
    migrate_unit(
        &mut srcs,
        &mut dsts,
        &opts,
        &SourceSide(&window),
        &NoObserver,
    )?;
    let span = window
        .source_span()
        .ok_or_else(|| Error::invalid_input("bench: no stop-and-copy observed"))?;
    Ok(span.as_secs_f64() * 1e3)
}

/// Migrates `srcs[i]` into `dsts[i]` as one unit (`migrate_pairs`: one stream over one
/// socketpair).
pub fn migrate_unit(
    srcs: &mut [Box<dyn MigrationDevice>],
    dsts: &mut [Box<dyn MigrationDevice>],
    opts: &SaveOptions,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> Result<()> {
    let mut src_refs = refs(srcs);
    let mut dst_refs = refs(dsts);
    let header = {
        let all: Vec<&dyn MigrationDevice> = src_refs.iter().map(|d| &**d).collect();
        StreamHeader::new(&all, false, 1)?
    };
    migrate_pairs(
        &mut src_refs,
        &mut dst_refs,
        &header,
        opts,
        &mut MemoryFence::new(),
        src_obs,
        dst_obs,
    )?;
    Ok(())
}

fn unit_figures(cfg: &Config, out: &mut Vec<Figure>) -> Result<()> {
    let load = load1();
    let depth = super::PIPELINED;
    let mut solo = || run_unit(cfg, false, depth);
    let mut unit = || run_unit(cfg, true, depth);
    let mut solo_inline = || run_unit(cfg, false, 0);
    let mut unit_inline = || run_unit(cfg, true, 0);
    let series = run_rotating(
        cfg.reps,
        cfg.warmup,
        &mut [&mut solo, &mut unit, &mut solo_inline, &mut unit_inline],
    )?;
    let f = Figure::from_paired(
        format!("rated.unit.x{DEVICES}"),
        5,
        "bandwidth-modelled: downtime of 4 devices as one unit",
        "stop-and-copy window of the unit (first device stopping to last done)",
        "one device's own stop-copy time, migrated alone",
        "ms",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_most(1.1)),
    )
    .note(format!(
        "{DEVICES} x {} into {DEVICES} like devices over one socketpair (migrate_pairs: \
         handshake, demux, load on the destination); the window excludes quiesce_all (one \
         RUNNING_P2P SET per device, all in parallel, ending before any device stops); \
         pipelined pump; ratio = unit / alone; load average {load} -> {}",
        spec(cfg, 0, &format!(",latency={UNIT_LATENCY}"))?,
        load1()
    ));
    eprintln!("bench: {}", super::v2path::summary(&f));
    out.push(f);
    let f = Figure::from_paired(
        format!("rated.unit.x{DEVICES}.inline"),
        0,
        "bandwidth-modelled: downtime of 4 devices as one unit",
        "the unit's window, pipeline off",
        "one device alone, pipeline off",
        "ms",
        &Paired::from_series(&series, 2, 3),
        false,
        None,
    )
    .note("the pump before issue 13 item 3 (read + CRC + write on one thread), same run");
    eprintln!("bench: {}", super::v2path::summary(&f));
    out.push(f);
    Ok(())
}

/// Measures the bandwidth-modelled figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    parallel_figures(cfg, &mut out)?;
    one_device_figures(cfg, &mut out)?;
    unit_figures(cfg, &mut out)?;
    Ok(out)
}
