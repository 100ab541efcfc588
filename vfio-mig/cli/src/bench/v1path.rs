// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 2: the v1 data section. The engine saving a v1 device (driver, stream framing, a
//! CRC32C per record, into `/dev/null`) against the machine's raw access to the same region:
//! `pread` of the trapped section, `memcpy` out of the mmapped one.
//!
//! Two kinds of device:
//! - [`StaticV1`], a v1 migration region whose data section is filled once: staging a chunk
//!   costs nothing, so the figure is the engine's data path alone against raw pread / memcpy of
//!   the very same section (cache-resident at 1 MiB, memory-bound at 64 MiB);
//! - `mock:v1` (which generates, checksums and writes every chunk into its section when it
//!   stages it, as a vendor driver would assemble its state): the engine against the raw v1
//!   sequence (`pending_bytes`, `data_offset`, `data_size`, then pread or memcpy of the data)
//!   with no stream, so the device's costs are in both.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::memfd::{memfd_create, MFdFlags};
use vfio_bindings::bindings::vfio::{
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED, VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};

use vfio_mig::backend::MigrationRegion;
use vfio_mig::backend::V1Device;
use vfio_mig::error::{Error, Result};
use vfio_mig::{
    backend::DeviceIdentity, backend::DeviceInfo, backend::DeviceIo, backend::Mapping,
    backend::RegionCap, backend::RegionInfo, backend::SparseArea,
};
use vfio_mig::{MigrationDevice, NoObserver, ReadOutcome};
use vfio_mig_mock::spec::format_size;
use vfio_mig_mock::MockSpec;

use super::io::{gbps, SinkKind};
use super::report::{Figure, Target};
use super::stats::{run_rotating, Paired};
use super::v2path::summary;
use super::Config;

/// Device-fd offset of the static region (as vfio-pci's region 10).
const REGION_OFFSET: u64 = 10 << 40;
/// Region offset of the data section (page aligned, so it can be mmapped).
const SECTION_OFFSET: u64 = 4096;

#[derive(Debug)]
struct StaticState {
    state: u32,
    remaining: u64,
    staged: Option<u64>,
}

/// A v1 device whose data section (a memfd) is filled once and served again and again: it
/// answers the v1 saving sequence for `total` bytes in chunks of the section's size, with no
/// cost of its own beyond a lock and the access itself.
#[derive(Debug)]
pub struct StaticV1 {
    memfd: OwnedFd,
    section: u64,
    total: u64,
    st: Mutex<StaticState>,
}

fn einval(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

impl StaticV1 {
    /// A device of `total` bytes of state with a `section`-byte data section.
    pub fn new(section: u64, total: u64) -> io::Result<Self> {
        let memfd = memfd_create("vfio-mig-bench-v1", MFdFlags::MFD_CLOEXEC)?;
        nix::unistd::ftruncate(&memfd, section as i64)?;
        let mut chunk = vec![0u8; 1 << 20];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut off = 0;
        while off < section {
            let n = (section - off).min(chunk.len() as u64) as usize;
            nix::sys::uio::pwrite(&memfd, &chunk[..n], off as i64)?;
            off += n as u64;
        }
        Ok(Self {
            memfd,
            section,
            total,
            st: Mutex::new(StaticState {
                state: 1,
                remaining: 0,
                staged: None,
            }),
        })
    }

    /// The region's information: trapped (pread only) or with its section mmappable.
    pub fn region_info(&self, mmap: bool) -> RegionInfo {
        let mut caps = vec![RegionCap::Type {
            region_type: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
            subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
        }];
        let mut flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if mmap {
            flags |= VFIO_REGION_INFO_FLAG_MMAP;
            caps.push(RegionCap::SparseMmap(vec![SparseArea {
                offset: SECTION_OFFSET,
                size: self.section,
            }]));
        }
        RegionInfo {
            index: 10,
            flags,
            size: SECTION_OFFSET + self.section,
            offset: REGION_OFFSET,
            caps,
        }
    }

    fn pread_section(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if off + buf.len() as u64 > self.section {
            return Err(einval("outside the data section"));
        }
        let mut done = 0;
        while done < buf.len() {
            let n =
                nix::sys::uio::pread(&self.memfd, &mut buf[done..], (off + done as u64) as i64)?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            done += n;
        }
        Ok(done)
    }
}

impl DeviceIo for StaticV1 {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: "bench:v1-static".into(),
            instance: format!("bench:v1-static,section={}", format_size(self.section)),
        }
    }
    fn device_info(&self) -> io::Result<DeviceInfo> {
        Err(einval("not queried"))
    }
    fn region_info_raw(&self, _buf: &mut [u8]) -> io::Result<()> {
        Err(einval("not queried"))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let rel = offset
            .checked_sub(REGION_OFFSET)
            .ok_or_else(|| einval("not the migration region"))?;
        if rel >= SECTION_OFFSET {
            return self.pread_section(buf, rel - SECTION_OFFSET);
        }
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        match (rel, buf.len()) {
            (0, 4) => buf.copy_from_slice(&st.state.to_ne_bytes()),
            (8, 8) => {
                if let Some(n) = st.staged.take() {
                    st.remaining -= n;
                }
                buf.copy_from_slice(&st.remaining.to_ne_bytes());
            }
            (16, 8) => {
                if st.staged.is_none() {
                    if st.remaining == 0 {
                        return Err(einval("nothing pending"));
                    }
                    st.staged = Some(st.remaining.min(self.section));
                }
                buf.copy_from_slice(&SECTION_OFFSET.to_ne_bytes());
            }
            (24, 8) => {
                let n = st.staged.ok_or_else(|| einval("nothing staged"))?;
                buf.copy_from_slice(&n.to_ne_bytes());
            }
            _ => return Err(einval("bad field access")),
        }
        Ok(buf.len())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        if offset != REGION_OFFSET || buf.len() != 4 {
            return Err(einval("only device_state is writable"));
        }
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        let new = u32::from_ne_bytes(buf.try_into().expect("4 bytes"));
        // Entering a saving state (SAVING bit) starts a new save of `total` bytes.
        if new & 2 != 0 && st.state & 2 == 0 {
            st.remaining = self.total;
            st.staged = None;
        }
        st.state = new;
        Ok(4)
    }
    fn mmap(&self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        let rel = offset
            .checked_sub(REGION_OFFSET + SECTION_OFFSET)
            .ok_or_else(|| einval("mmap outside the data section"))?;
        if rel
            .checked_add(len as u64)
            .is_none_or(|end| end > self.section)
        {
            return Err(einval("mmap beyond the data section"));
        }
        // SAFETY: the mapping lies inside the memfd, which is `section` bytes for the device's
        // life and otherwise only accessed with pread and pwrite.
        unsafe { Mapping::new(&self.memfd, rel, len, writable) }
    }
    fn reset(&self) -> io::Result<()> {
        let mut st = self.st.lock().unwrap_or_else(|e| e.into_inner());
        *st = StaticState {
            state: 1,
            remaining: 0,
            staged: None,
        };
        Ok(())
    }
}

