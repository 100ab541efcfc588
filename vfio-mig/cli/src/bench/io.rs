// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Sources and sinks of the data-path benchmarks: sinks (/dev/null, a file, TCP on
//! loopback), a synthetic full-speed pipe, plain read/write loops (the baselines), and a
//! minimal [`MigrationDevice`] over a pipe.

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

use vfio_mig::error::{Error, Result};
use vfio_mig::{backend::DataFd, backend::DataRead};
use vfio_mig::{backend::DataSession, backend::DeviceIdentity};
use vfio_mig::{Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery};

/// Where the data goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// `/dev/null`.
    Null,
    /// A new file in this directory, removed after each run.
    File(PathBuf),
    /// A TCP connection on loopback to a thread that reads and discards.
    Tcp,
}

impl SinkKind {
    /// Short name for figure ids.
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Null => "null",
            SinkKind::File(_) => "file",
            SinkKind::Tcp => "tcp",
        }
    }

    /// Opens a fresh sink for one run.
    pub fn open(&self) -> Result<Sink> {
        let err = |what: &str, e: io::Error| Error::transport(format!("bench sink: {what}"), e);
        match self {
            SinkKind::Null => {
                let f = File::options()
                    .write(true)
                    .open("/dev/null")
                    .map_err(|e| err("open /dev/null", e))?;
                Ok(Sink {
                    conn: Conn::File(f),
                    receiver: None,
                    path: None,
                })
            }
            SinkKind::File(dir) => {
                let path = dir.join(format!(
                    "vfio-mig-bench-{}-{}.out",
                    std::process::id(),
                    SINK_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let f = File::create(&path).map_err(|e| err("create file", e))?;
                Ok(Sink {
                    conn: Conn::File(f),
                    receiver: None,
                    path: Some(path),
                })
            }
            SinkKind::Tcp => {
                let listener =
                    TcpListener::bind("127.0.0.1:0").map_err(|e| err("bind 127.0.0.1", e))?;
                let addr = listener.local_addr().map_err(|e| err("local_addr", e))?;
                let receiver = std::thread::Builder::new()
                    .name("bench-tcp-rx".into())
                    .spawn(move || -> io::Result<u64> {
                        let (mut s, _) = listener.accept()?;
                        let mut buf = vec![0u8; 1 << 20];
                        let mut total = 0u64;
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) => return Ok(total),
                                Ok(n) => total += n as u64,
                                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                                Err(e) => return Err(e),
                            }
                        }
                    })
                    .map_err(|e| err("spawn receiver", e))?;
                let s = TcpStream::connect(addr).map_err(|e| err("connect", e))?;
                Ok(Sink {
                    conn: Conn::Tcp(s),
                    receiver: Some(receiver),
                    path: None,
                })
            }
        }
    }
}

static SINK_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A sink's transport: a file (or /dev/null) or a TCP stream. Vectored writes go through.
#[derive(Debug)]
pub enum Conn {
    /// A file or /dev/null.
    File(File),
    /// A TCP stream.
    Tcp(TcpStream),
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::File(f) => f.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::File(f) => f.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::File(f) => f.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

/// An open sink for one run.
#[derive(Debug)]
pub struct Sink {
    /// The transport to write into.
    pub conn: Conn,
    receiver: Option<JoinHandle<io::Result<u64>>>,
    path: Option<PathBuf>,
}

impl Sink {
    /// Ends the run: closes the transport, waits until a TCP receiver has read everything
    /// (returns what it read), removes a file.
    pub fn finish(self) -> Result<Option<u64>> {
        let Sink {
            conn,
            receiver,
            path,
        } = self;
        drop(conn);
        let got = match receiver {
            Some(r) => Some(
                r.join()
                    .map_err(|_| Error::InvalidInput("bench TCP receiver panicked".into()))?
                    .map_err(|e| Error::transport("bench TCP receiver", e))?,
            ),
            None => None,
        };
        if let Some(p) = path {
            let _ = std::fs::remove_file(p);
        }
        Ok(got)
    }
}

/// Bytes per second of `bytes` moved in `since`'s elapsed time, in GB/s (10^9).
pub fn gbps(bytes: u64, since: Instant) -> f64 {
    bytes as f64 / since.elapsed().as_secs_f64().max(1e-9) / 1e9
}

/// The plain loop every data-path figure is measured against: `read(2)` of `fd` into a
/// `buf`-sized buffer, `write(2)` of what was read into `sink`, until EOF. Returns the bytes.
pub fn copy_loop(fd: BorrowedFd<'_>, sink: &mut impl Write, buf: &mut [u8]) -> Result<u64> {
    let mut total = 0u64;
    loop {
        let n = match nix::unistd::read(fd, buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Error::device("baseline read", e.into())),
        };
        sink.write_all(&buf[..n])
            .map_err(|e| Error::transport("baseline write", e))?;
        total += n as u64;
    }
}

/// A device's own write entry as the sink of a raw loop: each `write` is one
/// [`MigrationDevice::write`] of what was read, as the engine's. A loop that wrote the data fd
/// from outside with `write(2)` would skip what a mock does with the bytes its driver hands it
/// (an xe-profile mock decodes them where they arrive, the way the xe driver takes them, and
/// allocates no memfd pages): the loop and the engine would not pay the same device.
pub struct DeviceSink<'a>(pub &'a mut dyn MigrationDevice);

