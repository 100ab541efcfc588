// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The migration data fd: an owned handle on one data transfer session.
//!
//! The kernel returns it from a transition into PRE_COPY, PRE_COPY_P2P, STOP_COPY (saving:
//! read it) or RESUMING (write it). It is a plain stream: the handle exposes its fd
//! ([`DataFd::fd`]) so a VMM can poll it, splice it to a socket, or hand it to its event loop.
//! A device whose state moves by messages opens a session without an fd
//! ([`DataSession::without_fd`]); it is then read and written only through the device
//! ([`DataFd::read_via`], [`DataFd::write_all_via`]).
//!
//! Reading distinguishes the two ways a device says "nothing more now":
//! [`DataRead::Eof`] (read returned 0: the end of the stream in STOP_COPY; in pre-copy mtty
//! also uses it for "no more pre-copy data for now") and [`DataRead::NoMessage`] (ENOMSG: the
//! uAPI's temporary end of pre-copy data). Which one ends what is the driver's call, as it
//! depends on the state. EINTR is retried; EAGAIN (a non-blocking fd) waits in `poll(2)`.

use std::io;
use std::os::fd::BorrowedFd;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::device::{DataSession, DeviceIo};

/// What one read of the data fd produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataRead {
    /// This many bytes (at least 1) were read.
    Bytes(usize),
    /// `read` returned 0.
    Eof,
    /// `read` failed with ENOMSG: no pre-copy data available for now.
    NoMessage,
}

/// An owned migration data session (its data fd, where it has one).
#[derive(Debug)]
pub struct DataFd {
    session: DataSession,
}

impl DataFd {
    /// Takes ownership of a data session returned by a state transition.
    pub fn new(session: DataSession) -> Self {
        Self { session }
    }

    /// Gives the session back (for a caller that drives the session itself).
    pub fn into_session(self) -> DataSession {
        self.session
    }

    /// The session, for the device's own operations on it.
    pub fn session(&self) -> &DataSession {
        &self.session
    }

