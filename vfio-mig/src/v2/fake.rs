// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A tiny test-only v2 device for the driver's unit tests (the full mock is the
//! `vfio-mig-mock` crate): the typed feature operations for MIGRATION, MIG_DEVICE_STATE,
//! MIG_DATA_SIZE and DMA logging, walking the kernel's arcs with [`next_step`] like a vendor driver does.
//!
//! Saving sessions are `SOCK_SEQPACKET` socket pairs, which can carry a zero-length message:
//! like mtty, PRE_COPY yields the 24-byte header and then a 0-byte read, and STOP_COPY
//! reached from PRE_COPY continues on the same fd with the 72 port bytes, then end of stream.
//! Resuming sessions are pipes; RESUMING -> STOP fails with EINVAL (staying in RESUMING)
//! unless exactly header + ports arrived. Faults make chosen arcs fail and land anywhere.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{send, socketpair, AddressFamily, MsgFlags, SockFlag, SockType};
use vfio_bindings::bindings::vfio::{
    vfio_precopy_info, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
};

use super::state::{next_step, MigState, MigrationFlags};
use crate::device::{DataSession, DeviceIdentity, DeviceInfo, DeviceIo, DmaLoggingRange, Mapping};

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Makes the arc `from -> to` fail once with `errno`, leaving the device in `land`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    from: MigState,
    to: MigState,
    errno: i32,
    land: MigState,
}

impl Fault {
    pub(crate) fn new(from: MigState, to: MigState, errno: i32, land: MigState) -> Self {
        Self {
            from,
            to,
            errno,
            land,
        }
    }
}

/// The fake's state, open to tests through [`Fake::with`].
#[derive(Debug, Default)]
pub(crate) struct Inner {
    /// `None`: the device has no migration feature at all.
    flags: Option<u64>,
    state: Option<MigState>,
    arcs: Vec<(MigState, MigState)>,
    sets: Vec<MigState>,
    resets: usize,
    reset_fails: bool,
    faults: Vec<Fault>,
    saving: Option<OwnedFd>,
    resuming: Option<OwnedFd>,
    /// The read end of a finished resume, kept to see when the user closes its writer.
    finished_resume: Option<OwnedFd>,
    received: Vec<u8>,
    writer_open: Vec<(MigState, MigState, bool)>,
    dma_calls: usize,
    /// Return -1 where a data fd is due.
    pub withhold_fds: bool,
    /// Return a fresh fd for PRE_COPY_P2P -> STOP_COPY instead of continuing.
    pub new_fd_for_stop_copy: bool,
}

/// The fake device.
#[derive(Debug)]
pub(crate) struct Fake {
    inner: Mutex<Inner>,
}

const HEADER: [u8; 24] = *b"MTTY-LIKE-HEADER-2-PORTS";

impl Fake {
    /// A device with migration flags `bits`, RUNNING.
    pub(crate) fn new(bits: u64) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                flags: Some(bits),
                state: Some(MigState::Running),
                ..Default::default()
            }),
        })
    }

    /// A device without `VFIO_DEVICE_FEATURE_MIGRATION`.
    pub(crate) fn without_migration() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Runs `f` on the fake's state.
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.lock())
    }

    pub(crate) fn fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub(crate) fn fail_resets(&self) {
        self.lock().reset_fails = true;
    }

    pub(crate) fn arcs(&self) -> Vec<(MigState, MigState)> {
        self.lock().arcs.clone()
    }

    pub(crate) fn sets(&self) -> Vec<MigState> {
        self.lock().sets.clone()
    }

    pub(crate) fn state(&self) -> MigState {
        self.lock().state.unwrap()
    }

    pub(crate) fn resets(&self) -> usize {
        self.lock().resets
    }

    pub(crate) fn received(&self) -> Vec<u8> {
        self.lock().received.clone()
    }

    pub(crate) fn dma_calls(&self) -> usize {
        self.lock().dma_calls
    }

    /// Whether the user's resume writer was still open when `from -> to` ran.
    pub(crate) fn writer_open_at(&self, from: MigState, to: MigState) -> Option<bool> {
        self.lock()
            .writer_open
            .iter()
            .find(|(a, b, _)| (*a, *b) == (from, to))
            .map(|(_, _, open)| *open)
    }

    pub(crate) fn pre_data(&self) -> Vec<u8> {
        HEADER.to_vec()
    }

    pub(crate) fn stop_data(&self) -> Vec<u8> {
        (0..72u8).collect()
    }
}