/// A v1 device over a [`StaticV1`], trapped or mmapped.
pub fn static_device(section: u64, total: u64, mmap: bool) -> Result<(V1Device, Arc<StaticV1>)> {
    let dev = Arc::new(StaticV1::new(section, total).map_err(|e| Error::device("bench v1", e))?);
    let info = dev.region_info(mmap);
    let region = MigrationRegion::open(dev.clone(), info)?;
    if mmap && !region.is_mapped(SECTION_OFFSET, section) {
        return Err(Error::InvalidInput(
            "bench v1: the data section did not map".into(),
        ));
    }
    Ok((V1Device::with_region(region), dev))
}

/// Saves `dev` through the front door into `/dev/null`; GB/s of device data.
fn engine_run(dev: &mut V1Device, buffer: usize) -> Result<f64> {
    let mut sink = SinkKind::Null.open()?;
    let t = Instant::now();
    let (_, r) = super::front::save(vec![&mut *dev], &mut sink.conn, buffer, None, &NoObserver)
        .map_err(|e| Error::protocol("bench: save through the front door", e.to_string()))?;
    let g = gbps(r[0].stop_copy_bytes, t);
    sink.finish()?;
    dev.run()?;
    Ok(g)
}

/// The raw v1 sequence through the driver, no stream: pending_bytes, data_offset,
/// data_size, then the data (pread or memcpy) into the buffer, until pending is 0.
fn raw_sequence_run(dev: &mut V1Device, buffer: usize) -> Result<f64> {
    let mut buf = vec![0u8; buffer];
    let t = Instant::now();
    dev.start_stop_copy()?;
    let mut total = 0u64;
    while let ReadOutcome::Data { len, .. } = dev.read(&mut buf)? {
        total += len as u64;
    }
    let g = gbps(total, t);
    dev.finish_save()?;
    dev.run()?;
    Ok(g)
}

/// Raw pread of the static section, `total` bytes in `buffer` pieces, cycling over it.
fn pread_run(dev: &StaticV1, total: u64, buffer: usize) -> Result<f64> {
    let mut buf = vec![0u8; buffer];
    let t = Instant::now();
    let mut done = 0u64;
    let mut off = 0u64;
    while done < total {
        let n = (buffer as u64).min(dev.section - off).min(total - done) as usize;
        dev.read_at(&mut buf[..n], REGION_OFFSET + SECTION_OFFSET + off)
            .map_err(|e| Error::device("bench pread", e))?;
        done += n as u64;
        off = (off + n as u64) % dev.section;
    }
    Ok(gbps(total, t))
}

