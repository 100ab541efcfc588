// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pipelined save (`SaveOptions::pipeline`: the device read on a thread of its own, the
//! CRC/HMAC and the write on the caller's): the stream is byte for byte the one-thread
//! stream, a device error and a write error each stop both halves, and what is saved loads
//! into a device that verifies every byte.

use std::io::{self, Write};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use vfio_mig::workspace::save_with_rollback;
use vfio_mig::MigrationDevice;
use vfio_mig::NoObserver;
use vfio_mig::Pending;
use vfio_mig::PreCopyPolicy;
use vfio_mig::SaveOptions;
use vfio_mig::{wire::StreamHeader, wire::StreamWriter};
use vfio_mig::{Error, Result};
use vfio_mig_session::StreamKey;
use vfio_mig_tests::wrap::{Hooks, Wrapped};
use vfio_mig_tests::{assert_source_running, load_from_slice, mock};

/// Saves the device of `spec` with `opts` under `header` into a vector; returns the bytes
/// written (complete or not) and the outcome.
fn save(
    spec: &str,
    header: &StreamHeader,
    key: Option<&StreamKey>,
    opts: &SaveOptions,
) -> (Vec<u8>, Result<()>) {
    let mut src = mock(spec);
    let mut sink = Sink::default();
    let result = (|| {
        let mut w = StreamWriter::with_key(&mut sink, header, key.map(StreamKey::auth))?;
        save_with_rollback(src.device.as_mut(), &mut w, 0, opts, &NoObserver)?;
        w.finish()?;
        Ok(())
    })();
    if result.is_err() {
        assert_source_running(&src.handle.status(), spec);
    }
    (sink.bytes, result)
}

/// A transport that keeps what it is given and fails every write after `fail_after` bytes.
#[derive(Default)]
struct Sink {
    bytes: Vec<u8>,
    fail_after: Option<usize>,
}

