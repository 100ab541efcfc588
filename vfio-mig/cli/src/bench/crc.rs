// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `crc` suite: the stream's CRC32C as this build has it (`vfio_mig::wire::crc`; the
//! command line builds it with `crc-fast`) against the `crc32c` crate, the library's default,
//! in the same run over the same buffer, so that the choice between them rests on this
//! machine's figures. Both must compute the same value, and the suite fails if they do not.

use std::hint::black_box;
use std::time::Instant;

use vfio_mig::error::{Error, Result};

use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::Config;

/// Bytes checksummed per run: the engine's record size, many times over.
const RUN_BYTES: u64 = 2 << 30;

/// GB/s of `crc` over `buf`, repeated until `RUN_BYTES` passed; the value, to compare.
fn throughput(buf: &[u8], crc: fn(u32, &[u8]) -> u32) -> (f64, u32) {
    let reps = (RUN_BYTES / buf.len() as u64).max(1);
    let t = Instant::now();
    let mut value = 0;
    for _ in 0..reps {
        value = crc(black_box(value), black_box(buf));
    }
    let secs = t.elapsed().as_secs_f64();
    ((reps * buf.len() as u64) as f64 / secs / 1e9, value)
}

fn crc32c_crate(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// Measures the stream's CRC32C against the `crc32c` crate on the engine's buffer size.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let built = vfio_mig::wire::crc::IMPLEMENTATION;
    let buf: Vec<u8> = (0..cfg.buffer).map(|i| (i * 31 + 7) as u8).collect();
    let mut values = [0u32; 2];
    let mut base = || {
        let (gbps, v) = throughput(&buf, crc32c_crate);
        values[0] = v;
        Ok::<f64, Error>(gbps)
    };
    let series = {
        let mut values1 = 0u32;
        let mut fast = || {
            let (gbps, v) = throughput(&buf, vfio_mig::wire::crc::crc32c_append);
            values1 = v;
            Ok::<f64, Error>(gbps)
        };
        let s = run_rotating(cfg.reps, cfg.warmup, &mut [&mut base, &mut fast])?;
        values[1] = values1;
        s
    };
    if values[0] != values[1] {
        return Err(Error::InvalidInput(format!(
            "the stream's CRC32C ({}) and crc32c disagree: {:#010x} vs {:#010x}",
            vfio_mig::wire::crc::IMPLEMENTATION,
            values[1],
            values[0]
        )));
    }
    Ok(vec![Figure::from_paired(
        "crc.stream_vs_crc32c",
        0,
        "CRC32C implementations",
        format!("the stream's CRC32C ({built})"),
        "crc32c (SSE4.2 crc32)",
        "GB/s",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_least(1.0)),
    )
    .note(format!(
        "{} GiB per run over a {} KiB buffer, same value; this build's stream uses {built}",
        RUN_BYTES >> 30,
        cfg.buffer >> 10
    ))])
}
