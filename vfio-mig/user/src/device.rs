// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VfioUserDevice`]: a vfio-user server's device behind vfio-mig's [`DeviceIo`].
//!
//! Each `DeviceIo` operation is one (or, for transfers above the negotiated size, several)
//! vfio-user command(s) on the socket:
//!
//! | `DeviceIo`            | vfio-user                                                   |
//! |-----------------------|-------------------------------------------------------------|
//! | `device_info`         | `VFIO_USER_DEVICE_GET_INFO`                                  |
//! | `region_info_raw`     | `VFIO_USER_DEVICE_GET_REGION_INFO` (offset rewritten, below) |
//! | `read_at`, `write_at` | `VFIO_USER_REGION_READ` / `WRITE`                            |
//! | `reset`               | `VFIO_USER_DEVICE_RESET`                                     |
//! | feature operations    | `VFIO_USER_DEVICE_FEATURE` (PROBE, MIGRATION, MIG_DEVICE_STATE, MIG_DATA_SIZE where probed, DMA_LOGGING_START / STOP / REPORT) |
//! | `read_data`, `write_data` | `VFIO_USER_MIG_DATA_READ` / `WRITE`                      |
//!
//! A data session has no fd ([`DataSession::without_fd`]): the device knows which arcs open
//! one from the v2 rules ([`returns_data_fd`]) and the state it last set or read.
//!
//! Region offsets: the engine addresses a region by absolute device-fd offsets, as the kernel
//! reports them. vfio-user's `offset` field is the offset in the region's mmap fd instead, so
//! region info is answered with vfio-pci's layout (`index << 40`), and `read_at` / `write_at`
//! split an offset back into the region index and the offset inside it.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    vfio_precopy_info, VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
    VFIO_PCI_CONFIG_REGION_INDEX,
};
use vfio_mig::{
    backend::check_dma_bitmap, backend::dma_bitmap_words, backend::DataSession,
    backend::DeviceIdentity, backend::DeviceInfo, backend::DeviceIo, backend::DmaLoggingRange,
    backend::Mapping,
};
use vfio_mig::{backend::v2_state::returns_data_fd, backend::v2_state::MigState};

use crate::conn::{Connection, Limits};
use crate::version::{self, ServerVersion, MAX_DATA_XFER};
use crate::wire::{le32, le64, Command, Payload};

/// The bits of a device-fd offset inside one region (vfio-pci's `VFIO_PCI_OFFSET_SHIFT`).
pub const REGION_SHIFT: u32 = 40;

/// Size of `struct vfio_region_info`.
const REGION_INFO_SIZE: usize = 32;
/// Size of `struct vfio_user_device_feature`'s header (`argsz`, `flags`).
const FEATURE_HEADER: usize = 8;
/// Room for a reply's fixed fields above the data it carries.
const REPLY_SLACK: usize = 64 << 10;

/// How to reach a server.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long one reply may take before the connection is given up.
    pub reply_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// A device served by a vfio-user server, over one connection to its socket.
#[derive(Debug)]
pub struct VfioUserDevice {
    path: PathBuf,
    conn: Mutex<Connection>,
    server: ServerVersion,
    /// The largest region or migration data transfer in one message.
    xfer: usize,
    model: String,
    /// Whether the server answers MIG_DATA_SIZE (probed at connect).
    data_size: bool,
    /// The raw migration state after this client's last GET or successful SET; `None` when
    /// unknown (after a failed SET).
    state: Mutex<Option<u32>>,
}

fn truncated(cmd: Command, what: &str, got: usize, need: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{cmd}: truncated reply: {got} bytes, {need} needed for {what}"),
    )
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