    /// The data fd, where the session has one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.session.fd()
    }

    /// One `read(2)` into `buf` (non-empty), retried on EINTR and, for a non-blocking fd,
    /// after waiting for readability on EAGAIN. `EBADF` for a session without an fd.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<DataRead> {
        self.read_with(buf, |s, buf| Ok(nix::unistd::read(s.require_fd()?, buf)?))
    }

    /// [`DataFd::read`] through the device's [`DeviceIo::read_data`] (the syscall on a real
    /// device).
    pub fn read_via(&self, dev: &dyn DeviceIo, buf: &mut [u8]) -> io::Result<DataRead> {
        self.read_with(buf, |s, buf| dev.read_data(s, buf))
    }

    /// [`DataFd::write_all`] through the device's [`DeviceIo::write_data`].
    pub fn write_all_via(&self, dev: &dyn DeviceIo, data: &[u8]) -> io::Result<()> {
        self.write_all_with(data, |s, d| dev.write_data(s, d))
    }

    fn read_with(
        &self,
        buf: &mut [u8],
        read: impl Fn(&DataSession, &mut [u8]) -> io::Result<usize>,
    ) -> io::Result<DataRead> {
        if buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty buffer for a data fd read",
            ));
        }
        loop {
            // An error without an errno (a device's own message) is kept as it is.
            let r = read(&self.session, buf);
            let errno = r.as_ref().err().and_then(io::Error::raw_os_error);
            match (r, errno) {
                (Err(e), None) => return Err(e),
                (r, _) => match classify(r.map_err(to_errno)) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => continue,
                    Err(Errno::EAGAIN) => self.wait(PollFlags::POLLIN)?,
                    Err(e) => return Err(e.into()),
                },
            }
        }
    }

    /// Writes all of `data`: partial writes continue, EINTR is retried, EAGAIN waits for
    /// writability. A write of 0 bytes is an error (the session accepts no more).
    pub fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.write_all_with(data, |s, d| Ok(nix::unistd::write(s.require_fd()?, d)?))
    }

    fn write_all_with(
        &self,
        mut data: &[u8],
        write: impl Fn(&DataSession, &[u8]) -> io::Result<usize>,
    ) -> io::Result<()> {
        while !data.is_empty() {
            match write(&self.session, data).map_err(|e| (e.raw_os_error(), e)) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("the data fd took 0 of {} bytes", data.len()),
                    ))
                }
                Ok(n) => data = &data[n..],
                Err((Some(libc::EINTR), _)) => continue,
                Err((Some(libc::EAGAIN), _)) => self.wait(PollFlags::POLLOUT)?,
                Err((_, e)) => return Err(e),
            }
        }
        Ok(())
    }

    /// Blocks until the fd is ready for `events` (or reports an error or hang-up, which the
    /// next read or write then returns). A session without an fd has nothing to wait on:
    /// EAGAIN from its device is an error.
    fn wait(&self, events: PollFlags) -> io::Result<()> {
        let fd = self
            .fd()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EAGAIN))?;
        loop {
            let mut fds = [PollFd::new(fd, events)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The errno of an I/O error that carries one (EIO otherwise, which callers keep apart).
fn to_errno(e: io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Sorts a raw read result: `Ok(Some(_))` is an answer, `Ok(None)` asks for a retry (EINTR),
/// `Err` is any other errno (EAGAIN included, which the caller waits on).
pub(crate) fn classify(r: nix::Result<usize>) -> Result<Option<DataRead>, Errno> {
    match r {
        Ok(0) => Ok(Some(DataRead::Eof)),
        Ok(n) => Ok(Some(DataRead::Bytes(n))),
        Err(Errno::ENOMSG) => Ok(Some(DataRead::NoMessage)),
        Err(Errno::EINTR) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::OFlag;
    use nix::unistd::pipe2;
    use std::time::Duration;

    #[test]
    fn classify_separates_eof_enomsg_and_retries() {
        assert_eq!(classify(Ok(0)), Ok(Some(DataRead::Eof)));
        assert_eq!(classify(Ok(5)), Ok(Some(DataRead::Bytes(5))));
        assert_eq!(classify(Err(Errno::ENOMSG)), Ok(Some(DataRead::NoMessage)));
        assert_eq!(classify(Err(Errno::EINTR)), Ok(None));
        assert_eq!(classify(Err(Errno::EAGAIN)), Err(Errno::EAGAIN));
        assert_eq!(classify(Err(Errno::ENODEV)), Err(Errno::ENODEV));
    }

    #[test]
    fn reads_data_then_eof() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        let data = DataFd::new(DataSession::from_fd(r));
        nix::unistd::write(&w, b"header").unwrap();
        drop(w);
        let mut buf = [0u8; 64];
        assert_eq!(data.read(&mut buf).unwrap(), DataRead::Bytes(6));
        assert_eq!(&buf[..6], b"header");
        assert_eq!(data.read(&mut buf).unwrap(), DataRead::Eof);
        assert!(data.read(&mut []).is_err());
    }

    #[test]
    fn non_blocking_read_waits_in_poll() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        let data = DataFd::new(DataSession::from_fd(r));
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            nix::unistd::write(&w, b"late").unwrap();
        });
        let mut buf = [0u8; 16];
        assert_eq!(data.read(&mut buf).unwrap(), DataRead::Bytes(4));
        writer.join().unwrap();
    }

    #[test]
    fn write_all_survives_partial_non_blocking_writes() {
        // More than a pipe holds, through a non-blocking write end: EAGAIN and short writes.
        let (r, w) = pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).unwrap();
        let data = DataFd::new(DataSession::from_fd(w));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = payload.clone();
        let reader = std::thread::spawn(move || {
            let r = DataFd::new(DataSession::from_fd(r));
            let mut got = Vec::new();
            let mut buf = [0u8; 7000];
            loop {
                match r.read(&mut buf).unwrap() {
                    DataRead::Bytes(n) => got.extend_from_slice(&buf[..n]),
                    DataRead::Eof => return got,
                    DataRead::NoMessage => unreachable!(),
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        data.write_all(&payload).unwrap();
        drop(data);
        assert_eq!(reader.join().unwrap(), expect);
    }

    #[test]
    fn write_to_a_closed_session_fails() {
        let (r, w) = pipe2(OFlag::O_CLOEXEC).unwrap();
        drop(r);
        let data = DataFd::new(DataSession::from_fd(w));
        // SIGPIPE is ignored by the Rust runtime, so this is EPIPE.
        let err = data.write_all(b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPIPE));
    }
}
