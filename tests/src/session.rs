// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers of the session tests: both sides of a handshake in two threads, and a connection
//! wrapper that kills the connection at a chosen point.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use vfio_mig::wire::StreamHeader;
use vfio_mig::OpenedDevice;
use vfio_mig::{Observer, SaveOptions};
use vfio_mig_fence::Fence;
use vfio_mig_session::handshake::{receive, send, RecvOutcome, SendOutcome};
use vfio_mig_session::transport::{Connection, Duplex};
use vfio_mig_session::Result;

/// Runs [`send`] on `src` over `a` and [`receive`] on `dst` over `b` in two threads.
#[allow(clippy::too_many_arguments)]
pub fn run_pair<A: Duplex, B: Duplex>(
    src: &mut OpenedDevice,
    dst: &mut OpenedDevice,
    header: &StreamHeader,
    opts: &SaveOptions,
    fence: &mut dyn Fence,
    a: A,
    b: B,
    src_obs: &dyn Observer,
    dst_obs: &dyn Observer,
) -> (Result<SendOutcome>, Result<RecvOutcome>) {
    std::thread::scope(|s| {
        let saver = s.spawn(|| send(&mut [src.device.as_mut()], a, header, opts, src_obs));
        let loader = s.spawn(|| receive(&mut [dst.device.as_mut()], b, fence, dst_obs));
        (saver.join().unwrap(), loader.join().unwrap())
    })
}

/// When a [`KillSwitch`] kills its connection.
#[derive(Debug, Default)]
struct Plan {
    /// Kill instead of performing the N-th `write` call (from 1), across all clones.
    kill_at_write: Option<u32>,
    writes: AtomicU32,
    killed: AtomicBool,
}

/// A connection that a test kills at a chosen `write` call: the socket is shut down in both
/// directions (the peer sees EOF and `EPIPE`) and every later call on any clone fails.
#[derive(Debug)]
pub struct KillSwitch {
    conn: Connection,
    plan: Arc<Plan>,
}

impl KillSwitch {
    /// Wraps `conn`; `kill_at_write` is the number of the `write` call (from 1) that kills.
    pub fn new(conn: Connection, kill_at_write: Option<u32>) -> Self {
        Self {
            conn,
            plan: Arc::new(Plan {
                kill_at_write,
                ..Default::default()
            }),
        }
    }

    /// Whether the connection was killed.
    pub fn killed(&self) -> bool {
        self.plan.killed.load(Ordering::SeqCst)
    }

    fn dead() -> io::Error {
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection killed by the test",
        )
    }

    fn kill(&self) -> io::Error {
        self.plan.killed.store(true, Ordering::SeqCst);
        let _ = self.conn.shutdown(Shutdown::Both);
        Self::dead()
    }
}

impl Read for KillSwitch {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.killed() {
            return Err(Self::dead());
        }
        self.conn.read(buf)
    }
}

impl Write for KillSwitch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.killed() {
            return Err(Self::dead());
        }
        let n = self.plan.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.plan.kill_at_write == Some(n) {
            return Err(self.kill());
        }
        self.conn.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.conn.flush()
    }
}

impl AsFd for KillSwitch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.as_fd()
    }
}

impl Duplex for KillSwitch {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            conn: self.conn.try_clone()?,
            plan: self.plan.clone(),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.conn.shutdown(how)
    }
}
