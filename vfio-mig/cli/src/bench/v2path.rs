// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 1: the v2 data path. The engine as a VMM drives it (the front door's `Source`:
//! stop-and-copy, stream framing and a CRC32C per record included) saving a device into a
//! sink, against a plain `read`/`write` loop with the same buffer size over the same kind of
//! fd into the same kind of sink.
//!
//! Three sources: a `mock:v2` device (its feeder thread generates the content: device-bound on
//! most machines, as a real device would be), [`FastPipe`] (pages spliced in with no copy:
//! consumer-bound, so the engine's own costs show), and an xe-profile `mock:v2` whose data fd
//! is a memfd (`data-fd=memfd`: read at page-cache speed with no thread behind it, as a
//! kernel driver's data fd; issue 22's target 1).

use std::cell::RefCell;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig::{Epoch, NoObserver, SourceOptions};
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::{Error, Result};

use super::io::{copy_loop, gbps, FastPipe, PipeDevice, SinkKind};
use super::report::{Figure, Target};
use super::stats::{run_rotating, thread_cpu, Paired, Stat};
use super::Config;

/// Where the bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `mock:v2` device in STOP_COPY.
    Mock,
    /// A [`FastPipe`].
    Fast,
    /// A `mock:v2,profile=xe,data-fd=memfd` device in STOP_COPY, built once per figure.
    Memfd,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Mock => "mock",
            Source::Fast => "fastpipe",
            Source::Memfd => "memfd",
        }
    }
}

/// How the bytes are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mover {
    Loop,
    /// The front door's `Source` (its save pump's depth chosen from the CPUs available).
    Engine,
    /// The front door's `Source` with the pipelined pump ([`super::PIPELINED`]): the device
    /// read on a thread of its own, the CRC32C and the write on the calling thread.
    Pipelined,
}

struct Run {
    gbps: f64,
    cpu: f64,
    bytes: u64,
}

fn mock_spec(cfg: &Config, source: Source) -> Result<MockSpec> {
    let text = match source {
        // content=fast: the state file is built quicker; its bytes are read at the same speed.
        Source::Memfd => format!(
            "mock:v2,size={},seed=11,profile=xe,content=fast,data-fd=memfd",
            cfg.size
        ),
        Source::Mock | Source::Fast => format!("mock:v2,size={},seed=11", cfg.size),
    };
    Ok(text.parse()?)
}

/// One run; `memfd` is the device of [`Source::Memfd`] (running; it is returned to RUNNING).
fn one_run(
    cfg: &Config,
    source: Source,
    sink: &SinkKind,
    mover: Mover,
    memfd: Option<&MockV2>,
) -> Result<Run> {
    let mut buf = vec![0u8; cfg.buffer];
    let mut out = sink.open()?;
    let cpu0 = thread_cpu();
    let (bytes, started) = match source {
        Source::Mock | Source::Memfd => {
            let mock = match memfd {
                Some(dev) => dev.clone(),
                None => {
                    MockV2::new(&mock_spec(cfg, source)?).map_err(|e| Error::device("mock", e))?
                }
            };
            let again = mock.clone();
            let moved = match mover {
                Mover::Loop => {
                    let t = Instant::now();
                    let fd = feature::set_state(&mock, MigState::StopCopy)
                        .map_err(|e| Error::device("STOP_COPY", e))?
                        .and_then(|s| s.into_fd())
                        .ok_or_else(|| Error::invalid_input("no data fd"))?;
                    let n = copy_loop(fd.as_fd(), &mut out.conn, &mut buf)?;
                    drop(fd);
                    feature::set_state(&mock, MigState::Stop)
                        .map_err(|e| Error::device("STOP", e))?;
                    (n, t)
                }
                Mover::Engine | Mover::Pipelined => {
                    let dev = V2Device::open(Arc::new(mock))?;
                    let depth = (mover == Mover::Pipelined).then_some(super::PIPELINED);
                    let opts = SourceOptions::new(Epoch(1))
                        .pre_copy(false)
                        .buffer(cfg.buffer)
                        .pipeline(depth);
                    let t = Instant::now();
                    let (_, r) = super::front::save_with(
                        vec![dev],
                        &mut out.conn,
                        &opts,
                        None,
                        &NoObserver,
                    )?;
                    (r[0].stop_copy_bytes, t)
                }
            };
            if memfd.is_some() {
                // The next run starts from a running device, as this one did.
                feature::set_state(&again, MigState::Running)
                    .map_err(|e| Error::device("back to RUNNING", e))?;
            }
            moved
        }
        Source::Fast => {
            let pipe = FastPipe::start(cfg.size)?;
            let t = Instant::now();
            let n = match mover {
                Mover::Loop => copy_loop(pipe.read.as_fd(), &mut out.conn, &mut buf)?,
                Mover::Engine | Mover::Pipelined => {
                    let dev = PipeDevice::new(
                        pipe.read.try_clone().map_err(|e| Error::device("dup", e))?,
                    );
                    let (_, r) = super::front::save(
                        vec![dev],
                        &mut out.conn,
                        cfg.buffer,
                        None,
                        &NoObserver,
                    )?;
                    r[0].stop_copy_bytes
                }
            };
            (n, t)
        }
    };
    let received = out.finish()?;
    let g = gbps(bytes, started);
    let cpu = thread_cpu() - cpu0;
    if let Some(r) = received {
        if r < bytes {
            return Err(Error::invalid_input(format!(
                "bench: TCP receiver got {r} of at least {bytes} bytes"
            )));
        }
    }
    Ok(Run {
        gbps: g,
        cpu,
        bytes,
    })
}

