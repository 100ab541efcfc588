// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 5: several devices. Four mock devices saved in parallel against the same four saved
//! one after another (a front-door `Source` of one device each), on however many cores the
//! machine has (2 on ours).
//!
//! Two parallel subjects: one `Source` of the four as a unit (one stream, a thread per device
//! in stop-and-copy) and four threads each saving one device with a `Source` of its own (a
//! stream each: the upper bound of a thread per device, without the unit's shared stream).

use std::sync::Arc;
use std::time::Instant;

use vfio_mig::backend::V1Device;
use vfio_mig::backend::V2Device;
use vfio_mig::{Epoch, MigrationDevice, NoObserver, SourceOptions, DEFAULT_BUFFER};
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::MockSpec;
use vfio_mig_session::{Error, Result};

use super::io::SinkKind;
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::Config;

/// Devices per run.
pub const DEVICES: usize = 4;

fn open(proto: &str, size: u64, seed: usize) -> Result<Box<dyn MigrationDevice>> {
    let spec: MockSpec = format!("mock:{proto},size={},seed={seed}", format_size(size)).parse()?;
    let (io, _handle) = vfio_mig_mock::open(&spec).map_err(|e| Error::device("mock", e))?;
    Ok(match proto {
        "v1" => Box::new(V1Device::open(io)?),
        _ => Box::new(V2Device::open(Arc::clone(&io))?),
    })
}

/// Saves one device into `/dev/null`; its bytes.
fn save_one(dev: Box<dyn MigrationDevice>) -> Result<u64> {
    let mut sink = SinkKind::Null.open()?;
    let (_, r) = super::front::save(vec![dev], &mut sink.conn, DEFAULT_BUFFER, None, &NoObserver)?;
    sink.finish()?;
    Ok(r[0].stop_copy_bytes)
}

/// Seconds to save `DEVICES` fresh devices as one unit: one `Source`, one stream into
/// `/dev/null`, a thread per device, quiesce before stop-and-copy, trailer, STOP.
fn run_unit(proto: &str, size: u64) -> Result<f64> {
    let devs = (0..DEVICES)
        .map(|i| open(proto, size, i))
        .collect::<Result<Vec<_>>>()?;
    let mut sink = SinkKind::Null.open()?;
    // v1 has no P2P states, so a v1 unit needs the explicit opt-in; these mocks do no DMA, so
    // no device can write into a stopped peer, and the figure is what it measures: parallelism.
    let opts = SourceOptions::new(Epoch(1))
        .pre_copy(false)
        .allow_non_p2p_unit(proto == "v1");
    let t = Instant::now();
    super::front::save_with(devs, &mut sink.conn, &opts, None, &NoObserver)?;
    let secs = t.elapsed().as_secs_f64();
    sink.finish()?;
    Ok(secs)
}

/// Seconds to save `DEVICES` fresh devices, in parallel or one after another.
fn run(proto: &str, size: u64, parallel: bool) -> Result<f64> {
    let devs = (0..DEVICES)
        .map(|i| open(proto, size, i))
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    if parallel {
        std::thread::scope(|s| {
            let handles: Vec<_> = devs
                .into_iter()
                .map(|d| s.spawn(move || save_one(d)))
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| Error::invalid_input("a bench save thread panicked"))??;
            }
            Ok::<(), Error>(())
        })?;
    } else {
        for d in devs {
            save_one(d)?;
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Measures the multi-device figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for proto in ["v1", "v2"] {
        let mut seq = || run(proto, cfg.multi_size, false);
        let mut all = || run_unit(proto, cfg.multi_size);
        let mut par = || run(proto, cfg.multi_size, true);
        let series = run_rotating(cfg.reps, cfg.warmup, &mut [&mut seq, &mut all, &mut par])?;
        let common = format!(
            "{DEVICES} x mock:{proto} of {} each into /dev/null on {cpus} CPUs; ratio = sequential \
             time / parallel time{}",
            format_size(cfg.multi_size),
            if proto == "v2" {
                "; each mock:v2 device also runs its own feeder thread, so one save already \
                 keeps 2 threads busy"
            } else {
                ""
            }
        );
        for (slot, id, name, what) in [
            (
                1,
                "save_all",
                "one Source of the 4 as a unit",
                "one stream, a thread per device (quiesce all, then stop-and-copy in parallel)",
            ),
            (
                2,
                "threads",
                "4 threads x a Source of one device",
                "a thread per device over the per-device API, a stream each",
            ),
        ] {
            let f = Figure::from_paired(
                format!("multi.{proto}.x{DEVICES}.{id}"),
                5,
                "4 devices: parallel vs one after another",
                name,
                "a Source of one device, one after another",
                "s",
                &Paired::from_series(&series, 0, slot),
                true,
                Some(Target::at_least(1.6)),
            )
            .note(format!("{common}; subject: {what}"));
            eprintln!("bench: {}", super::v2path::summary(&f));
            out.push(f);
        }
    }
    Ok(out)
}