fn seqpacket() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn message(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    send(fd.as_raw_fd(), bytes, MsgFlags::empty())?;
    Ok(())
}

fn hung_up(fd: &OwnedFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap();
    fds[0]
        .revents()
        .is_some_and(|r| r.contains(PollFlags::POLLHUP))
}

impl Inner {
    /// One arc, as a vendor driver's step function: returns the session fd it opens.
    fn arc(&mut self, cur: MigState, next: MigState) -> io::Result<Option<OwnedFd>> {
        use MigState::*;
        if let Some(probe) = &self.finished_resume {
            let open = !hung_up(probe);
            self.writer_open.push((cur, next, open));
        }
        let stop: Vec<u8> = (0..72u8).collect();
        let fd = match (cur, next) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                let (user, dev) = seqpacket()?;
                message(&dev, &HEADER)?;
                message(&dev, &[])?;
                self.saving = Some(dev);
                Some(user)
            }
            (Stop, StopCopy) => {
                let (user, dev) = seqpacket()?;
                message(&dev, &HEADER)?;
                message(&dev, &stop)?;
                Some(user)
            }
            (PreCopy | PreCopyP2p, StopCopy) if self.new_fd_for_stop_copy => {
                let (user, dev) = seqpacket()?;
                message(&dev, &stop)?;
                self.saving = None;
                Some(user)
            }
            (PreCopy | PreCopyP2p, StopCopy) => {
                let dev = self.saving.take().ok_or_else(|| errno(libc::EINVAL))?;
                message(&dev, &stop)?;
                None
            }
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => {
                self.saving = None;
                None
            }
            (Stop, Resuming) => {
                let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
                self.resuming = Some(read);
                self.finished_resume = None;
                self.received.clear();
                Some(write)
            }
            (Resuming, Stop) => {
                let read = self.resuming.as_ref().ok_or_else(|| errno(libc::EINVAL))?;
                let mut buf = [0u8; 4096];
                loop {
                    match nix::unistd::read(read, &mut buf) {
                        Ok(0) | Err(nix::errno::Errno::EAGAIN) => break,
                        Ok(n) => self.received.extend_from_slice(&buf[..n]),
                        Err(e) => return Err(e.into()),
                    }
                }
                let mut expect = HEADER.to_vec();
                expect.extend_from_slice(&stop);
                if self.received != expect {
                    return Err(errno(libc::EINVAL));
                }
                self.finished_resume = self.resuming.take();
                None
            }
            _ => None,
        };
        Ok(if self.withhold_fds { None } else { fd })
    }

    /// A SET: walks the kernel's arcs to `target` like mtty's set_state loop.
    fn set(&mut self, target: MigState) -> io::Result<Option<OwnedFd>> {
        let flags = MigrationFlags::from_bits_retain(self.flags.unwrap());
        self.sets.push(target);
        let mut fd = None;
        while self.state.unwrap() != target {
            let cur = self.state.unwrap();
            let next = next_step(cur, target, flags).map_err(|_| errno(libc::EINVAL))?;
            if let Some(i) = self
                .faults
                .iter()
                .position(|f| (f.from, f.to) == (cur, next))
            {
                let f = self.faults.remove(i);
                self.state = Some(f.land);
                return Err(errno(f.errno));
            }
            fd = self.arc(cur, next)?;
            self.arcs.push((cur, next));
            self.state = Some(next);
        }
        Ok(fd)
    }
}

