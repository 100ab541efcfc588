// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Stop-and-copy with `splice(2)`: the device's data moves from its data fd into the
//! transport without passing through the engine's buffer, and every record is still
//! checksummed.
//!
//! # How splice and the per-record CRC coexist
//!
//! A stream record's CRC32C sits in its header, in front of the payload, so the engine must
//! see a record's bytes before the first of them is sent. Splicing the data fd straight into
//! the transport would never show them to it. The scheme here, for a data fd that is a pipe
//! (the mock's; a kernel data fd is not, see below):
//!
//! 1. `tee(2)` the pipe into a scratch pipe: the scratch pipe now references the same pages,
//!    nothing is copied and nothing is consumed;
//! 2. `read(2)` the scratch pipe into the engine's buffer (the one copy) and compute the CRC;
//! 3. write the record header, then `splice(2)` exactly that many bytes from the data pipe
//!    into the transport ([`StreamWriter::data_spliced`]).
//!
//! Compared with the plain path (read into the buffer, write the buffer), the copy *into* user
//! memory stays (the CRC needs the bytes) and the copy *out of* it becomes a page move: free
//! into `/dev/null`, a page-cache copy for a file (as a `write` would be), and zero-copy for a
//! TCP socket (the socket references the pipe's pages). The price is two extra system calls
//! per record (`tee`, `splice`). So splice pays off for sockets only, and only when the
//! transmit copy costs more than the two calls; into a file or `/dev/null` it moves the same
//! bytes the same number of times. `vfio-mig bench` measures all three.
//!
//! A kernel migration data fd (mlx5, mtty, ...) is an anonymous file with a `read` method
//! only: `tee` needs a pipe and `splice` from it fails with EINVAL. [`save_spliced`] checks the
//! fds first and uses the plain path for anything it cannot splice.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::error::{Error, Result};
use crate::stream::{Phase, StreamWriter, MAX_FRAGMENT};

use super::events::{Event, Observer};
use super::save::{pre_copy, Pump, SaveOptions, SaveReport};
use super::MigrationDevice;

fn file_type(fd: BorrowedFd<'_>) -> Option<SFlag> {
    fstat(fd)
        .ok()
        .map(|st| SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))
}

/// Whether `fd` is a pipe (a FIFO), the only kind of data fd `tee(2)` accepts.
pub fn is_pipe(fd: BorrowedFd<'_>) -> bool {
    file_type(fd) == Some(SFlag::S_IFIFO)
}

/// Whether `splice(2)` can write into `fd`: a socket, a pipe, `/dev/null`, or a regular file
/// not opened with `O_APPEND`.
pub fn can_splice_into(fd: BorrowedFd<'_>) -> bool {
    let Ok(st) = fstat(fd) else {
        return false;
    };
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFSOCK | SFlag::S_IFIFO => true,
        SFlag::S_IFREG => fcntl(fd, FcntlArg::F_GETFL)
            .is_ok_and(|f| !OFlag::from_bits_retain(f).contains(OFlag::O_APPEND)),
        // /dev/null is character device 1:3.
        SFlag::S_IFCHR => st.st_rdev == nix::sys::stat::makedev(1, 3),
        _ => false,
    }
}

fn scratch_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Error::device("create the scratch pipe for splice", e.into()))?;
    // As large as a record, where allowed; a smaller pipe only means smaller records.
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(MAX_FRAGMENT as i32));
    Ok((r, w))
}

