// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 3: peak memory of a save and of a load, against reading the whole state into memory
//! first (what vfio-ioctls' `read_migration_data_to_end` does on the source, and what a
//! destination that buffers the stream before resuming does).
//!
//! Each side runs in a child process of its own (`vfio-mig bench --child ...`), a save child
//! streaming into a pipe that a load child reads, so the two peaks are separate and the state
//! never touches a disk. Each child reports its own `VmHWM` (peak resident set) from
//! `/proc/self/status` when it is done.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::Arc;

use vfio_mig::backend::V2Device;
use vfio_mig::wire::{DeviceDescriptor, StreamHeader};
use vfio_mig::Protocol;
use vfio_mig::{
    wire::Phase, wire::Record, wire::StreamReader, wire::StreamWriter, wire::MAX_FRAGMENT,
};
use vfio_mig::{MigrationDevice, NoObserver, DEFAULT_BUFFER};
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::{Error, Result};

use super::report::{Figure, Target};
use super::stats::Paired;
use super::Config;

/// The prefix of a child's report line on stderr.
const MARK: &str = "BENCH-CHILD ";
/// The target: peak RSS under this many MiB.
pub const LIMIT_MIB: f64 = 64.0;

/// Peak resident set size of this process, in KiB (`VmHWM`).
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn device(size: u64) -> Result<V2Device> {
    // 64 KiB content pages: the mock's own per-page tables (generations, pages received)
    // live in this process too, and at 4 KiB pages they would grow by 8 MiB per 4 GiB.
    let spec: MockSpec = format!("mock:v2,size={},seed=21,page=64K", format_size(size)).parse()?;
    let mock = MockV2::new(&spec).map_err(|e| Error::device("create mock", e))?;
    Ok(V2Device::open(Arc::new(mock))?)
}

/// The stream header of a save of `dev` alone (the whole-state baseline writes its stream
/// itself).
fn header_of(dev: &V2Device) -> Result<StreamHeader> {
    Ok(StreamHeader {
        session_id: vfio_mig::new_session_id()?,
        epoch: 1,
        devices: vec![DeviceDescriptor {
            protocol: Protocol::V2,
            live: false,
            migration_flags: dev.capabilities().migration_flags,
            model: dev.identity().model,
        }],
    })
}

fn stdio(fd: i32) -> File {
    // SAFETY: fds 0 and 1 are open for the life of the process; the dup'd fd is ours.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    assert!(dup >= 0, "dup of fd {fd}");
    // SAFETY: `dup` is a new descriptor that nothing else owns.
    File::from(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// Runs one child: `save:engine:SIZE`, `save:whole:SIZE` (stream to stdout),
/// `load:engine:SIZE` or `load:whole:SIZE` (stream from stdin). Prints its report line.
pub fn child(spec: &str) -> Result<()> {
    let usage = || Error::invalid_input(format!("bench child `{spec}`: expected SIDE:HOW:SIZE"));
    let mut parts = spec.split(':');
    let (side, how, size) = (
        parts.next().ok_or_else(usage)?,
        parts.next().ok_or_else(usage)?,
        parts
            .next()
            .and_then(vfio_mig_mock::spec::parse_size)
            .ok_or_else(usage)?,
    );
    let mut dev = device(size)?;
    let bytes = match (side, how) {
        ("save", "engine") => {
            let (_, r) =
                super::front::save(vec![dev], &mut stdio(1), DEFAULT_BUFFER, None, &NoObserver)?;
            r[0].stop_copy_bytes
        }
        ("save", "whole") => {
            // read_migration_data_to_end: the whole state into one buffer, then send it.
            dev.start_stop_copy()?;
            let fd = dev
                .data_fd()
                .ok_or_else(|| Error::invalid_input("no data fd"))?
                .try_clone_to_owned()
                .map_err(|e| Error::device("dup", e))?;
            let mut state = Vec::new();
            File::from(fd)
                .read_to_end(&mut state)
                .map_err(|e| Error::device("read the data fd to its end", e))?;
            let mut w = StreamWriter::new(stdio(1), &header_of(&dev)?)?;
            for piece in state.chunks(MAX_FRAGMENT) {
                w.data(0, Phase::StopCopy, piece, true)?;
            }
            w.end_phase(0, Phase::StopCopy)?;
            w.finish()?;
            dev.finish_save()?;
            state.len() as u64
        }
        ("load", "engine") => {
            let mut input = stdio(0);
            let mut buf = vec![0u8; DEFAULT_BUFFER];
            let (_, loaded) = super::front::load(vec![dev], &mut input, &mut buf, &NoObserver)?;
            loaded[0].stop_copy_bytes
        }
        ("load", "whole") => {
            let (mut r, _) = StreamReader::open(BufReader::with_capacity(1 << 20, stdio(0)))?;
            let mut state = Vec::new();
            loop {
                match r.next_record()? {
                    Record::Data { bytes, .. } => state.extend_from_slice(bytes),
                    Record::EndOfPhase { .. } => {}
                    Record::End(_) => break,
                }
            }
            r.finish()?;
            dev.start_resume()?;
            for piece in state.chunks(MAX_FRAGMENT) {
                dev.write(piece, true)?;
            }
            dev.finish_resume()?;
            state.len() as u64
        }
        _ => return Err(usage()),
    };
    eprintln!(
        "{MARK}{}",
        serde_json::json!({ "peak_kib": peak_rss_kib(), "bytes": bytes })
    );
    Ok(())
}

fn report_of(stderr: &str, what: &str) -> Result<(u64, u64)> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix(MARK))
        .ok_or_else(|| Error::invalid_input(format!("bench child {what} failed: {stderr}")))?;
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Error::invalid_input(format!("bench child {what}: {e}")))?;
    Ok((
        v["peak_kib"].as_u64().unwrap_or(0),
        v["bytes"].as_u64().unwrap_or(0),
    ))
}

