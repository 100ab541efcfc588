// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The pipelined switch-over (`SourceOptions::pipeline`: the device read on a thread of its
//! own, the CRC/HMAC and the write on the caller's), through the front door: the stream is
//! byte for byte the one-thread stream, a device error and a write error each stop both
//! halves, and what is saved loads into a device that verifies every byte.

use std::io::{self, Write};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use vfio_mig::wire::StreamHeader;
use vfio_mig::PreCopyPolicy;
use vfio_mig::SaveOptions;
use vfio_mig::{Epoch, NoObserver, Source, SourceOptions};
use vfio_mig::{Error, Result};
use vfio_mig_session::StreamKey;
use vfio_mig_tests::wrap::{Hooks, Wrapped};
use vfio_mig_tests::{assert_source_running, load_from_slice, mock};

/// How a test saves: the switch-over pump's depth, the device read size, and whether the
/// device pre-copies first (under the default policy).
#[derive(Clone, Copy)]
struct How {
    depth: usize,
    buffer: usize,
    live: bool,
}

fn with(depth: usize, buffer: usize, live: bool) -> How {
    How {
        depth,
        buffer,
        live,
    }
}

/// Saves the device of `spec` through a [`Source`] with the session id and epoch of
/// `header` into a [`Sink`] failing after `fail_after` bytes; returns the bytes written
/// (complete or not), the outcome, and the v1 transactions the device staged. After a
/// failure the device must run again (the source's rollback).
fn save_into(
    spec: &str,
    header: &StreamHeader,
    key: Option<&StreamKey>,
    how: How,
    fail_after: Option<usize>,
) -> (Vec<u8>, Result<()>, u64) {
    let mut src = mock(spec);
    let mut sink = Sink {
        fail_after,
        ..Sink::default()
    };
    let opts = SourceOptions::new(Epoch(header.epoch))
        .session(header.session_id)
        .key(key.map(StreamKey::auth))
        .buffer(how.buffer)
        .pipeline(Some(how.depth))
        .pre_copy(how.live);
    let result = (|| {
        let mut out = &mut sink;
        let mut source = Source::start(vec![src.device.as_mut()], &opts).map_err(Error::from)?;
        if how.live {
            source.pre_copy(&mut out, &PreCopyPolicy::default(), &NoObserver)?;
        }
        source.switch_over(&mut out)?;
        source.finish();
        Ok(())
    })();
    let status = src.handle.status();
    if result.is_err() {
        assert_source_running(&status, spec);
    }
    (sink.bytes, result, status.transactions_staged)
}

fn save(
    spec: &str,
    header: &StreamHeader,
    key: Option<&StreamKey>,
    how: How,
) -> (Vec<u8>, Result<()>) {
    let (bytes, result, _) = save_into(spec, header, key, how, None);
    (bytes, result)
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
            let (inline, r) = save(spec, &header, k, with(0, buffer, live));
            r.unwrap();
            for depth in [1, 2, 3, 8] {
                let (piped, r) = save(spec, &header, k, with(depth, buffer, live));
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
    let (inline, r) = save(spec, &header, None, with(0, 64 << 10, false));
    let inline_err = r.unwrap_err();
    let (piped, r) = save(spec, &header, None, with(3, 64 << 10, false));
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
        let how = with(depth, 64 << 10, false);
        let (_, result, staged) = save_into(spec, &header, None, how, Some(600 << 10));
        let err = result.unwrap_err();
        (vfio_mig::error::Report(&err).to_string(), staged)
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

/// Records the thread of every device read.
struct ReadThreads(std::sync::Arc<std::sync::Mutex<Vec<std::thread::ThreadId>>>);

impl Hooks for ReadThreads {
    fn read(
        &mut self,
        dev: &mut dyn vfio_mig::MigrationDevice,
        buf: &mut [u8],
    ) -> Result<vfio_mig::ReadOutcome> {
        self.0.lock().unwrap().push(std::thread::current().id());
        dev.read(buf)
    }
}

/// `SourceOptions::pipeline` reaches the switch-over's pump: at depth 0 every device read is
/// on the caller's thread; with a ring, the reads move to a thread of their own (the CRC and
/// the writes stay on the caller's).
#[test]
fn the_chosen_depth_decides_where_the_device_is_read() {
    let spec = "mock:v2,size=2M,seed=5";
    for depth in [0, 3] {
        let threads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let dev = Wrapped::new(
            mock(spec).opened.device,
            ReadThreads(std::sync::Arc::clone(&threads)),
        );
        let opts = SourceOptions::new(Epoch(1))
            .pre_copy(false)
            .buffer(64 << 10)
            .pipeline(Some(depth));
        let mut source = Source::start(vec![dev], &opts)
            .map_err(Error::from)
            .unwrap();
        source.switch_over(&mut Vec::new()).unwrap();
        source.finish();
        let me = std::thread::current().id();
        let reads = threads.lock().unwrap();
        assert!(reads.len() > 1, "depth {depth}: {} reads", reads.len());
        let elsewhere = reads.iter().filter(|&&t| t != me).count();
        if depth == 0 {
            assert_eq!(elsewhere, 0, "depth 0: reads off the caller's thread");
        } else {
            assert!(
                elsewhere > 0,
                "depth {depth}: every read on the caller's thread"
            );
        }
    }
}