/// `tee(2)` of up to `len` bytes of `from` into `to`: 0 at the pipe's end (empty, no writer).
fn tee(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> std::io::Result<usize> {
    loop {
        // SAFETY: both fds are borrowed, so open for the call; tee takes no pointers.
        let n = unsafe { libc::tee(from.as_raw_fd(), to.as_raw_fd(), len, 0) };
        if n >= 0 {
            return Ok(n as usize);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            Errno::EAGAIN => {
                let mut fds = [nix::poll::PollFd::new(from, nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE);
            }
            e => return Err(e.into()),
        }
    }
}

fn read_exact(fd: BorrowedFd<'_>, mut buf: &mut [u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::read(fd, buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Moves one phase of data from the pipe `data` into `out` by tee, read (for the CRC) and
/// splice, until the pipe ends (reads 0), one DATA record (closing a chunk) per tee. Returns
/// (bytes, records). `buf` bounds the record size (at most [`MAX_FRAGMENT`]).
pub fn pump_pipe<W: Write + AsFd>(
    data: BorrowedFd<'_>,
    out: &mut StreamWriter<W>,
    index: u16,
    phase: Phase,
    buf: &mut [u8],
    obs: &dyn Observer,
) -> Result<(u64, u64)> {
    let (scratch_r, scratch_w) = scratch_pipe()?;
    let max = buf.len().clamp(1, MAX_FRAGMENT);
    let (mut bytes, mut records, mut since_event) = (0u64, 0u64, 0u64);
    loop {
        let n = tee(data, scratch_w.as_fd(), max)
            .map_err(|e| Error::device("tee the migration data fd", e))?;
        if n == 0 {
            return Ok((bytes, records));
        }
        read_exact(scratch_r.as_fd(), &mut buf[..n])
            .map_err(|e| Error::device("read the scratch pipe", e))?;
        out.data_spliced(index, phase, &buf[..n], data, true)?;
        bytes += n as u64;
        records += 1;
        since_event += n as u64;
        if since_event >= (4 << 20) {
            since_event = 0;
            obs.on_event(&Event::Progress {
                device: index,
                phase,
                bytes,
            });
        }
    }
}

/// [`crate::engine::save::save_device`] for a device with a data fd
/// ([`MigrationDevice::data_fd`], v2), with the stop-and-copy data moved by [`pump_pipe`]
/// when that fd is a pipe and `out`'s transport accepts splice;
/// otherwise (a kernel data fd, an `O_APPEND` file, ...) exactly the plain path. Pre-copy
/// (`opts.live`) always takes the plain path. The stream is the same either way, record
/// boundaries aside. The caller handles rollback.
pub fn save_spliced<W: Write + AsFd>(
    dev: &mut dyn MigrationDevice,
    out: &mut StreamWriter<W>,
    index: u16,
    opts: &SaveOptions,
    obs: &dyn Observer,
) -> Result<SaveReport> {
    let mut report = SaveReport::default();
    if opts.live {
        pre_copy(dev, out, index, opts, obs, &mut report)?;
    }
    let started = Instant::now();
    dev.start_stop_copy()?;
    obs.on_event(&Event::PhaseStarted {
        device: index,
        phase: Phase::StopCopy,
        pending: None,
    });
    let mut buf = vec![0u8; opts.buffer.clamp(4096, MAX_FRAGMENT)];
    let splice = dev.data_fd().is_some_and(is_pipe) && can_splice_into(out.get_ref().as_fd());
    let (bytes, chunks) = match dev.data_fd() {
        Some(fd) if splice => pump_pipe(fd, out, index, Phase::StopCopy, &mut buf, obs)?,
        _ => {
            let mut pump = Pump {
                dev,
                out,
                index,
                buf,
                obs,
            };
            let (b, c, _) = pump.run(Phase::StopCopy, None, 0)?;
            (b, c)
        }
    };
    report.stop_copy_bytes = bytes;
    report.chunks += chunks;
    out.end_phase(index, Phase::StopCopy)?;
    report.stop_copy_time = started.elapsed();
    obs.on_event(&Event::PhaseEnded {
        device: index,
        phase: Phase::StopCopy,
        bytes,
        chunks,
        elapsed: report.stop_copy_time,
    });
    dev.finish_save()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_whose_pipe_bytes_differ_from_the_copy_is_refused_by_the_reader() {
        let (pr, pw) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        nix::unistd::write(&pw, b"XYZ").unwrap();
        let header = crate::stream::StreamHeader {
            session_id: [0; 16],
            epoch: 1,
            devices: vec![crate::stream::DeviceDescriptor {
                protocol: crate::stream::format::Protocol::V2,
                live: false,
                migration_flags: 1,
                model: "m".into(),
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad");
        let mut w = StreamWriter::new(std::fs::File::create(&path).unwrap(), &header).unwrap();
        w.data_spliced(0, Phase::StopCopy, b"abc", pr.as_fd(), true)
            .unwrap();
        w.end_phase(0, Phase::StopCopy).unwrap();
        w.finish().unwrap();
        let e = crate::stream::reader::verify(std::fs::File::open(&path).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("read stream record 0"), "{e}");
        // A good one verifies.
        nix::unistd::write(&pw, b"abc").unwrap();
        let path = dir.path().join("good");
        let mut w = StreamWriter::new(std::fs::File::create(&path).unwrap(), &header).unwrap();
        w.data_spliced(0, Phase::StopCopy, b"abc", pr.as_fd(), true)
            .unwrap();
        w.end_phase(0, Phase::StopCopy).unwrap();
        w.finish().unwrap();
        crate::stream::reader::verify(std::fs::File::open(&path).unwrap()).unwrap();
    }
}