impl VfioUserDevice {
    /// Connects to the server at `path`, negotiates the version and reads what identifies the
    /// device. Each failure names its step.
    pub fn connect(path: &Path, opts: &ConnectOptions) -> io::Result<Self> {
        let step = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!("vfio-user:{}: {what}: {e}", path.display()),
            )
        };
        let sock = UnixStream::connect(path).map_err(|e| step("connect", e))?;
        let limits = Limits {
            max_reply: MAX_DATA_XFER + REPLY_SLACK,
            reply_timeout: opts.reply_timeout,
        };
        let mut conn = Connection::new(sock, limits).map_err(|e| step("connect", e))?;
        let server = version::negotiate(&mut conn).map_err(|e| step("negotiate the version", e))?;
        let xfer = (server.max_data_xfer_size.min(MAX_DATA_XFER as u64)) as usize;
        conn.set_max_reply(xfer + REPLY_SLACK);
        let mut dev = Self {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
            server,
            xfer,
            model: String::new(),
            data_size: false,
            state: Mutex::new(None),
        };
        dev.model = dev.read_model().map_err(|e| step("read the PCI IDs", e))?;
        dev.data_size = dev
            .probe_feature(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_GET)
            .is_ok();
        Ok(dev)
    }

    /// What the server announced in the version negotiation.
    pub fn server(&self) -> &ServerVersion {
        &self.server
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn request(&self, cmd: Command, payload: &[u8]) -> io::Result<Vec<u8>> {
        Ok(self.conn().request(cmd, payload)?.body)
    }

    /// `pci:VVVV:DDDD` from the config space, or `vfio-user` for a device without one.
    fn read_model(&self) -> io::Result<String> {
        let info = self.device_info()?;
        if info.flags & vfio_bindings::bindings::vfio::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Ok("vfio-user".into());
        }
        let mut ids = [0u8; 4];
        let n = self.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut ids)?;
        if n != ids.len() {
            return Err(truncated(Command::RegionRead, "the PCI IDs", n, ids.len()));
        }
        let vendor = u16::from_le_bytes([ids[0], ids[1]]);
        let device = u16::from_le_bytes([ids[2], ids[3]]);
        Ok(format!("vfio-user:pci:{vendor:04x}:{device:04x}"))
    }

    /// One `VFIO_USER_DEVICE_FEATURE`: `flags` (operation and feature), `data` as payload,
    /// `argsz` covering `reply_data` bytes of answer. Returns the answer's data.
    fn feature(&self, flags: u32, data: &[u8], reply_data: usize) -> io::Result<Vec<u8>> {
        let argsz = FEATURE_HEADER + data.len().max(reply_data);
        let payload = Payload::default().u32(argsz as u32).u32(flags).bytes(data);
        let body = self.request(Command::DeviceFeature, &payload.0)?;
        let need = FEATURE_HEADER + reply_data;
        if body.len() < need {
            return Err(truncated(
                Command::DeviceFeature,
                "the feature's answer",
                body.len(),
                need,
            ));
        }
        Ok(body[FEATURE_HEADER..].to_vec())
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let count = buf.len().min(self.xfer);
        let payload = Payload::default().u64(offset).u32(index).u32(count as u32);
        let body = self.request(Command::RegionRead, &payload.0)?;
        read_reply(Command::RegionRead, &body, 16, 12, buf, count)
    }
}

/// Copies the data of a read's reply into `buf`: the reply has `fixed` bytes of fields, the
/// `u32` at `size_at` the byte count, then the data. The count may not exceed the `asked`
/// bytes nor what the reply carries.
fn read_reply(
    cmd: Command,
    body: &[u8],
    fixed: usize,
    size_at: usize,
    buf: &mut [u8],
    asked: usize,
) -> io::Result<usize> {
    if body.len() < fixed {
        return Err(truncated(cmd, "its fixed fields", body.len(), fixed));
    }
    let got = le32(body, size_at) as usize;
    let carried = body.len() - fixed;
    if got > asked || got > carried {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{cmd}: reply claims {got} bytes ({carried} carried) for a read of {asked}"),
        ));
    }
    buf[..got].copy_from_slice(&body[fixed..fixed + got]);
    Ok(got)
}

/// Splits an absolute device-fd offset into the region index and the offset inside it.
fn split_offset(offset: u64) -> io::Result<(u32, u64)> {
    let index = u32::try_from(offset >> REGION_SHIFT).map_err(|_| errno(libc::EINVAL))?;
    Ok((index, offset & ((1u64 << REGION_SHIFT) - 1)))
}