impl Write for DeviceSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf, false).map_err(io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A page-aligned buffer that never moves (vmsplice keeps references to its pages).
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by this value; it is only read after setup.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        let mut me = Self { ptr, layout };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for b in me.as_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        me
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr/len describe our live allocation.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// A pipe fed "at the speed of the machine": a thread `vmsplice(2)`s the pages of one
/// constant 1 MiB buffer into it (no copy, no content generation) until `total` bytes, then
/// closes its end. The reader's copy is then the only copy: a consumer-bound data fd.
pub struct FastPipe {
    /// The read end (blocking).
    pub read: OwnedFd,
    feeder: Option<JoinHandle<()>>,
}

impl FastPipe {
    /// Starts feeding `total` bytes.
    pub fn start(total: u64) -> Result<Self> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| Error::device("bench pipe", e.into()))?;
        let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(1 << 20));
        let mut data = Aligned::new(1 << 20);
        let feeder = std::thread::Builder::new()
            .name("bench-fast-feeder".into())
            .spawn(move || {
                let buf = data.as_mut();
                let mut left = total;
                while left > 0 {
                    let n = (buf.len() as u64).min(left) as usize;
                    let iov = libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: n,
                    };
                    // SAFETY: one iovec describing our live buffer; the pages stay valid
                    // (and unchanged) for the life of the thread, longer than the pipe needs.
                    let r = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, 0) };
                    if r < 0 {
                        if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                            continue;
                        }
                        return; // EPIPE: the reader left.
                    }
                    left -= r as u64;
                }
                drop(w);
                // The pipe may still reference our pages: keep them until the reader is done.
                let _keep = &data;
                std::thread::park();
            })
            .map_err(|e| Error::device("spawn bench feeder", e))?;
        Ok(Self {
            read: r,
            feeder: Some(feeder),
        })
    }
}

impl Drop for FastPipe {
    fn drop(&mut self) {
        if let Some(t) = self.feeder.take() {
            // Close the read end first, so a feeder blocked in vmsplice gets EPIPE.
            let (dummy, _) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe");
            let read = std::mem::replace(&mut self.read, dummy);
            drop(read);
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// A minimal saving [`MigrationDevice`] over a pipe: each `read` is one `read(2)` of the pipe,
/// exactly as [`vfio_mig::backend::V2Device`] reads its data fd, without any state machine.
pub struct PipeDevice {
    data: DataFd,
}

impl PipeDevice {
    /// Wraps the read end of a pipe.
    pub fn new(fd: OwnedFd) -> Self {
        Self {
            data: DataFd::new(DataSession::from_fd(fd)),
        }
    }
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported(format!("bench pipe device: {what}"))
}

impl MigrationDevice for PipeDevice {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: "bench:pipe".into(),
            instance: "bench:pipe".into(),
        }
    }
    fn protocol(&self) -> Protocol {
        Protocol::V2
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pre_copy: false,
            p2p: false,
            migration_flags: 1,
        }
    }
    fn state_name(&mut self) -> Result<String> {
        Ok("STOP_COPY".into())
    }
    fn details(&mut self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
    fn run_state(&mut self) -> Result<vfio_mig::RunState> {
        Ok(vfio_mig::RunState::Running)
    }
    fn quiesce(&mut self) -> Result<()> {
        Ok(())
    }
    fn stop(&mut self) -> Result<()> {
        Ok(())
    }
    fn run(&mut self) -> Result<()> {
        Ok(())
    }
    fn start_pre_copy(&mut self) -> Result<()> {
        Err(unsupported("pre-copy"))
    }
    fn start_stop_copy(&mut self) -> Result<()> {
        Ok(())
    }
    fn pending(&mut self) -> Result<Pending> {
        Ok(Pending::default())
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        match self
            .data
            .read(buf)
            .map_err(|e| Error::device("read bench pipe", e))?
        {
            DataRead::Bytes(len) => Ok(ReadOutcome::Data {
                len,
                chunk_end: true,
            }),
            _ => Ok(ReadOutcome::PhaseEnd),
        }
    }
    fn finish_save(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish_handoff(&mut self) -> Result<()> {
        Ok(())
    }
    fn start_resume(&mut self) -> Result<()> {
        Err(unsupported("resume"))
    }
    fn write(&mut self, _data: &[u8], _chunk_end: bool) -> Result<()> {
        Err(unsupported("resume"))
    }
    fn load_state(&mut self) -> Result<()> {
        Err(unsupported("resume"))
    }
    fn prepare_run(&mut self) -> Result<()> {
        Err(unsupported("resume"))
    }
    fn finish_resume(&mut self) -> Result<()> {
        Err(unsupported("resume"))
    }
    fn recover(&mut self) -> Recovery {
        Recovery::AlreadyRunning
    }
    fn abort_resume(&mut self) -> Recovery {
        Recovery::AlreadyRunning
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_pipe_delivers_exactly_total_bytes_to_each_sink() {
        for kind in [
            SinkKind::Null,
            SinkKind::Tcp,
            SinkKind::File(std::env::temp_dir()),
        ] {
            let p = FastPipe::start(3 << 20 | 123).unwrap();
            let mut sink = kind.open().unwrap();
            let mut buf = vec![0u8; 64 << 10];
            let n = copy_loop(p.read.as_fd(), &mut sink.conn, &mut buf).unwrap();
            assert_eq!(n, 3 << 20 | 123);
            let got = sink.finish().unwrap();
            if kind == SinkKind::Tcp {
                assert_eq!(got, Some(n));
            }
        }
    }

    #[test]
    fn an_abandoned_fast_pipe_stops_its_feeder() {
        let p = FastPipe::start(1 << 40).unwrap();
        let mut b = [0u8; 10];
        nix::unistd::read(p.read.as_fd(), &mut b).unwrap();
        drop(p);
    }
}
