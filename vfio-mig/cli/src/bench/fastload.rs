// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Issue 22, target 2: the destination side at memory speed. One `mock:v2,profile=xe,
//! data-fd=memfd` destination (its RESUMING data fd is a memfd written at page-cache speed,
//! no device thread) loaded by the front door's `Destination` from a TCP loopback socket,
//! against a raw `read`/`write` loop from the same kind of socket into the same kind of data
//! fd.
//!
//! The sending side costs the receiver nothing it would not pay anyway: a thread
//! `sendfile(2)`s a memfd prepared before the runs into the socket (the socket references the
//! memfd's pages; the one copy is the receiver's `read`). The engine's runs send the engine's
//! stream of the device, the loop's the device's raw stop-copy bytes (the stream less its
//! 24-byte record headers). The measured window ends when the last stop-copy byte is in the
//! device (the engine: its END_OF_PHASE applied); the device's own load step (RESUMING ->
//! STOP, where the mock checks every byte) follows on both sides and is left out.

use std::cell::RefCell;
use std::fs::File;
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::memfd::{memfd_create, MFdFlags};

use vfio_mig::backend::v2_feature as feature;
use vfio_mig::backend::v2_state::MigState;
use vfio_mig::backend::V2Device;
use vfio_mig::MigrationDevice;
use vfio_mig::NoObserver;
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::{MockSpec, MockV2};
use vfio_mig_session::transport::SOCKET_BUFFER;
use vfio_mig_session::{Error, Result};

use super::io::{copy_loop, DeviceSink};
use super::rated::load1;
use super::report::{Figure, Target};
use super::stats::{run_rotating, thread_cpu, Paired, Stat};
use super::v2path::summary;
use super::window::{DestinationSide, Window};
use super::Config;

/// The device of both sides.
fn spec(cfg: &Config) -> Result<MockSpec> {
    Ok(format!(
        "mock:v2,size={},seed=12,profile=xe,content=fast,data-fd=memfd",
        format_size(cfg.size)
    )
    .parse()?)
}

fn mock(spec: &MockSpec) -> Result<MockV2> {
    MockV2::new(spec).map_err(|e| Error::device("mock", e))
}

fn set(dev: &MockV2, state: MigState, what: &str) -> Result<Option<OwnedFd>> {
    Ok(feature::set_state(dev, state)
        .map_err(|e| Error::device(what, e))?
        .and_then(|s| s.into_fd()))
}

/// A new memfd for a prepared byte sequence.
fn new_memfd(name: &str) -> Result<File> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)
        .map_err(|e| Error::device("memfd_create", e.into()))?;
    Ok(File::from(fd))
}

/// What the senders send: the device's raw stop-copy bytes and the engine's stream of them.
struct Prepared {
    raw: File,
    raw_len: u64,
    stream: File,
    stream_len: u64,
}

fn prepare(spec: &MockSpec, buffer: usize) -> Result<Prepared> {
    let src = mock(spec)?;
    let mut raw = new_memfd("vfio-mig-bench-raw")?;
    set(&src, MigState::Stop, "STOP")?;
    let fd = set(&src, MigState::StopCopy, "STOP_COPY")?
        .ok_or_else(|| Error::invalid_input("no data fd"))?;
    let raw_len = copy_loop(fd.as_fd(), &mut raw, &mut vec![0u8; buffer])?;
    drop(fd);
    set(&src, MigState::Stop, "STOP")?;
    set(&src, MigState::Running, "RUNNING")?;
    let again = src.clone();
    let dev = V2Device::open(Arc::new(src))?;
    let mut stream = new_memfd("vfio-mig-bench-stream")?;
    let (_, reports) = super::front::save(vec![dev], &mut stream, buffer, None, &NoObserver)?;
    set(&again, MigState::Running, "RUNNING")?;
    let stream_len = stream
        .metadata()
        .map_err(|e| Error::transport("stat the stream memfd", e))?
        .len();
    if reports[0].stop_copy_bytes != raw_len {
        return Err(Error::invalid_input(format!(
            "bench: the stream carries {} bytes, the raw read {raw_len}",
            reports[0].stop_copy_bytes
        )));
    }
    Ok(Prepared {
        raw,
        raw_len,
        stream,
        stream_len,
    })
}

/// A TCP loopback connection whose peer thread `sendfile`s `len` bytes of `file` into it and
/// closes; returns the receiving end and the sender.
fn sent_over_tcp(file: &File, len: u64) -> Result<(TcpStream, JoinHandle<Result<()>>)> {
    let err = |what: &str, e: std::io::Error| Error::transport(format!("bench: {what}"), e);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| err("bind 127.0.0.1", e))?;
    let addr = listener.local_addr().map_err(|e| err("local_addr", e))?;
    let file = file.try_clone().map_err(|e| err("dup the memfd", e))?;
    let sender = std::thread::Builder::new()
        .name("bench-sendfile".into())
        .spawn(move || -> Result<()> {
            let sock = TcpStream::connect(addr).map_err(|e| err("connect", e))?;
            let mut offset: i64 = 0;
            while (offset as u64) < len {
                let left = (len - offset as u64).min(1 << 30) as usize;
                match nix::sys::sendfile::sendfile64(&sock, &file, Some(&mut offset), left) {
                    Ok(0) => return Err(Error::invalid_input("bench: sendfile moved nothing")),
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(err("sendfile", e.into())),
                }
            }
            Ok(())
        })
        .map_err(|e| err("spawn the sender", e))?;
    let (conn, _) = listener.accept().map_err(|e| err("accept", e))?;
    Ok((conn, sender))
}