/// Measures the v2 figures for `sources` x `sinks`.
pub fn figures(cfg: &Config, sources: &[Source], sinks: &[SinkKind]) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    for &source in sources {
        for sink in sinks {
            let cpu: RefCell<[Vec<f64>; 3]> = RefCell::default();
            let bytes = RefCell::new(0u64);
            let memfd = match source {
                Source::Memfd => Some(
                    MockV2::new(&mock_spec(cfg, source)?).map_err(|e| Error::device("mock", e))?,
                ),
                Source::Mock | Source::Fast => None,
            };
            let run = |m: Mover, slot: usize| -> Result<f64> {
                let r = one_run(cfg, source, sink, m, memfd.as_ref())?;
                cpu.borrow_mut()[slot].push(r.cpu / (r.bytes.max(1) as f64 / (1u64 << 30) as f64));
                *bytes.borrow_mut() = r.bytes;
                Ok(r.gbps)
            };
            let mut base = || run(Mover::Loop, 0);
            let mut engine = || run(Mover::Engine, 1);
            let mut pipelined = || run(Mover::Pipelined, 2);
            // Into /dev/null the memfd's whole cost beside the CRC32C is the kernel's copy out
            // of it: the one sink where the CRC on another core is the figure's difference.
            let with_pipelined = source == Source::Memfd && *sink == SinkKind::Null;
            let series = if with_pipelined {
                run_rotating(
                    cfg.reps,
                    cfg.warmup,
                    &mut [&mut base, &mut engine, &mut pipelined],
                )?
            } else {
                run_rotating(cfg.reps, cfg.warmup, &mut [&mut base, &mut engine])?
            };
            let cpu = cpu.into_inner();
            let c = |i: usize| Stat::of(&cpu[i][cfg.warmup.min(cpu[i].len())..]).median * 1e3;
            let mb = *bytes.borrow() as f64 / (1 << 20) as f64;
            let group = format!("v2 data path, {} source", source.name());
            let base_name = format!("read/write loop, {} KiB buffer", cfg.buffer >> 10);
            let device_note = match source {
                Source::Mock => {
                    "the mock's feeder thread (content generation + pipe write) runs on the other \
                     core and usually bounds both sides; "
                }
                Source::Fast => "consumer-bound: the feeder vmsplices constant pages; ",
                Source::Memfd => {
                    "consumer-bound: the data fd is a memfd read at page-cache speed, no device \
                     thread; "
                }
            };
            let engine = Figure::from_paired(
                format!("v2.{}.{}.engine", source.name(), sink.name()),
                if source == Source::Mock { 1 } else { 0 },
                group.clone(),
                "front door (Source::switch_over)",
                base_name.clone(),
                "GB/s",
                &Paired::from_series(&series, 0, 1),
                false,
                // Issue 13's target 3 for the CPU-bound mock path; the fast pipe has none.
                Some(Target::at_least(if source == Source::Mock {
                    0.97
                } else {
                    0.95
                })),
            )
            .note(format!(
                "{device_note}{mb:.0} MiB into {}; the save pump's depth from the CPUs available \
                 ({} here); CPU per GiB of the calling thread: loop {:.0} ms, engine {:.0} ms",
                sink.name(),
                std::thread::available_parallelism().map_or(1, |n| n.get()),
                c(0),
                c(1)
            ));
            eprintln!("bench: {}", summary(&engine));
            out.push(engine);
            if with_pipelined {
                let f = Figure::from_paired(
                    format!("v2.{}.{}.pipelined", source.name(), sink.name()),
                    0,
                    group.clone(),
                    format!("front door, pipelined pump (depth {})", super::PIPELINED),
                    base_name.clone(),
                    "GB/s",
                    &Paired::from_series(&series, 0, 2),
                    false,
                    None,
                )
                .note(format!(
                    "diagnostic: the CRC32C and the write on the calling thread, the memfd read \
                     on a thread of its own (the depth the front door chooses from 3 CPUs up); \
                     CPU per GiB of the calling thread {:.0} ms",
                    c(2)
                ));
                eprintln!("bench: {}", summary(&f));
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// One line for the progress log.
pub fn summary(f: &Figure) -> String {
    format!(
        "{}: {} {:.3} vs {} {:.3} {} -> ratio {:.3} ({:.3}..{:.3})",
        f.id,
        f.subject_name,
        f.subject.median,
        f.baseline_name,
        f.baseline.median,
        f.unit,
        f.ratio.median,
        f.ratio.min,
        f.ratio.max
    )
}