impl DeviceIo for VfioUserDevice {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: self.model.clone(),
            instance: format!("vfio-user:{}", self.path.display()),
        }
    }

    fn device_info(&self) -> io::Result<DeviceInfo> {
        let payload = Payload::default().u32(16).u32(0).u32(0).u32(0);
        let body = self.request(Command::DeviceGetInfo, &payload.0)?;
        if body.len() < 16 {
            return Err(truncated(
                Command::DeviceGetInfo,
                "vfio_user_device_info",
                body.len(),
                16,
            ));
        }
        Ok(DeviceInfo {
            flags: le32(&body, 4),
            num_regions: le32(&body, 8),
            num_irqs: le32(&body, 12),
        })
    }

    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() < REGION_INFO_SIZE || (le32(buf, 0) as usize) > buf.len() {
            return Err(errno(libc::EINVAL));
        }
        let index = le32(buf, 8);
        let body = self.request(Command::DeviceGetRegionInfo, &buf[..REGION_INFO_SIZE])?;
        if body.len() < REGION_INFO_SIZE {
            return Err(truncated(
                Command::DeviceGetRegionInfo,
                "vfio_region_info",
                body.len(),
                REGION_INFO_SIZE,
            ));
        }
        if body.len() > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {} bytes of reply for a {}-byte argsz",
                    Command::DeviceGetRegionInfo,
                    body.len(),
                    buf.len()
                ),
            ));
        }
        if le32(&body, 8) != index {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: asked for region {index}, the reply is for region {}",
                    Command::DeviceGetRegionInfo,
                    le32(&body, 8)
                ),
            ));
        }
        buf[..body.len()].copy_from_slice(&body);
        buf[24..32].copy_from_slice(&(u64::from(index) << REGION_SHIFT).to_le_bytes());
        Ok(())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (index, off) = split_offset(offset)?;
        self.region_read(index, off, buf)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let (index, off) = split_offset(offset)?;
        let count = buf.len().min(self.xfer);
        let payload = Payload::default()
            .u64(off)
            .u32(index)
            .u32(count as u32)
            .bytes(&buf[..count]);
        let body = self.request(Command::RegionWrite, &payload.0)?;
        if body.len() < 16 {
            return Err(truncated(
                Command::RegionWrite,
                "the access header",
                body.len(),
                16,
            ));
        }
        let done = le32(&body, 12) as usize;
        if done > count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: reply claims {done} bytes written of {count}",
                    Command::RegionWrite
                ),
            ));
        }
        Ok(done)
    }

    fn mmap(&self, _offset: u64, _len: usize, _writable: bool) -> io::Result<Mapping> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "vfio-user: mapping region areas is not implemented",
        ))
    }

    fn reset(&self) -> io::Result<()> {
        self.request(Command::DeviceReset, &[])?;
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        self.feature(VFIO_DEVICE_FEATURE_PROBE | access | feature, &[], 0)
            .map(drop)
    }

    fn migration_flags(&self) -> io::Result<u64> {
        let data = self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
            &[],
            8,
        )?;
        Ok(le64(&data, 0))
    }

    fn mig_state(&self) -> io::Result<u32> {
        let data = self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &[],
            8,
        )?;
        let state = le32(&data, 0);
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
        Ok(state)
    }

    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        let to = MigState::from_raw(state).ok_or_else(|| errno(libc::EINVAL))?;
        let cached = *self.state.lock().unwrap_or_else(|p| p.into_inner());
        let from = match cached {
            Some(s) => s,
            None => self.mig_state()?,
        };
        // `data_fd` is unused by vfio-user (no fd crosses the socket for migration data).
        let payload = Payload::default().u32(state).u32(u32::MAX);
        let result = self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &payload.0,
            8,
        );
        let mut cache = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *cache = result.as_ref().ok().map(|_| state);
        result?;
        let opens = MigState::from_raw(from).is_some_and(|from| returns_data_fd(from, to));
        Ok(opens.then(DataSession::without_fd))
    }

    fn mig_data_size(&self) -> io::Result<u64> {
        if !self.data_size {
            return Err(errno(libc::ENOTTY));
        }
        let data = self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            &[],
            8,
        )?;
        Ok(le64(&data, 0))
    }

    fn precopy_info(&self, _session: &DataSession) -> io::Result<vfio_precopy_info> {
        // The protocol has no VFIO_MIG_GET_PRECOPY_INFO.
        Err(errno(libc::ENOTTY))
    }

    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        let mut payload = Payload::default()
            .u64(page_size)
            .u32(u32::try_from(ranges.len()).map_err(|_| errno(libc::E2BIG))?)
            .u32(0);
        for r in ranges {
            payload = payload.u64(r.iova).u64(r.length);
        }
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            &payload.0,
            0,
        )?;
        // vfio-user's control carries no answer: the server logs at the page size asked.
        Ok(page_size)
    }

    fn dma_logging_stop(&self) -> io::Result<()> {
        self.feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            &[],
            0,
        )
        .map(drop)
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        check_dma_bitmap(length, page_size, bitmap.len())?;
        let words = dma_bitmap_words(length, page_size).ok_or_else(|| errno(libc::EINVAL))?;
        let bytes = usize::try_from(words * 8).map_err(|_| errno(libc::E2BIG))?;
        if bytes > self.xfer {
            return Err(errno(libc::E2BIG));
        }
        let payload = Payload::default().u64(iova).u64(length).u64(page_size);
        let data = self.feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            &payload.0,
            24 + bytes,
        )?;
        for (word, chunk) in bitmap.iter_mut().zip(data[24..24 + bytes].chunks_exact(8)) {
            *word |= le64(chunk, 0);
        }
        Ok(())
    }

    fn read_data(&self, _session: &DataSession, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf.len().min(self.xfer);
        let payload = Payload::default().u32((8 + len) as u32).u32(len as u32);
        let body = self.request(Command::MigDataRead, &payload.0)?;
        read_reply(Command::MigDataRead, &body, 8, 4, buf, len)
    }

    fn write_data(&self, _session: &DataSession, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(self.xfer);
        let payload = Payload::default()
            .u32((8 + len) as u32)
            .u32(len as u32)
            .bytes(&buf[..len]);
        self.request(Command::MigDataWrite, &payload.0)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(size: u32, data: &[u8]) -> Vec<u8> {
        Payload::default().u32(8 + size).u32(size).bytes(data).0
    }

    #[test]
    fn a_read_reply_may_not_claim_more_than_asked_or_carried() {
        let mut buf = [0u8; 8];
        assert_eq!(
            read_reply(Command::MigDataRead, &reply(3, b"abc"), 8, 4, &mut buf, 8).unwrap(),
            3
        );
        assert_eq!(&buf[..3], b"abc");
        // libvfio-user pads a short read's reply to the size asked: the count decides.
        assert_eq!(
            read_reply(
                Command::MigDataRead,
                &reply(2, b"xy\0\0"),
                8,
                4,
                &mut buf,
                4
            )
            .unwrap(),
            2
        );
        for (body, asked, want) in [
            (
                reply(9, &[0; 9]),
                8,
                "claims 9 bytes (9 carried) for a read of 8",
            ),
            (reply(5, b"abc"), 8, "claims 5 bytes (3 carried)"),
            (vec![0; 6], 8, "truncated reply: 6 bytes, 8 needed"),
        ] {
            let e = read_reply(Command::MigDataRead, &body, 8, 4, &mut buf, asked).unwrap_err();
            assert!(e.to_string().contains(want), "{e}");
            assert!(e.to_string().starts_with("VFIO_USER_MIG_DATA_READ"), "{e}");
        }
    }

    #[test]
    fn offsets_split_into_region_and_offset() {
        assert_eq!(split_offset((7u64 << 40) + 0x10).unwrap(), (7, 0x10));
        assert_eq!(split_offset(0x123).unwrap(), (0, 0x123));
    }
}