fn join(sender: JoinHandle<Result<()>>) -> Result<()> {
    sender
        .join()
        .map_err(|_| Error::invalid_input("bench: the sender thread panicked"))?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiver {
    /// `read` of the socket, `write` into the data fd.
    Loop,
    /// The front door's `Destination`, reading the socket with the loop's buffer size.
    Engine,
    /// The same behind the session layer's `BufReader`, with its read size.
    Buffered,
}

struct Run {
    gbps: f64,
    cpu_per_gib_ms: f64,
}

/// One run into `dst` (running; it runs again afterwards, with the state).
fn one_run(cfg: &Config, prepared: &Prepared, dst: &MockV2, how: Receiver) -> Result<Run> {
    let (file, len) = match how {
        Receiver::Loop => (&prepared.raw, prepared.raw_len),
        Receiver::Engine | Receiver::Buffered => (&prepared.stream, prepared.stream_len),
    };
    let (conn, sender) = sent_over_tcp(file, len)?;
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    let in_device = match how {
        Receiver::Loop => {
            let mut dev = V2Device::open(Arc::new(dst.clone()))?;
            dev.start_resume()?;
            let n = copy_loop(
                conn.as_fd(),
                &mut DeviceSink(&mut dev),
                &mut vec![0u8; cfg.buffer],
            )?;
            let t1 = Instant::now();
            if n != prepared.raw_len {
                return Err(Error::invalid_input(format!(
                    "bench: the loop received {n} of {} bytes",
                    prepared.raw_len
                )));
            }
            // RESUMING -> STOP: the mock checks the state.
            dev.load_state()?;
            drop(dev);
            set(dst, MigState::Running, "RUNNING")?;
            t1
        }
        Receiver::Engine | Receiver::Buffered => {
            let window = Window::default();
            let dev = vec![V2Device::open(Arc::new(dst.clone()))?];
            let obs = DestinationSide(&window);
            if how == Receiver::Engine {
                let mut conn = conn;
                super::front::load(dev, &mut conn, &mut vec![0u8; cfg.buffer], &obs)?;
            } else {
                let mut rx = BufReader::with_capacity(SOCKET_BUFFER, conn);
                super::front::load(dev, &mut rx, &mut vec![0u8; SOCKET_BUFFER], &obs)?;
            }
            window
                .last_end()
                .ok_or_else(|| Error::invalid_input("bench: no END_OF_PHASE applied"))?
        }
    };
    let cpu = thread_cpu() - cpu0;
    join(sender)?;
    let secs = in_device.duration_since(t0).as_secs_f64().max(1e-9);
    let gib = prepared.raw_len as f64 / (1u64 << 30) as f64;
    Ok(Run {
        gbps: prepared.raw_len as f64 / secs / 1e9,
        cpu_per_gib_ms: cpu / gib.max(1e-9) * 1e3,
    })
}

/// Measures the destination-side figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let spec = spec(cfg)?;
    let load_before = load1();
    let prepared = prepare(&spec, cfg.buffer)?;
    let dst = mock(&spec)?;
    let cpu: RefCell<[Vec<f64>; 3]> = RefCell::default();
    let run = |how: Receiver, slot: usize| -> Result<f64> {
        let r = one_run(cfg, &prepared, &dst, how)?;
        cpu.borrow_mut()[slot].push(r.cpu_per_gib_ms);
        Ok(r.gbps)
    };
    let mut base = || run(Receiver::Loop, 0);
    let mut engine = || run(Receiver::Engine, 1);
    let mut buffered = || run(Receiver::Buffered, 2);
    let series = run_rotating(
        cfg.reps,
        cfg.warmup,
        &mut [&mut base, &mut engine, &mut buffered],
    )?;
    let cpu = cpu.into_inner();
    let c = |i: usize| Stat::of(&cpu[i][cfg.warmup.min(cpu[i].len())..]).median;
    let base_name = format!(
        "read/write loop, socket -> data fd, {} KiB buffer",
        cfg.buffer >> 10
    );
    let group = "v2 destination, memfd data fd, TCP loopback";
    let engine = Figure::from_paired(
        "load.memfd.tcp.engine",
        2,
        group,
        "front door (Destination from the socket)",
        base_name.clone(),
        "GB/s",
        &Paired::from_series(&series, 0, 1),
        false,
        Some(Target::at_least(0.95)),
    )
    .note(format!(
        "{spec} ({} MiB); a thread sendfile()s a prepared memfd into the socket; the window \
         ends when the last stop-copy byte is in the device (END_OF_PHASE applied; the loop: \
         EOF), the device's RESUMING -> STOP check left out of the window on both; reads of \
         {} KiB; CPU per GiB of the \
         receiving thread: loop {:.0} ms, engine {:.0} ms; load average {load_before} -> {}",
        prepared.raw_len >> 20,
        cfg.buffer >> 10,
        c(0),
        c(1),
        load1()
    ));
    let buffered = Figure::from_paired(
        "load.memfd.tcp.bufreader",
        0,
        group,
        format!(
            "front door behind the session's BufReader ({} KiB reads)",
            SOCKET_BUFFER >> 10
        ),
        base_name,
        "GB/s",
        &Paired::from_series(&series, 0, 2),
        false,
        None,
    )
    .note(format!(
        "the transport as the session layer wraps it; CPU per GiB of the receiving thread: {:.0} \
         ms",
        c(2)
    ));
    eprintln!("bench: {}", summary(&engine));
    eprintln!("bench: {}", summary(&buffered));
    Ok(vec![engine, buffered])
}