/// memcpy out of a mapping of the static section, `total` bytes in `buffer` pieces.
fn memcpy_run(map: &Mapping, section: u64, total: u64, buffer: usize) -> Result<f64> {
    let mut buf = vec![0u8; buffer];
    let t = Instant::now();
    let mut done = 0u64;
    let mut off = 0u64;
    while done < total {
        let n = (buffer as u64).min(section - off).min(total - done) as usize;
        map.read(off as usize, &mut buf[..n])
            .map_err(|e| Error::device("bench memcpy", e))?;
        done += n as u64;
        off = (off + n as u64) % section;
    }
    std::hint::black_box(&buf);
    Ok(gbps(total, t))
}

/// Measures the v1 figures.
pub fn figures(cfg: &Config) -> Result<Vec<Figure>> {
    let mut out = Vec::new();
    let total = cfg.size;
    for section in [1u64 << 20, 64 << 20] {
        let sec = format_size(section);
        for mmap in [false, true] {
            let (mut dev, raw) = static_device(section, total, mmap)?;
            let map = raw
                .mmap(REGION_OFFSET + SECTION_OFFSET, section as usize, false)
                .map_err(|e| Error::device("bench mmap", e))?;
            let mut base = || {
                if mmap {
                    memcpy_run(&map, section, total, cfg.buffer)
                } else {
                    pread_run(&raw, total, cfg.buffer)
                }
            };
            let mut engine = || engine_run(&mut dev, cfg.buffer);
            let series = run_rotating(cfg.reps, cfg.warmup, &mut [&mut base, &mut engine])?;
            let how = if mmap { "mmap" } else { "trapped" };
            let f = Figure::from_paired(
                format!("v1.static{sec}.{how}.engine"),
                2,
                "v1 data section, no device cost (static section)",
                "engine -> /dev/null",
                if mmap {
                    format!("memcpy from the mapping, {} KiB pieces", cfg.buffer >> 10)
                } else {
                    format!("raw pread of the section, {} KiB pieces", cfg.buffer >> 10)
                },
                "GB/s",
                &Paired::from_series(&series, 0, 1),
                false,
                Some(Target::at_least(0.9)),
            )
            .note(format!(
                "{} of state from a {sec} data section ({}); the engine copies into its buffer and \
                 computes a CRC32C over every byte, the baseline only copies",
                format_size(total),
                if section <= 2 << 20 {
                    "cache-resident"
                } else {
                    "memory-bound"
                }
            ));
            eprintln!("bench: {}", summary(&f));
            out.push(f);
        }
    }
    for mmap in [false, true] {
        let how = if mmap { "mmap" } else { "trapped" };
        let spec: MockSpec = format!(
            "mock:v1,size={},seed=5{}",
            format_size(total),
            if mmap { "" } else { ",data=trapped" }
        )
        .parse()?;
        let (io, _handle) = vfio_mig_mock::open(&spec).map_err(|e| Error::device("mock", e))?;
        let mut dev = V1Device::open(io)?;
        let mut base = || raw_sequence_run(&mut dev, cfg.buffer);
        let series = {
            let spec2 = spec.clone();
            let (io2, _h2) = vfio_mig_mock::open(&spec2).map_err(|e| Error::device("mock", e))?;
            let mut dev2 = V1Device::open(io2)?;
            let mut engine = || engine_run(&mut dev2, cfg.buffer);
            run_rotating(cfg.reps, cfg.warmup, &mut [&mut base, &mut engine])?
        };
        let f = Figure::from_paired(
            format!("v1.mock.{how}.engine"),
            2,
            "v1 data section, mock:v1 (device staging cost in both)",
            "engine -> /dev/null",
            format!(
                "raw v1 sequence ({}), no stream",
                if mmap { "memcpy" } else { "pread" }
            ),
            "GB/s",
            &Paired::from_series(&series, 0, 1),
            false,
            Some(Target::at_least(0.9)),
        )
        .note(format!(
            "{} of mock:v1 state in 1 MiB transactions; the mock generates, checksums and writes \
             each transaction into its section when it is staged",
            format_size(total)
        ));
        eprintln!("bench: {}", summary(&f));
        out.push(f);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The static device answers the v1 sequence: the engine's stream verifies and carries
    /// exactly `total` bytes, trapped and mmapped.
    #[test]
    fn static_device_serves_its_total_through_the_engine() {
        for mmap in [false, true] {
            let (mut dev, _raw) = static_device(64 << 10, 300 << 10, mmap).unwrap();
            let mut bytes = Vec::new();
            let (_, r) =
                super::super::front::save(vec![&mut dev], &mut bytes, 1 << 20, None, &NoObserver)
                    .unwrap();
            assert_eq!(r[0].stop_copy_bytes, 300 << 10);
            assert_eq!(r[0].chunks, 5);
            let s = vfio_mig::wire::verify(bytes.as_slice()).unwrap();
            assert_eq!(s.totals.devices[0].stop_copy_bytes, 300 << 10);
            dev.run().unwrap();
            // A second save serves it all again.
            assert!(raw_sequence_run(&mut dev, 16 << 10).unwrap() > 0.0);
        }
    }
}