impl Write for &mut Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self
            .fail_after
            .is_some_and(|n| self.bytes.len() + buf.len() > n)
        {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn with(pipeline: usize, buffer: usize, live: bool) -> SaveOptions {
    SaveOptions {
        live,
        buffer,
        pipeline,
        ..SaveOptions::default()
    }
}

fn header_of(spec: &str, live: bool) -> StreamHeader {
    let dev = mock(spec);
    StreamHeader::new(&[dev.device.as_ref()], live, 7).unwrap()
}

/// The same device content, saved inline (pipeline 0 and 1) and through rings of 2, 3 and
/// 8 buffers, plain and keyed (HMAC), v1 (chunked transactions) and v2 (a data fd), in
/// stop-and-copy and live (pre-copy rounds, budgets ending at chunk boundaries): every
/// stream is byte for byte the inline one, and loads into a device that checks every page.
#[test]
fn pipelined_streams_are_byte_identical_to_inline() {
    let key = StreamKey::new(&[0x5a; 32]).unwrap();
    let cases = [
        ("mock:v2,size=3M,seed=11", false, 64 << 10),
        ("mock:v2,size=3M,seed=11", true, 64 << 10),
        ("mock:v1,size=3M,seed=12,chunk=100K", false, 64 << 10),
        ("mock:v1,size=3M,seed=12,chunk=100K", true, 1 << 20),
    ];
    for (spec, live, buffer) in cases {
        let header = header_of(spec, live);
        for k in [None, Some(&key)] {
            let (inline, r) = save(spec, &header, k, &with(0, buffer, live));
            r.unwrap();
            for depth in [1, 2, 3, 8] {
                let (piped, r) = save(spec, &header, k, &with(depth, buffer, live));
                r.unwrap_or_else(|e| panic!("{spec} depth {depth}: {e}"));
                assert!(
                    piped == inline,
                    "{spec} live={live} keyed={} depth {depth}: {} bytes against {} inline, first difference at {:?}",
                    k.is_some(),
                    piped.len(),
                    inline.len(),
                    piped.iter().zip(&inline).position(|(a, b)| a != b)
                );
            }
            if k.is_none() {
                let mut dst = mock(spec);
                load_from_slice(&mut dst, &inline).unwrap();
                assert!(dst.handle.status().resumed_ok, "{spec}");
            }
        }
    }
}

/// A device read failing in the middle of the phase: the pipelined save fails with the
/// device's error, after writing exactly the records the inline save writes before it.
#[test]
fn a_device_error_stops_the_pipeline_in_order() {
    let spec = "mock:v2,size=4M,seed=3,chunk=64K,fail-at=data-read@9";
    let header = header_of("mock:v2,size=4M,seed=3,chunk=64K", false);
    let (inline, r) = save(spec, &header, None, &with(0, 64 << 10, false));
    let inline_err = r.unwrap_err();
    let (piped, r) = save(spec, &header, None, &with(3, 64 << 10, false));
    let piped_err = r.unwrap_err();
    assert_eq!(piped_err.to_string(), inline_err.to_string());
    assert!(!matches!(piped_err, Error::Transport { .. }), "{piped_err}");
    assert!(
        piped == inline,
        "{} bytes against {}",
        piped.len(),
        inline.len()
    );
}

/// The transport failing in the middle of the phase (after the first buffers, which go
/// inline, once the reader thread runs): the save returns the write's error, naming the same
/// record as the one-thread save, and the device-read thread stops within the ring's few
/// buffers instead of reading the whole device (a v1 device stages one transaction per
/// read; 64 in all here).
#[test]
fn a_write_error_stops_the_device_reads() {
    let spec = "mock:v1,size=4M,seed=4,chunk=64K";
    let header = header_of(spec, false);
    let fail = |depth: usize| {
        let mut src = mock(spec);
        let mut sink = Sink {
            fail_after: Some(600 << 10),
            ..Sink::default()
        };
        let mut w = StreamWriter::new(&mut sink, &header).unwrap();
        let err = save_with_rollback(
            src.device.as_mut(),
            &mut w,
            0,
            &with(depth, 64 << 10, false),
            &NoObserver,
        )
        .unwrap_err();
        let status = src.handle.status();
        assert_source_running(&status, spec);
        (
            vfio_mig::error::Report(&err).to_string(),
            status.transactions_staged,
        )
    };
    let (inline_text, inline_staged) = fail(0);
    assert!(inline_text.contains("write stream record"), "{inline_text}");
    assert!(inline_text.contains("peer gone"), "{inline_text}");
    assert!(inline_staged < 64, "{inline_staged}");
    for depth in [2, 3, 8] {
        let (text, staged) = fail(depth);
        assert_eq!(text, inline_text, "depth {depth}");
        // Read ahead of the one-thread pump: the ring's buffers and the read in flight when
        // the writer stopped.
        assert!(
            staged <= inline_staged + depth as u64 + 1,
            "depth {depth}: {staged} of 64 transactions staged, {inline_staged} inline"
        );
    }
}

/// Hooks under-reporting a device's pending pre-copy bytes (a quarter), so every pre-copy
/// round ends on its budget at a chunk boundary, well before the device's data does.
struct Quarter;

impl Hooks for Quarter {
    fn pending(&mut self, dev: &mut dyn MigrationDevice) -> Result<Pending> {
        let p = dev.pending()?;
        Ok(Pending {
            bytes: p.bytes.div_ceil(4),
            ..p
        })
    }
}

/// Pre-copy rounds that end on their budget, in the middle of the device's data (the reader
/// thread counts the budget, starting from what went inline): the same rounds, the same
/// records, byte for byte.
#[test]
fn rounds_ending_on_their_budget_are_byte_identical() {
    for spec in [
        "mock:v1,size=8M,seed=21,chunk=64K",
        "mock:v2,size=8M,seed=22,chunk=64K",
    ] {
        let header = header_of(spec, true);
        let save = |depth: usize| {
            let mut src = Wrapped::new(mock(spec).opened.device, Quarter);
            let mut w = StreamWriter::new(Vec::new(), &header).unwrap();
            // Rounds go on until the data runs out (or 6 rounds): no downtime is small enough.
            let opts = SaveOptions {
                policy: PreCopyPolicy {
                    downtime_budget: std::time::Duration::ZERO,
                    switchover_bytes: 0,
                    max_rounds: 6,
                    ..PreCopyPolicy::default()
                },
                ..with(depth, 64 << 10, true)
            };
            let report = save_with_rollback(&mut src, &mut w, 0, &opts, &NoObserver).unwrap();
            (w.finish().unwrap().0, report.rounds)
        };
        let (inline, rounds) = save(0);
        assert!(rounds >= 2, "{spec}: {rounds} rounds");
        for depth in [2, 3] {
            let (piped, r) = save(depth);
            assert_eq!(r, rounds, "{spec} depth {depth}");
            assert!(piped == inline, "{spec} depth {depth}: streams differ");
        }
        let mut dst = mock(spec);
        load_from_slice(&mut dst, &inline).unwrap();
        assert!(dst.handle.status().resumed_ok, "{spec}");
    }
}

/// Runs `f` on a new thread allowed only on `cpus` (its affinity mask).
fn on_cpus<T: Send>(cpus: &[usize], f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut set = CpuSet::new();
            for &c in cpus {
                set.set(c).unwrap();
            }
            sched_setaffinity(Pid::from_raw(0), &set).unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

/// The default depth follows the CPUs the calling thread may run on, as the kernel's affinity
/// mask says: the pipelined pump keeps two threads busy (the device read; the CRC and the
/// write) and the other end of the transfer (the transport's receiver, a device thread, a
/// destination on the same host) a third, so with fewer than three CPUs the pump runs inline
/// (issue 22: on two CPUs the inline pump did better in 13 of 17 same-run comparisons); with
/// three or more, a ring of three buffers (one read, one written, one ready). Every count
/// this machine affords is tried, one CPU always; the rule itself at the counts it may not
/// afford is the core's unit test (`engine::save::tests`).
#[test]
fn the_default_pipeline_follows_the_threads_cpu_affinity() {
    let mask = sched_getaffinity(Pid::from_raw(0)).unwrap();
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| mask.is_set(c).unwrap_or(false))
        .collect();
    assert!(!cpus.is_empty(), "no CPU in this thread's affinity mask");
    for n in 1..=cpus.len().min(4) {
        let depth = on_cpus(&cpus[..n], || SaveOptions::default().pipeline);
        let expected = if n >= 3 { 3 } else { 0 };
        assert_eq!(
            depth,
            expected,
            "default pipeline on {n} CPU(s) {:?}",
            &cpus[..n]
        );
    }
}