/// Runs a save child piped into a load child; returns their peaks in MiB.
fn pair(cfg: &Config, how: &str, size: u64) -> Result<(f64, f64)> {
    let exe = cfg
        .exe
        .clone()
        .ok_or_else(|| Error::invalid_input("bench: cannot find the vfio-mig executable"))?;
    let size = format_size(size);
    let spawn_err = |e: std::io::Error| Error::device("spawn a bench child", e);
    let mut save = Command::new(&exe)
        .args(["bench", "--child", &format!("save:{how}:{size}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let stream = save.stdout.take().expect("piped");
    let load = Command::new(&exe)
        .args(["bench", "--child", &format!("load:{how}:{size}")])
        .stdin(Stdio::from(stream))
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    let read_all = |r: Option<std::process::ChildStderr>| -> String {
        let mut s = String::new();
        if let Some(r) = r {
            let mut br = BufReader::new(r);
            let mut line = String::new();
            while br.read_line(&mut line).unwrap_or(0) > 0 {
                s += &line;
                line.clear();
            }
        }
        s
    };
    let save_err = std::thread::scope(|sc| {
        let h = sc.spawn(|| read_all(save.stderr.take()));
        let load_out = load.wait_with_output();
        (h.join().unwrap_or_default(), load_out)
    });
    let (save_stderr, load_out) = save_err;
    let _ = save.wait();
    let load_out = load_out.map_err(|e| Error::device("wait for a bench child", e))?;
    let load_stderr = String::from_utf8_lossy(&load_out.stderr);
    let (save_kib, saved) = report_of(&save_stderr, &format!("save:{how}:{size}"))?;
    let (load_kib, loaded) = report_of(&load_stderr, &format!("load:{how}:{size}"))?;
    if saved != loaded {
        return Err(Error::invalid_input(format!(
            "bench memory {how} {size}: saved {saved} bytes, loaded {loaded}"
        )));
    }
    let _ = std::io::stderr().flush();
    Ok((save_kib as f64 / 1024.0, load_kib as f64 / 1024.0))
}

/// Measures the memory figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let mut engine_peaks: Vec<(u64, f64, f64)> = Vec::new();
    for &size in &cfg.memory_sizes {
        let runs = cfg.reps.clamp(1, 2);
        let mut save = Paired::default();
        let mut load = Paired::default();
        for i in 0..runs {
            let order: [&str; 2] = if i % 2 == 0 {
                ["whole", "engine"]
            } else {
                ["engine", "whole"]
            };
            for how in order {
                let (s, l) = pair(cfg, how, size)?;
                eprintln!(
                    "bench: memory {how} {}: save peak {s:.1} MiB, load peak {l:.1} MiB",
                    format_size(size)
                );
                if how == "whole" {
                    save.baseline.push(s);
                    load.baseline.push(l);
                } else {
                    save.subject.push(s);
                    load.subject.push(l);
                }
            }
        }
        let mk = |side: &str, p: &Paired| {
            Figure::from_paired(
                format!("mem.{side}.{}", format_size(size)),
                3,
                "peak memory (VmHWM of a child process)",
                format!("engine {side}"),
                format!("whole state in memory, then {side}"),
                "MiB",
                p,
                false,
                Some(Target::subject_at_most(LIMIT_MIB)),
            )
            .note(format!(
                "mock:v2 {} of state (64 KiB pages) streamed save -> pipe -> load; ratio = engine / \
                 whole-state peak",
                format_size(size)
            ))
        };
        let fs = mk("save", &save);
        let fl = mk("load", &load);
        engine_peaks.push((size, fs.subject.median, fl.subject.median));
        out.push(fs);
        out.push(fl);
    }
    // Independence of the state size: the largest size's peak over the smallest's.
    if let (Some(first), Some(last)) = (engine_peaks.first(), engine_peaks.last()) {
        if last.0 > first.0 {
            for (side, a, b) in [("save", first.1, last.1), ("load", first.2, last.2)] {
                let p = Paired {
                    baseline: vec![a],
                    subject: vec![b],
                };
                out.push(
                    Figure::from_paired(
                        format!(
                            "mem.{side}.growth.{}-{}",
                            format_size(first.0),
                            format_size(last.0)
                        ),
                        3,
                        "peak memory (VmHWM of a child process)",
                        format!("engine {side} at {}", format_size(last.0)),
                        format!("engine {side} at {}", format_size(first.0)),
                        "MiB",
                        &p,
                        false,
                        Some(Target::at_most(1.1)),
                    )
                    .note("independent of the state size: the peak grows by less than 10%"),
                );
            }
        }
    }
    Ok(out)
}
