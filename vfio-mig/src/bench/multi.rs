// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 5: several devices. Four mock devices saved in parallel (one thread each, through
//! the public per-device API: [`save_device`] into a stream per device) against the same four
//! saved one after another, on however many cores the machine has (2 on ours).
//!
//! The multi-device engine (`engine::multi`, one stream for all devices) was being written
//! when this was: until it lands, the parallel subject is our own threads, which is the upper
//! bound of what a per-device-thread engine can reach (it adds only the interleaving of
//! records into one stream).

use std::sync::Arc;
use std::time::Instant;

use crate::engine::session::new_header;
use crate::engine::{save_device, MigrationDevice, NoObserver, SaveOptions};
use crate::error::{Error, Result};
use crate::mock::spec::format_size;
use crate::mock::MockSpec;
use crate::stream::StreamWriter;
use crate::v1::V1Device;
use crate::v2::V2Device;

use super::io::SinkKind;
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::Config;

/// Devices per run.
pub const DEVICES: usize = 4;

fn open(proto: &str, size: u64, seed: usize) -> Result<Box<dyn MigrationDevice>> {
    let spec: MockSpec = format!("mock:{proto},size={},seed={seed}", format_size(size)).parse()?;
    let (io, _handle) = crate::mock::open(&spec).map_err(|e| Error::device("mock", e))?;
    Ok(match proto {
        "v1" => Box::new(V1Device::open(io)?),
        _ => Box::new(V2Device::open(Arc::clone(&io))?),
    })
}

/// Saves one device into `/dev/null`; its bytes.
fn save_one(dev: &mut dyn MigrationDevice) -> Result<u64> {
    let header = new_header(&[&*dev], false, 1)?;
    let mut sink = SinkKind::Null.open()?;
    let mut w = StreamWriter::new(&mut sink.conn, &header)?;
    let r = save_device(dev, &mut w, 0, &SaveOptions::default(), &NoObserver)?;
    w.finish()?;
    sink.finish()?;
    Ok(r.stop_copy_bytes)
}

/// Seconds to save `DEVICES` fresh devices, in parallel or one after another.
fn run(proto: &str, size: u64, parallel: bool) -> Result<f64> {
    let mut devs = (0..DEVICES)
        .map(|i| open(proto, size, i))
        .collect::<Result<Vec<_>>>()?;
    let t = Instant::now();
    if parallel {
        std::thread::scope(|s| {
            let handles: Vec<_> = devs
                .iter_mut()
                .map(|d| s.spawn(move || save_one(d.as_mut())))
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| Error::Usage("a bench save thread panicked".into()))??;
            }
            Ok::<(), Error>(())
        })?;
    } else {
        for d in &mut devs {
            save_one(d.as_mut())?;
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
        let mut par = || run(proto, cfg.multi_size, true);
        let series = run_rotating(cfg.reps, cfg.warmup, &mut [&mut seq, &mut par])?;
        let f = Figure::from_paired(
            format!("multi.{proto}.x{DEVICES}"),
            5,
            "4 devices: parallel vs one after another",
            format!("{DEVICES} threads"),
            "one after another",
            "s",
            &Paired::from_series(&series, 0, 1),
            true,
            Some(Target::at_least(1.6)),
        )
        .note(format!(
            "{DEVICES} x mock:{proto} of {} each into /dev/null on {cpus} CPUs; ratio = sequential \
             time / parallel time; parallel = one thread per device over save_device \
             (engine::multi::save_many not yet in the tree){}",
            format_size(cfg.multi_size),
            if proto == "v2" {
                "; each mock:v2 device also runs its own feeder thread, so one save already \
                 keeps 2 threads busy"
            } else {
                ""
            }
        ));
        eprintln!("bench: {}", super::v2path::summary(&f));
        out.push(f);
    }
    Ok(out)
}
