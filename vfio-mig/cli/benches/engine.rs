// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Criterion micro-benchmarks of the engine's building blocks, each next to its baseline:
//!
//! - `stream_write`: [`StreamWriter::data`] (record header, CRC32C, vectored write) of 1 MiB
//!   fragments into `/dev/null`, against `write_all` of the same bytes into it;
//! - `stream_read`: [`StreamReader::next_record`] (read, CRC check) over an in-memory stream,
//!   against `read_exact` of the same bytes;
//! - `crc32c`: the checksum alone, against a copy of the same bytes;
//! - `v2_transitions`: a cycle of v2 state changes through `V2Device::set_state` on a
//!   `mock:v2`, against the same SETs through `feature::set_state` (the host-side companion
//!   of the mtty figure in `tests/tests/guest/bench.rs`).
//!
//! `cargo bench -p vfio-mig --bench engine`; `vfio-mig bench` has the end-to-end figures.

use std::io::{Read, Write};
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vfio_mig::{backend::v2_feature as feature, backend::v2_state::MigState, backend::V2Device};
use vfio_mig::{
    wire::DeviceDescriptor, wire::Phase, wire::Record, wire::StreamHeader, wire::StreamReader,
    wire::StreamWriter, Protocol,
};
use vfio_mig_mock::{MockSpec, MockV2};

const FRAGMENT: usize = 1 << 20;
const FRAGMENTS: usize = 16;

fn header() -> StreamHeader {
    StreamHeader {
        session_id: [7; 16],
        epoch: 1,
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V2,
            live: false,
            migration_flags: 1,
            model: "bench".into(),
        }],
    }
}

fn payload() -> Vec<u8> {
    (0..FRAGMENT).map(|i| (i * 31 + 7) as u8).collect()
}

fn stream_write(c: &mut Criterion) {
    let data = payload();
    let mut g = c.benchmark_group("stream_write");
    g.throughput(Throughput::Bytes((FRAGMENT * FRAGMENTS) as u64));
    let null = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap()
    };
    g.bench_function("write_all (baseline)", |b| {
        let mut w = null();
        b.iter(|| {
            for _ in 0..FRAGMENTS {
                w.write_all(black_box(&data)).unwrap();
            }
        })
    });
    g.bench_function("StreamWriter::data", |b| {
        b.iter(|| {
            let mut w = StreamWriter::new(null(), &header()).unwrap();
            for _ in 0..FRAGMENTS {
                w.data(0, Phase::StopCopy, black_box(&data), true).unwrap();
            }
        })
    });
    g.finish();
}

fn stream_read(c: &mut Criterion) {
    let data = payload();
    let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
    for _ in 0..FRAGMENTS {
        w.data(0, Phase::StopCopy, &data, true).unwrap();
    }
    w.end_phase(0, Phase::StopCopy).unwrap();
    let (bytes, _) = w.finish().unwrap();
    let mut g = c.benchmark_group("stream_read");
    g.throughput(Throughput::Bytes((FRAGMENT * FRAGMENTS) as u64));
    let mut buf = vec![0u8; FRAGMENT];
    g.bench_function("read_exact (baseline)", |b| {
        b.iter(|| {
            let mut r = bytes.as_slice();
            for _ in 0..FRAGMENTS {
                r.read_exact(&mut buf).unwrap();
            }
            black_box(&buf);
        })
    });
    g.bench_function("StreamReader::next_record", |b| {
        b.iter(|| {
            let (mut r, _) = StreamReader::open(bytes.as_slice()).unwrap();
            loop {
                match r.next_record().unwrap() {
                    Record::Data { bytes, .. } => {
                        black_box(bytes);
                    }
                    Record::EndOfPhase { .. } => {}
                    Record::End(_) => break,
                }
            }
        })
    });
    g.finish();
}

fn crc(c: &mut Criterion) {
    let data = payload();
    let mut out = vec![0u8; FRAGMENT];
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(FRAGMENT as u64));
    g.bench_function("copy (baseline)", |b| {
        b.iter(|| {
            out.copy_from_slice(black_box(&data));
            black_box(&out);
        })
    });
    g.bench_function("crc32c", |b| b.iter(|| crc32c::crc32c(black_box(&data))));
    g.finish();
}

fn transitions(c: &mut Criterion) {
    let spec: MockSpec = "mock:v2,size=64K".parse().unwrap();
    let cycle = [
        MigState::StopCopy,
        MigState::Stop,
        MigState::Running,
        MigState::PreCopy,
        MigState::Running,
    ];
    let mut g = c.benchmark_group("v2_transitions");
    let raw = MockV2::new(&spec).unwrap();
    // The same arcs V2Device walks (GET first, as it does), through the feature layer only.
    let arcs: [&[MigState]; 5] = [
        &[MigState::RunningP2p, MigState::Stop, MigState::StopCopy],
        &[MigState::Stop],
        &[MigState::RunningP2p, MigState::Running],
        &[MigState::PreCopy],
        &[MigState::Running],
    ];
    g.bench_function(
        BenchmarkId::new("feature::set_state (baseline)", "cycle"),
        |b| {
            b.iter(|| {
                let mut fd = None;
                for path in arcs {
                    feature::get_state(&raw).unwrap();
                    for &arc in path {
                        if let Some(f) = feature::set_state(&raw, arc).unwrap() {
                            fd = Some(f);
                        }
                    }
                    if matches!(path.last(), Some(MigState::Stop | MigState::Running)) {
                        fd = None;
                    }
                }
                black_box(fd);
            })
        },
    );
    let mut dev = V2Device::open(Arc::new(MockV2::new(&spec).unwrap())).unwrap();
    g.bench_function(BenchmarkId::new("V2Device::set_state", "cycle"), |b| {
        b.iter(|| {
            for target in cycle {
                dev.set_state(target).unwrap();
            }
        })
    });
    g.finish();
}

// `criterion_group!` defines a public, undocumented `fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, stream_write, stream_read, crc, transitions);
}
use group::benches;
criterion_main!(benches);
