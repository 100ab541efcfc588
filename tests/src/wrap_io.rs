// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`Wrapped`](crate::wrap::Wrapped)'s counterpart one layer down: [`WrappedIo`] forwards
//! each [`DeviceIo`] method (the operations of a VFIO device fd) to the device access it
//! wraps and lets its [`IoHooks`] see every call, with its offsets and bytes, before and
//! after (a hook may fail a call before it reaches the device). A test that watches the
//! protocol driver's register accesses (the v1 arbiter's recorder) writes only what it adds.

use std::io;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::vfio_precopy_info;
use vfio_mig::backend::{
    DataSession, DeviceIdentity, DeviceInfo, DeviceIo, DmaLoggingRange, Mapping,
};

/// A call of [`DeviceIo`], as [`IoHooks`] see it (the queries that cannot fail,
/// `identity`, are not hooked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCall<'a> {
    /// `device_info`.
    DeviceInfo,
    /// `region_info_raw`.
    RegionInfo,
    /// `read_at` of `len` bytes at device-fd offset `offset`.
    ReadAt {
        /// The offset.
        offset: u64,
        /// The bytes asked for.
        len: usize,
    },
    /// `write_at` of `data` at device-fd offset `offset`.
    WriteAt {
        /// The offset.
        offset: u64,
        /// The bytes written.
        data: &'a [u8],
    },
    /// `mmap`.
    Mmap,
    /// `reset`.
    Reset,
    /// `probe_feature`.
    ProbeFeature,
    /// `migration_flags`.
    MigrationFlags,
    /// `mig_state`.
    MigState,
    /// `set_mig_state` to this raw state.
    SetMigState(u32),
    /// `mig_data_size`.
    MigDataSize,
    /// `enable_precopy_info_v2`.
    EnablePrecopyInfoV2,
    /// `precopy_info`.
    PrecopyInfo,
    /// `dma_logging_start`.
    DmaLoggingStart,
    /// `dma_logging_stop`.
    DmaLoggingStop,
    /// `dma_logging_report`.
    DmaLoggingReport,
    /// `read_data` of `len` bytes.
    ReadData {
        /// The bytes asked for.
        len: usize,
    },
    /// `write_data` of these bytes.
    WriteData {
        /// The bytes written.
        data: &'a [u8],
    },
}

/// What a test adds to a device access's calls; every method does nothing by default. The
/// device access is shared (`&self`), so hooks that record keep their state behind a lock.
pub trait IoHooks: Send + Sync {
    /// Before `call` reaches the device; an error fails the call there.
    fn before(&self, _call: &IoCall<'_>) -> io::Result<()> {
        Ok(())
    }
    /// After `call` returned; `ok` is false when it failed.
    fn after(&self, _call: &IoCall<'_>, _ok: bool) {}
}

/// A device access whose calls its [`IoHooks`] see.
pub struct WrappedIo<H> {
    /// The wrapped device access.
    pub inner: Arc<dyn DeviceIo>,
    /// What the test adds.
    pub hooks: H,
}

impl<H> WrappedIo<H> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn DeviceIo>, hooks: H) -> Self {
        Self { inner, hooks }
    }
}

impl<H> std::fmt::Debug for WrappedIo<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedIo")
            .field("inner", &self.inner.identity().instance)
            .finish_non_exhaustive()
    }
}

impl<H: IoHooks> WrappedIo<H> {
    /// `call` through the hooks: `before` (whose error fails it), the call, `after` (told
    /// whether it succeeded).
    fn hooked<T>(
        &self,
        call: IoCall<'_>,
        f: impl FnOnce(&dyn DeviceIo) -> io::Result<T>,
    ) -> io::Result<T> {
        self.hooks.before(&call)?;
        let r = f(self.inner.as_ref());
        self.hooks.after(&call, r.is_ok());
        r
    }
}

impl<H: IoHooks> DeviceIo for WrappedIo<H> {
    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }
    fn device_info(&self) -> io::Result<DeviceInfo> {
        self.hooked(IoCall::DeviceInfo, |d| d.device_info())
    }
    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()> {
        self.hooked(IoCall::RegionInfo, |d| d.region_info_raw(buf))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let call = IoCall::ReadAt {
            offset,
            len: buf.len(),
        };
        self.hooked(call, |d| d.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let call = IoCall::WriteAt { offset, data: buf };
        self.hooked(call, |d| d.write_at(buf, offset))
    }
    fn mmap(&self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        self.hooked(IoCall::Mmap, |d| d.mmap(offset, len, writable))
    }
    fn reset(&self) -> io::Result<()> {
        self.hooked(IoCall::Reset, |d| d.reset())
    }
    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        self.hooked(IoCall::ProbeFeature, |d| d.probe_feature(feature, access))
    }
    fn migration_flags(&self) -> io::Result<u64> {
        self.hooked(IoCall::MigrationFlags, |d| d.migration_flags())
    }
    fn mig_state(&self) -> io::Result<u32> {
        self.hooked(IoCall::MigState, |d| d.mig_state())
    }
    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        self.hooked(IoCall::SetMigState(state), |d| d.set_mig_state(state))
    }
    fn mig_data_size(&self) -> io::Result<u64> {
        self.hooked(IoCall::MigDataSize, |d| d.mig_data_size())
    }
    fn enable_precopy_info_v2(&self) -> io::Result<()> {
        self.hooked(IoCall::EnablePrecopyInfoV2, |d| d.enable_precopy_info_v2())
    }
    fn precopy_info(&self, session: &DataSession) -> io::Result<vfio_precopy_info> {
        self.hooked(IoCall::PrecopyInfo, |d| d.precopy_info(session))
    }
    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        self.hooked(IoCall::DmaLoggingStart, |d| {
            d.dma_logging_start(ranges, page_size)
        })
    }
    fn dma_logging_stop(&self) -> io::Result<()> {
        self.hooked(IoCall::DmaLoggingStop, |d| d.dma_logging_stop())
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        self.hooked(IoCall::DmaLoggingReport, |d| {
            d.dma_logging_report(iova, length, page_size, bitmap)
        })
    }
    fn read_data(&self, session: &DataSession, buf: &mut [u8]) -> io::Result<usize> {
        let call = IoCall::ReadData { len: buf.len() };
        self.hooked(call, |d| d.read_data(session, buf))
    }
    fn write_data(&self, session: &DataSession, buf: &[u8]) -> io::Result<usize> {
        let call = IoCall::WriteData { data: buf };
        self.hooked(call, |d| d.write_data(session, buf))
    }
}
