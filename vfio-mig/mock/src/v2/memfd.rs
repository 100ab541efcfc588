// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Data fds over memfds (`data-fd=memfd`): a device whose data fd reads and writes at the
//! speed of the page cache, as a kernel driver's data fd copies out of and into kernel
//! buffers, with no producer or consumer thread between the caller and the bytes. A benchmark
//! of such a device measures the engine, not the mock.
//!
//! - The device's state is a sealed memfd holding its whole stop-copy stream ([`StateFile`],
//!   built when the device is created, dropped when a resume starts, rebuilt at STOP_COPY only
//!   when the state changed or was dropped). STOP_COPY hands
//!   out a file description of its own, opened read-only through `/proc/self/fd`: it starts at
//!   offset 0 and reads the stream, then 0 ([`FileSave`]); the seals keep anyone from changing
//!   the device's state through it.
//! - RESUMING hands out a write-only description of a new memfd; the device reads it back and
//!   verifies it by seed when it leaves RESUMING (see `LoadSession::start_file`).
//!
//! There is no pre-copy (a memfd cannot say "more later"), no data rate, and no per-read
//! fault point: the spec refuses those options with `data-fd=memfd`.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, open, FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::Mode;
use nix::unistd::{lseek, Whence};

use crate::content::{Content, Encoder};

/// The seals that freeze a memfd's bytes and length.
fn frozen() -> SealFlag {
    SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SHRINK
}

/// Bytes encoded and written into a state file at a time.
const BUILD_PIECE: usize = 1 << 20;

/// A new, empty memfd that can be sealed.
pub(super) fn create(name: &str) -> io::Result<OwnedFd> {
    Ok(memfd_create(
        name,
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?)
}

/// A new file description of the file behind `fd` (offset 0, `mode`), through
/// `/proc/self/fd`: unlike `dup`, it shares no offset with `fd`.
pub(super) fn reopen(fd: BorrowedFd<'_>, mode: OFlag) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    open(path.as_str(), mode | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("the v2 mock needs /proc for memfd data fds: open {path}: {e}"),
        )
    })
}

/// Truncates a memfd and seals it: later writes through any of its descriptions fail
/// (EPERM), reads return 0, and its pages are freed.
pub(super) fn empty_and_seal(fd: BorrowedFd<'_>) -> io::Result<()> {
    nix::unistd::ftruncate(fd, 0)?;
    fcntl(fd, FcntlArg::F_ADD_SEALS(frozen()))?;
    Ok(())
}

/// The device's whole stop-copy stream, in a sealed memfd.
#[derive(Debug)]
pub(super) struct StateFile {
    fd: OwnedFd,
    len: u64,
    /// The page generations the stream was built from.
    gens: Vec<u32>,
}

impl StateFile {
    /// Encodes the stream of `content` at generations `gens` (with the MATCH packet first when
    /// `match_header`) into a new memfd, and seals it.
    pub fn build(content: Content, gens: &[u32], match_header: bool) -> io::Result<Self> {
        let mut encoder = Encoder::with_gens(content, gens.to_vec());
        if match_header {
            encoder = encoder.with_match_header(false);
        }
        encoder.finish();
        let mut file = File::from(create("vfio-mig-mock-v2-state")?);
        let mut buf = vec![0u8; BUILD_PIECE];
        let mut len = 0u64;
        while !encoder.is_done() {
            let n = encoder.emit(&mut buf);
            file.write_all(&buf[..n])?;
            len += n as u64;
        }
        let fd = OwnedFd::from(file);
        fcntl(&fd, FcntlArg::F_ADD_SEALS(frozen()))?;
        Ok(Self {
            fd,
            len,
            gens: gens.to_vec(),
        })
    }

    /// Whether this file holds the stream of the state at generations `gens`.
    pub fn holds(&self, gens: &[u32]) -> bool {
        self.gens == gens
    }
}

/// A saving session over a [`StateFile`]: the caller reads a description of its own.
#[derive(Debug)]
pub(super) struct FileSave {
    /// A duplicate of the caller's description (it shares the caller's offset).
    caller: OwnedFd,
    len: u64,
    /// The device state being saved, given back when the session ends.
    pub gens: Vec<u32>,
}

/// What an ended [`FileSave`] leaves behind.
#[derive(Debug)]
pub(super) struct FileSaveEnd {
    /// The device state.
    pub gens: Vec<u32>,
    /// Stream bytes the caller read.
    pub consumed: u64,
    /// The caller read the whole stream.
    pub complete: bool,
}

impl FileSave {
    /// Starts a session reading `file`, for a device at generations `gens` (taken only when
    /// the session starts); returns the caller's read-only description at offset 0.
    pub fn start(file: &StateFile, gens: &mut Vec<u32>) -> io::Result<(Self, OwnedFd)> {
        let fd = reopen(file.fd.as_fd(), OFlag::O_RDONLY)?;
        let caller = fd.try_clone()?;
        Ok((
            Self {
                caller,
                len: file.len,
                gens: std::mem::take(gens),
            },
            fd,
        ))
    }

    /// Stream bytes the caller has read so far (its description's offset).
    pub fn consumed(&self) -> u64 {
        lseek(self.caller.as_fd(), 0, Whence::SeekCur).map_or(0, |o| (o as u64).min(self.len))
    }

    /// Stream bytes the caller has not read yet.
    pub fn remaining(&self) -> u64 {
        self.len - self.consumed()
    }

    /// Ends the session: moves the caller's description to the end of the stream (a read of
    /// the ended fd returns 0, as a pipe whose writer is gone) and gives the state back.
    pub fn end(self) -> FileSaveEnd {
        let consumed = self.consumed();
        // Only EBADF or EINVAL could fail, on a description we opened ourselves.
        let _ = lseek(self.caller.as_fd(), self.len as i64, Whence::SeekSet);
        FileSaveEnd {
            gens: self.gens,
            consumed,
            complete: consumed == self.len,
        }
    }
}