impl DeviceIo for Fake {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: "fake:v2".into(),
            instance: "fake-v2".into(),
        }
    }

    fn device_info(&self) -> io::Result<DeviceInfo> {
        Ok(DeviceInfo {
            flags: 0,
            num_regions: 0,
            num_irqs: 0,
        })
    }

    fn region_info_raw(&self, _buf: &mut [u8]) -> io::Result<()> {
        Err(errno(libc::EINVAL))
    }

    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> io::Result<usize> {
        Err(errno(libc::EINVAL))
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
        Err(errno(libc::EINVAL))
    }

    fn mmap(&self, _offset: u64, _len: usize, _writable: bool) -> io::Result<Mapping> {
        Err(errno(libc::EINVAL))
    }

    fn reset(&self) -> io::Result<()> {
        let mut f = self.lock();
        f.resets += 1;
        if f.reset_fails {
            return Err(errno(libc::EIO));
        }
        f.state = Some(MigState::Running);
        f.saving = None;
        f.resuming = None;
        Ok(())
    }

    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        let f = self.lock();
        if f.flags.is_none() {
            return Err(errno(libc::ENOTTY));
        }
        let (get, set) = (
            access & VFIO_DEVICE_FEATURE_GET != 0,
            access & VFIO_DEVICE_FEATURE_SET != 0,
        );
        let (ok_get, ok_set) = match feature {
            VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => (true, false),
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => (true, true),
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => {
                (false, true)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => (true, false),
            _ => return Err(errno(libc::ENOTTY)),
        };
        if (get && !ok_get) || (set && !ok_set) {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    fn migration_flags(&self) -> io::Result<u64> {
        self.lock().flags.ok_or_else(|| errno(libc::ENOTTY))
    }

    fn mig_state(&self) -> io::Result<u32> {
        let f = self.lock();
        f.flags.ok_or_else(|| errno(libc::ENOTTY))?;
        Ok(f.state.unwrap().raw())
    }

    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        let mut f = self.lock();
        f.flags.ok_or_else(|| errno(libc::ENOTTY))?;
        let target = MigState::from_raw(state).ok_or_else(|| errno(libc::EINVAL))?;
        Ok(f.set(target)?.map(DataSession::from_fd))
    }

    fn mig_data_size(&self) -> io::Result<u64> {
        self.lock().flags.ok_or_else(|| errno(libc::ENOTTY))?;
        Ok(96)
    }

    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        let mut f = self.lock();
        f.flags.ok_or_else(|| errno(libc::ENOTTY))?;
        f.dma_calls += 1;
        if ranges.is_empty() {
            return Err(errno(libc::EINVAL));
        }
        Ok(page_size)
    }

    fn dma_logging_stop(&self) -> io::Result<()> {
        let mut f = self.lock();
        f.flags.ok_or_else(|| errno(libc::ENOTTY))?;
        f.dma_calls += 1;
        Ok(())
    }

    fn dma_logging_report(
        &self,
        _iova: u64,
        length: u64,
        _page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        let mut f = self.lock();
        f.flags.ok_or_else(|| errno(libc::ENOTTY))?;
        f.dma_calls += 1;
        if length > 0 {
            // Page 0 is always dirty here.
            *bitmap.first_mut().ok_or_else(|| errno(libc::EINVAL))? |= 1;
        }
        Ok(())
    }

    fn precopy_info(&self, _session: &DataSession) -> io::Result<vfio_precopy_info> {
        let f = self.lock();
        if !f.state.unwrap().is_pre_copy() {
            return Err(errno(libc::EINVAL));
        }
        Ok(vfio_precopy_info {
            argsz: std::mem::size_of::<vfio_precopy_info>() as u32,
            flags: 0,
            initial_bytes: HEADER.len() as u64,
            dirty_bytes: 0,
        })
    }
}
