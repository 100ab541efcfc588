// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One vfio-user connection: commands out, replies in, over a UNIX stream socket, with file
//! descriptors passed as `SCM_RIGHTS`.
//!
//! Every reply is checked before its payload is used: its type, message id and command must
//! be those of the command in flight, and its size at most [`Limits::max_reply`] (read in
//! full only after that check, so a server cannot make the client allocate more). Whatever
//! leaves the byte stream out of step (a hang-up or a timeout mid-message, a reply to another
//! id, an oversized or truncated reply) breaks the connection for good: every later call
//! fails with the first failure's text, since no later byte can be trusted to start a
//! message. An error reply (`VFIO_USER_F_ERROR`) is the device's answer, an errno, and
//! leaves the connection usable.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::wire::{Command, Header, F_ERROR, F_NO_REPLY, F_TYPE_REPLY, HEADER_SIZE};

/// The most descriptors one message may carry (libvfio-user's server sends up to 8).
pub const MAX_FDS: usize = 8;

/// Bounds on what the client accepts from a server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest reply payload read; a larger `msg_size` breaks the connection.
    pub max_reply: usize,
    /// How long a reply may take; a slower server breaks the connection.
    pub reply_timeout: Duration,
}

/// One reply: its payload and the descriptors that came with it.
#[derive(Debug)]
pub struct Reply {
    /// The payload after the header.
    pub body: Vec<u8>,
    /// Descriptors passed with it (closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// A connection to a vfio-user server.
#[derive(Debug)]
pub struct Connection {
    sock: UnixStream,
    next_id: u16,
    limits: Limits,
    /// Why the connection is out of step, once it is.
    broken: Option<String>,
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Connection {
    /// Wraps a connected socket.
    pub fn new(sock: UnixStream, limits: Limits) -> io::Result<Self> {
        sock.set_read_timeout(Some(limits.reply_timeout))?;
        Ok(Self {
            sock,
            next_id: 0,
            limits,
            broken: None,
        })
    }

    /// Changes the reply size bound (after the version negotiation).
    pub fn set_max_reply(&mut self, max_reply: usize) {
        self.limits.max_reply = max_reply;
    }

    /// Sends `cmd` with `payload` and waits for its reply. Commands the server sends in the
    /// meantime (DMA requests) are refused with `EOPNOTSUPP`: this client maps no DMA.
    pub fn request(&mut self, cmd: Command, payload: &[u8]) -> io::Result<Reply> {
        if let Some(why) = &self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("{cmd}: the connection is unusable after an earlier failure ({why})"),
            ));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(id, cmd, payload.len());
        let result = self.exchange(cmd, header, payload);
        match result {
            Err(Failure::Broken(why)) => {
                let e = io::Error::new(why.kind(), format!("{cmd} (message {id}): {why}"));
                self.broken = Some(e.to_string());
                Err(e)
            }
            Err(Failure::Errno(errno)) => {
                log::debug!("vfio-user {cmd} (message {id}): error reply {errno}");
                Err(io::Error::from_raw_os_error(errno))
            }
            Ok(reply) => Ok(reply),
        }
    }

    fn exchange(&mut self, cmd: Command, header: Header, payload: &[u8]) -> Result<Reply, Failure> {
        log::trace!(
            "vfio-user -> {cmd} id {} ({} bytes)",
            header.msg_id,
            payload.len()
        );
        self.send(&header.encode(), payload)
            .map_err(Failure::Broken)?;
        loop {
            let (h, reply) = self.receive().map_err(Failure::Broken)?;
            if !h.is_reply() {
                self.refuse(&h).map_err(Failure::Broken)?;
                continue;
            }
            if h.msg_id != header.msg_id || h.cmd != header.cmd {
                return Err(Failure::Broken(invalid(format!(
                    "the server answered message {} (command {}) instead",
                    h.msg_id, h.cmd
                ))));
            }
            if h.flags & F_ERROR != 0 {
                // An error reply without an errno is still an error.
                let errno = i32::try_from(h.error_no).ok().filter(|&e| e > 0);
                return Err(Failure::Errno(errno.unwrap_or(libc::EIO)));
            }
            return Ok(reply);
        }
    }

    /// Answers a command from the server with `EOPNOTSUPP` (unless it wants no reply).
    fn refuse(&mut self, h: &Header) -> io::Result<()> {
        log::warn!(
            "vfio-user: the server sent command {} (message {}); refused",
            h.cmd,
            h.msg_id
        );
        if h.flags & F_NO_REPLY != 0 {
            return Ok(());
        }
        let reply = Header {
            msg_id: h.msg_id,
            cmd: h.cmd,
            msg_size: HEADER_SIZE as u32,
            flags: F_TYPE_REPLY | F_ERROR,
            error_no: libc::EOPNOTSUPP as u32,
        };
        self.send(&reply.encode(), &[])
    }

    fn send(&mut self, header: &[u8], payload: &[u8]) -> io::Result<()> {
        let mut bufs: Vec<&[u8]> = vec![header, payload];
        while bufs.iter().any(|b| !b.is_empty()) {
            let iov: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let cmsgs: [ControlMessage<'_>; 0] = [];
            let sent = match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("sending the command failed: {e}"),
                    ))
                }
            };
            let mut left = sent;
            for b in bufs.iter_mut() {
                let take = left.min(b.len());
                *b = &b[take..];
                left -= take;
            }
        }
        Ok(())
    }

    /// Reads one whole message: its header, then (after the size check) its payload.
    fn receive(&mut self) -> io::Result<(Header, Reply)> {
        let mut fds = Vec::new();
        let mut raw = [0u8; HEADER_SIZE];
        self.read_exact(&mut raw, &mut fds, "header")?;
        let h = Header::decode(&raw);
        let size = h.msg_size as usize;
        if size < HEADER_SIZE {
            return Err(invalid(format!(
                "malformed reply: msg_size {size} is smaller than the {HEADER_SIZE}-byte header"
            )));
        }
        let body_len = size - HEADER_SIZE;
        if body_len > self.limits.max_reply {
            return Err(invalid(format!(
                "oversized reply: {body_len} payload bytes, more than the {} accepted",
                self.limits.max_reply
            )));
        }
        let mut body = vec![0u8; body_len];
        self.read_exact(&mut body, &mut fds, "payload")?;
        log::trace!(
            "vfio-user <- cmd {} id {} flags {:#x} ({} bytes, {} fds)",
            h.cmd,
            h.msg_id,
            h.flags,
            body_len,
            fds.len()
        );
        Ok((h, Reply { body, fds }))
    }

    fn read_exact(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>, part: &str) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
            let mut iov = [IoSliceMut::new(&mut buf[done..])];
            let msg = match recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no reply within {:?} ({done} of {} {part} bytes received)",
                            self.limits.reply_timeout,
                            buf.len()
                        ),
                    ))
                }
                Err(e) => return Err(io::Error::from(e)),
            };
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: the kernel installed these descriptors in this process for
                        // this message (SCM_RIGHTS); nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(invalid(format!(
                    "the server passed more than {MAX_FDS} descriptors with one message"
                )));
            }
            let n = msg.bytes;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the server hung up after {done} of {} {part} bytes",
                        buf.len()
                    ),
                ));
            }
            done += n;
        }
        Ok(())
    }
}

/// How an exchange failed.
enum Failure {
    /// The byte stream is out of step (or gone).
    Broken(io::Error),
    /// The server answered with an error reply carrying this errno.
    Errno(i32),
}
