// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v1 protocol against a real kernel: our sample mediated device `mig_v1_sample`
//! (kmod/mig-v1-sample, docs/v1-sample-module.md), whose devices expose a v1 migration region.
//!
//! The guest's `/init` loads the module after mtty and creates mdevs of both its types:
//! - `VFIO_MIG_V1_TRAPPED`: `mig-v1-trapped` devices (data section served by pread/pwrite only,
//!   at a region offset that is not page aligned, transactions alternating between two offsets);
//! - `VFIO_MIG_V1_MMAP`: `mig-v1-mmap` devices (data section with a sparse-mmap capability);
//! - `VFIO_MIG_V1_DEVICES`: all of them.
//!
//! A device's state is `state_size` bytes behind BAR1 (region 1), which the tests write on the
//! source and read back on the destination; BAR0 (region 0) holds the module's control and
//! statistics registers. Raw tests drive the migration region field by field through the
//! library's real-device backend ([`VfioDeviceIo`]) to check the module's uAPI semantics; the
//! others run `vfio-mig` itself.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use vfio_mig::backend::find_migration_region;
use vfio_mig::backend::query_region;
use vfio_mig::VfioDeviceIo;
use vfio_mig::{backend::v1_state::V1State, backend::V1Device};
use vfio_mig::{backend::DeviceIo, backend::RegionInfo};
use vfio_mig::{MigrationDevice, Recovery};
use vfio_mig_tests::rewrite_stream;

use super::migration::vfio_mig;
use super::mtty::{iommu_group, mdev_type};

/// `mig-v1-trapped` devices.
const TRAPPED_ENV: &str = "VFIO_MIG_V1_TRAPPED";
/// `mig-v1-mmap` devices.
const MMAP_ENV: &str = "VFIO_MIG_V1_MMAP";

/// The migration region's index: the first device-specific one (`VFIO_PCI_NUM_REGIONS`).
const MIG_REGION: u32 = 9;
/// BAR0: registers. BAR1: the device's state. Config space.
const REGS_REGION: u32 = 0;
const MEM_REGION: u32 = 1;
const CONFIG_REGION: u32 = 7;

/// Reserved bits 3-31 the module keeps set in `device_state`.
const RESERVED: u32 = 0x8000_0108;
const RUNNING: u32 = 0b001;
const SAVING: u32 = 0b010;
const RESUMING: u32 = 0b100;
const ERROR_BITS: u32 = 0b110;

/// The module's state page and stream framing.
const PAGE: usize = 4096;
const TX_HDR: u64 = 16;
const HDR_REC: u64 = 24;
const PAGE_REC: u64 = 8 + PAGE as u64;
const END_REC: u64 = 16;
/// Region offsets of the data section, and the trapped type's alternation.
const MMAP_DATA: u64 = 4096;
const TRAPPED_DATA: u64 = 64;
const TRAPPED_SHIFT: u64 = 64;

/// BAR0 register offsets (docs/v1-sample-module.md).
mod reg {
    pub const ID: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const STATE_SIZE: u64 = 0x008;
    pub const CHUNK_SIZE: u64 = 0x00c;
    pub const PAGE_SIZE: u64 = 0x010;
    pub const FLAGS: u64 = 0x014;
    pub const DEVICE_STATE: u64 = 0x018;
    pub const DIRTY_RATE: u64 = 0x020;
    pub const DIRTY_PERIOD: u64 = 0x024;
    pub const FORCE_ERROR: u64 = 0x028;
    pub const FAIL_NEXT: u64 = 0x02c;
    pub const DIRTY_PER_ITER: u64 = 0x030;
    pub const SAVE_PASSES: u64 = 0x040;
    pub const SAVE_PAGES: u64 = 0x044;
    pub const SAVE_TXS: u64 = 0x048;
    pub const SAVE_DIRTIED: u64 = 0x04c;
    pub const LOAD_TXS: u64 = 0x050;
    pub const LOAD_PAGES: u64 = 0x054;
    pub const LAST_REFUSAL: u64 = 0x05c;
    pub const RESETS: u64 = 0x060;
    pub const SAVES_DONE: u64 = 0x064;
    pub const RESUMES_DONE: u64 = 0x068;
}

/// `LAST_REFUSAL` codes.
mod refusal {
    pub const ACCESS: u32 = 1;
    pub const WRONG_STATE: u32 = 2;
    pub const RESERVED_BITS: u32 = 3;
    pub const NOT_REQUESTABLE: u32 = 4;
    pub const NO_ARC: u32 = 5;
    pub const IN_ERROR: u32 = 6;
    pub const DATA_PENDING: u32 = 7;
    pub const NOTHING_PENDING: u32 = 8;
    pub const NOT_STAGED: u32 = 9;
    pub const OUTSIDE_STAGED: u32 = 10;
    pub const SIZE_RANGE: u32 = 11;
    pub const TX_SEQ: u32 = 13;
    pub const TX_SIZE: u32 = 14;
    pub const TX_CRC: u32 = 15;
    pub const INCOMPLETE: u32 = 17;
    pub const READ_ONLY: u32 = 18;
}

/// `FAIL_NEXT` values.
const FAIL_STATE_WRITE: u32 = 1;
const FAIL_PENDING_READ: u32 = 2;
const FAIL_DATA_OFFSET_READ: u32 = 3;
const FAIL_DATA_SIZE_READ: u32 = 4;
const FAIL_DATA_SIZE_WRITE: u32 = 5;

fn devices(var: &str) -> Vec<PathBuf> {
    let value = std::env::var(var).unwrap_or_default();
    let devices: Vec<PathBuf> = value.split_whitespace().map(PathBuf::from).collect();
    assert!(
        devices.len() >= 2,
        "{var} must list at least two mig_v1_sample mdevs (got {value:?}): these tests run only \
         inside the QEMU guest of scripts/guest/run.sh (see docs/v1-sample-module.md)"
    );
    devices
}

fn trapped() -> Vec<PathBuf> {
    devices(TRAPPED_ENV)
}

fn mmapped() -> Vec<PathBuf> {
    devices(MMAP_ENV)
}

fn code<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

/// Bytes derived from `seed`, different on every page.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i / PAGE) as u8).wrapping_mul(7) ^ seed)
        .collect()
}

/// A sample device opened through the library's real-device backend, for raw accesses.
struct Sample {
    io: Arc<VfioDeviceIo>,
    mig: RegionInfo,
    regs: u64,
    mem: u64,
    state_size: usize,
    chunk: u64,
}

impl Sample {
    fn open(path: &Path) -> Self {
        let io = Arc::new(
            VfioDeviceIo::open_with(path, vfio_mig_tests::test_backend())
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        );
        let mig = query_region(io.as_ref(), MIG_REGION).expect("region 9");
        let regs = query_region(io.as_ref(), REGS_REGION).expect("BAR0").offset;
        let mem_info = query_region(io.as_ref(), MEM_REGION).expect("BAR1");
        let mut s = Sample {
            io,
            mig,
            regs,
            mem: mem_info.offset,
            state_size: mem_info.size as usize,
            chunk: 0,
        };
        s.chunk = u64::from(s.reg(reg::CHUNK_SIZE));
        assert_eq!(s.reg(reg::STATE_SIZE) as usize, s.state_size);
        s
    }

    fn dyn_io(&self) -> Arc<dyn DeviceIo> {
        self.io.clone()
    }

    fn reg(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        assert_eq!(self.io.read_at(&mut b, self.regs + off).unwrap(), 4);
        u32::from_ne_bytes(b)
    }

    fn set_reg(&self, off: u64, v: u32) {
        assert_eq!(
            self.io.write_at(&v.to_ne_bytes(), self.regs + off).unwrap(),
            4
        );
    }

    fn read_mem(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.state_size];
        assert_eq!(self.io.read_at(&mut v, self.mem).unwrap(), v.len());
        v
    }

    fn write_mem(&self, off: u64, data: &[u8]) -> io::Result<usize> {
        self.io.write_at(data, self.mem + off)
    }

    fn mig_read(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        let n = self.io.read_at(&mut v, self.mig.offset + off)?;
        assert_eq!(n, len, "short read");
        Ok(v)
    }

    fn mig_write(&self, off: u64, data: &[u8]) -> io::Result<()> {
        let n = self.io.write_at(data, self.mig.offset + off)?;
        assert_eq!(n, data.len(), "short write");
        Ok(())
    }

    fn raw_state(&self) -> u32 {
        u32::from_ne_bytes(self.mig_read(0, 4).unwrap().try_into().unwrap())
    }

    fn write_state(&self, v: u32) -> io::Result<()> {
        self.mig_write(0, &v.to_ne_bytes())
    }

    /// Read-modify-write of the low three bits, as the uAPI asks.
    fn set(&self, bits: u32) -> io::Result<()> {
        self.write_state((self.raw_state() & !7) | bits)
    }

    fn r64(&self, off: u64) -> io::Result<u64> {
        Ok(u64::from_ne_bytes(
            self.mig_read(off, 8)?.try_into().unwrap(),
        ))
    }

    fn pending(&self) -> io::Result<u64> {
        self.r64(8)
    }

    fn data_offset(&self) -> io::Result<u64> {
        self.r64(16)
    }

    fn data_size(&self) -> io::Result<u64> {
        self.r64(24)
    }

    fn set_data_size(&self, v: u64) -> io::Result<()> {
        self.mig_write(24, &v.to_ne_bytes())
    }

    fn refusal(&self) -> u32 {
        self.reg(reg::LAST_REFUSAL)
    }

    /// One saving iteration by pread: stage, size, read (consumed by the next pending read).
    fn next_tx(&self) -> Vec<u8> {
        let off = self.data_offset().unwrap();
        let size = self.data_size().unwrap();
        self.mig_read(off, size as usize).unwrap()
    }

    /// A whole stop-and-copy save by raw accesses, ending in STOP.
    fn save_all(&self) -> Vec<Vec<u8>> {
        self.set(SAVING).unwrap();
        let mut txs = Vec::new();
        while self.pending().unwrap() > 0 {
            txs.push(self.next_tx());
        }
        self.set(0).unwrap();
        txs
    }

    /// pending_bytes at the start of a save: the module's stream in transactions of `chunk`.
    fn expected_initial_pending(&self, final_: bool) -> u64 {
        let pages = (self.state_size / PAGE) as u64;
        let stream = HDR_REC + pages * PAGE_REC + if final_ { END_REC } else { 0 };
        stream + stream.div_ceil(self.chunk - TX_HDR) * TX_HDR
    }
}

/// Brings a device back to a clean RUNNING state with no debug knobs set (a reset when it is
/// not running), keeping its state window.
fn ensure_running(dev: &Path) {
    let s = Sample::open(dev);
    if s.raw_state() & 7 != RUNNING {
        s.io.reset().unwrap();
    }
    s.set_reg(reg::DIRTY_RATE, 0);
    s.set_reg(reg::DIRTY_PER_ITER, 0);
    s.set_reg(reg::FAIL_NEXT, 0);
    assert_eq!(s.raw_state(), RESERVED | RUNNING);
}

fn write_state(dev: &Path, seed: u8) -> Vec<u8> {
    let s = Sample::open(dev);
    let data = pattern(seed, s.state_size);
    assert_eq!(s.write_mem(0, &data).unwrap(), data.len());
    data
}

fn read_state(dev: &Path) -> Vec<u8> {
    Sample::open(dev).read_mem()
}

fn state_bits(dev: &Path) -> u32 {
    Sample::open(dev).raw_state()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "vfio-mig failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A failure: non-zero exit, one `error:` line containing every `expect`, no panic.
fn clean_failure(out: &Output, expect: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    for e in expect {
        assert!(lines[0].contains(e), "expected {e:?} in {err}");
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn model(dev: &Path) -> String {
    format!("mdev:{}", mdev_type(dev).unwrap())
}

#[test]
fn devices_are_v1_sample_mdevs_with_their_own_groups() {
    let mut groups = Vec::new();
    for (devs, ty) in [(trapped(), "mig-v1-trapped"), (mmapped(), "mig-v1-mmap")] {
        for dev in devs {
            assert_eq!(mdev_type(&dev).unwrap(), ty, "{}", dev.display());
            let api = std::fs::read_to_string(dev.join("mdev_type/device_api")).unwrap();
            assert_eq!(api.trim(), "vfio-pci");
            let group = iommu_group(&dev).unwrap();
            assert!(Path::new(&format!("/dev/vfio/{group}")).exists());
            groups.push(group);
        }
    }
    let n = groups.len();
    groups.sort_unstable();
    groups.dedup();
    assert_eq!(groups.len(), n, "devices share IOMMU groups");
    let size = std::fs::read_to_string("/sys/module/mig_v1_sample/parameters/state_size").unwrap();
    assert!(size.trim().parse::<usize>().unwrap() >= 4096);
}

#[test]
fn probe_finds_region_9_of_type_3_1_and_the_sparse_mmap() {
    for dev in [&trapped()[0], &mmapped()[0]] {
        ensure_running(dev);
        let mmap = mdev_type(dev).unwrap() == "mig-v1-mmap";
        let out = vfio_mig(&["probe", path_str(dev), "--json"]);
        ok(&out);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["protocol"], "v1 (migration region)", "{v}");
        assert_eq!(v["model"], model(dev).as_str());
        assert_eq!(v["state"], "RUNNING (001b)");
        assert_eq!(v["capabilities"]["pre_copy"], true);
        let details = v["details"].as_array().unwrap();
        let detail = |k: &str| {
            details
                .iter()
                .find(|d| d[0] == k)
                .unwrap_or_else(|| panic!("no {k} in {v}"))[1]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(detail("migration region"), "9");
        assert_eq!(
            detail("device_state"),
            format!("{:#010x} = RUNNING (001b)", RESERVED | RUNNING)
        );
        let s = Sample::open(dev);
        if mmap {
            assert_eq!(
                detail("data section"),
                format!("sparse mmap {MMAP_DATA:#x}+{:#x} mmapped", s.chunk)
            );
        } else {
            assert_eq!(detail("data section"), "trapped (pread/pwrite)");
        }
        let regions = v["regions"].as_array().unwrap();
        let indexes: Vec<u64> = regions
            .iter()
            .map(|r| r["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, [0, 1, 2, 3, 4, 5, 6, 7, 9], "VGA (8) is absent");

        // The same through the library's region code, and the raw capability chain.
        let found = find_migration_region(s.io.as_ref()).unwrap().unwrap();
        assert_eq!(found.index, MIG_REGION);
        assert_eq!(found.offset, 9 << 40);
        assert_eq!(found.region_type(), Some((3, 1)));
        assert_eq!(found.flags & 0x7, if mmap { 0x7 } else { 0x3 });
        let data = if mmap { MMAP_DATA } else { TRAPPED_DATA };
        let section = if mmap {
            s.chunk
        } else {
            s.chunk + TRAPPED_SHIFT
        };
        assert_eq!(found.size, data + section);
        match found.sparse_areas() {
            Some(areas) => {
                assert!(mmap, "sparse mmap on the trapped type");
                assert_eq!(areas.len(), 1);
                assert_eq!((areas[0].offset, areas[0].size), (MMAP_DATA, s.chunk));
            }
            None => assert!(!mmap, "no sparse mmap on the mmap type"),
        }
        let info = s.io.device_info().unwrap();
        assert_eq!(info.num_regions, 10);
        assert_eq!(info.flags & 0x3, 0x3, "PCI | RESET");
        assert_eq!(code(query_region(s.io.as_ref(), 8)), libc::EINVAL);
        assert_eq!(query_region(s.io.as_ref(), 2).unwrap().size, 0);
        // mmap outside the sparse area, or on the trapped type, is refused by the module.
        let base = found.offset;
        assert_eq!(code(s.io.mmap(base, 4096, true)), libc::EINVAL);
        assert_eq!(
            code(s.io.mmap(base + MMAP_DATA, 4096, true)) == 0,
            mmap,
            "mmap of the data section"
        );
    }
}

#[test]
fn registers_config_space_and_state_window() {
    let dev = &trapped()[1];
    ensure_running(dev);
    let s = Sample::open(dev);
    assert_eq!(s.reg(reg::ID), u32::from_le_bytes(*b"MGV1"));
    assert_eq!(s.reg(reg::VERSION), 1);
    assert_eq!(s.reg(reg::PAGE_SIZE) as usize, PAGE);
    assert_eq!(s.reg(reg::FLAGS), 0);
    assert_eq!(s.reg(reg::DEVICE_STATE), RESERVED | RUNNING);
    assert_eq!(s.state_size % PAGE, 0);
    assert!(s.state_size > s.chunk as usize, "several chunks per save");
    assert_eq!(Sample::open(&mmapped()[1]).reg(reg::FLAGS), 1);

    let cfg = query_region(s.io.as_ref(), CONFIG_REGION).unwrap();
    assert_eq!(cfg.size, 256);
    let mut id = [0u8; 4];
    s.io.read_at(&mut id, cfg.offset).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x4d56, "vendor id");
    // BAR sizing: all ones reads back the size mask of the 4 KiB BAR0.
    s.io.write_at(&u32::MAX.to_le_bytes(), cfg.offset + 0x10)
        .unwrap();
    s.io.read_at(&mut id, cfg.offset + 0x10).unwrap();
    assert_eq!(u32::from_le_bytes(id), !0xfff);

    let data = pattern(0x3c, s.state_size);
    s.write_mem(0, &data).unwrap();
    assert_eq!(s.read_mem(), data);
    s.write_mem(4093, b"odd!").unwrap();
    let mut b = [0u8; 4];
    s.io.read_at(&mut b, s.mem + 4093).unwrap();
    assert_eq!(&b, b"odd!");
    // Out of range and misaligned accesses are refused.
    let end = s.state_size as u64;
    assert_eq!(code(s.io.read_at(&mut b, s.mem + end - 2)), libc::EINVAL);
    assert_eq!(code(s.io.read_at(&mut b, s.regs + 2)), libc::EINVAL);
    assert_eq!(code(s.io.read_at(&mut [0u8; 8], s.regs)), libc::EINVAL);
}

#[test]
fn device_state_follows_the_uapi_rules() {
    let dev = &trapped()[0];
    ensure_running(dev);
    let s = Sample::open(dev);
    let initial = s.raw_state();
    assert_eq!(initial, RESERVED | RUNNING);

    // Reserved bits must be written back as read.
    assert_eq!(code(s.write_state(RUNNING)), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::RESERVED_BITS);
    assert_eq!(code(s.write_state(initial | 0x10)), libc::EINVAL);
    // ERROR and the two invalid values cannot be requested.
    for bits in [0b101, 0b111, 0b110] {
        assert_eq!(code(s.set(bits)), libc::EINVAL, "{bits:03b}");
        assert_eq!(s.refusal(), refusal::NOT_REQUESTABLE);
    }
    assert_eq!(s.raw_state(), initial);
    // Fields only at their own offset and width.
    for (off, len) in [
        (0, 8),
        (0, 2),
        (1, 4),
        (4, 4),
        (8, 4),
        (12, 8),
        (20, 8),
        (28, 4),
    ] {
        assert_eq!(code(s.mig_read(off, len)), libc::EINVAL, "read {off}+{len}");
        assert_eq!(s.refusal(), refusal::ACCESS);
        assert_eq!(
            code(s.mig_write(off, &vec![0; len])),
            libc::EINVAL,
            "write {off}+{len}"
        );
    }
    assert_eq!(code(s.mig_read(32, 4)), libc::EINVAL, "gap before the data");
    assert_eq!(code(s.mig_write(8, &[0; 8])), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::READ_ONLY);
    assert_eq!(code(s.mig_write(16, &[0; 8])), libc::EINVAL);
    // Saving fields outside a saving state.
    assert_eq!(code(s.pending()), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::WRONG_STATE);
    assert_eq!(code(s.data_offset()), libc::EINVAL);
    assert_eq!(code(s.data_size()), libc::EINVAL);
    assert_eq!(code(s.set_data_size(16)), libc::EINVAL);

    // Arcs: RUNNING -> STOP -> (not PRE-COPY); STOP -> STOP-AND-COPY (QEMU 5.2-7.2 saving a
    // stopped VM: vfio_save_setup ORs SAVING into 000b) -> RUNNING (cancel) -> STOP ->
    // RESUMING -> (not STOP).
    s.set(0).unwrap();
    assert_eq!(code(s.set(RUNNING | SAVING)), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::NO_ARC);
    s.set(SAVING).unwrap();
    s.set(RUNNING).unwrap();
    s.set(0).unwrap();
    s.set(RESUMING).unwrap();
    assert_eq!(code(s.set(0)), libc::EINVAL);
    assert_eq!(code(s.set(SAVING)), libc::EINVAL);
    // The state window does not change while the device is stopped.
    assert_eq!(code(s.write_mem(0, b"x")), libc::EBUSY);
    // RESUMING -> RUNNING with no state given fails the device: ERROR, reserved bits kept.
    assert_eq!(code(s.set(RUNNING)), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::INCOMPLETE);
    assert_eq!(s.raw_state(), RESERVED | ERROR_BITS);
    for bits in 0..8 {
        assert_eq!(code(s.set(bits)), libc::EINVAL, "{bits:03b} from ERROR");
        assert_eq!(s.refusal(), refusal::IN_ERROR);
    }
    s.io.reset().unwrap();
    assert_eq!(s.raw_state(), initial);

    // The library's read-modify-write keeps the reserved bits through a whole cycle.
    let mut v1 = V1Device::open(s.dyn_io()).unwrap();
    for target in [
        V1State::PreCopy,
        V1State::StopCopy,
        V1State::Running,
        V1State::Stop,
        V1State::Running,
    ] {
        v1.set_state(target).unwrap();
        assert_eq!(s.raw_state(), RESERVED | target.bits(), "{target}");
    }
}

#[test]
fn saving_stages_on_data_offset_and_consumes_on_pending() {
    for dev in [&trapped()[0], &mmapped()[0]] {
        ensure_running(dev);
        let s = Sample::open(dev);
        let mmap = s.reg(reg::FLAGS) == 1;
        let data = if mmap { MMAP_DATA } else { TRAPPED_DATA };
        let state = pattern(0x51, s.state_size);
        s.write_mem(0, &state).unwrap();

        s.set(SAVING).unwrap();
        let p0 = s.pending().unwrap();
        assert_eq!(p0, s.expected_initial_pending(true));
        assert_eq!(code(s.data_size()), libc::EINVAL, "nothing staged yet");
        assert_eq!(s.refusal(), refusal::NOT_STAGED);
        // A data_offset read stages; repeated reads keep the same chunk.
        let off = s.data_offset().unwrap();
        assert_eq!(off, data);
        assert_eq!(s.data_offset().unwrap(), off);
        let size = s.data_size().unwrap();
        assert_eq!(size, s.chunk, "a full transaction");
        assert_eq!(s.reg(reg::SAVE_TXS), 1);
        let tx = s.mig_read(off, size as usize).unwrap();
        assert_eq!(&tx[..4], b"MV1T");
        assert_eq!(u32::from_le_bytes(tx[4..8].try_into().unwrap()), 0, "seq");
        assert_eq!(
            u64::from(u32::from_le_bytes(tx[8..12].try_into().unwrap())),
            size
        );
        // Reads inside the staged chunk only, at any width.
        assert_eq!(s.mig_read(off + 100, 3).unwrap(), tx[100..103]);
        assert_eq!(code(s.mig_read(off + size - 2, 4)), libc::EINVAL);
        // (The mmap type's section ends with a full chunk: that read leaves the region.)
        let why = if mmap {
            refusal::ACCESS
        } else {
            refusal::OUTSIDE_STAGED
        };
        assert_eq!(s.refusal(), why);
        if mmap {
            // The same bytes through the sparse-mmap area.
            let map =
                s.io.mmap(s.mig.offset + MMAP_DATA, s.chunk as usize, false)
                    .unwrap();
            let mut via_map = vec![0u8; size as usize];
            map.read(0, &mut via_map).unwrap();
            assert_eq!(via_map, tx);
        }
        // The next pending read consumes it: exactly data_size less.
        assert_eq!(s.pending().unwrap(), p0 - size);
        assert_eq!(code(s.data_size()), libc::EINVAL);
        // The trapped type moves every other transaction by 64 bytes.
        let off2 = s.data_offset().unwrap();
        assert_eq!(off2, if mmap { data } else { data + TRAPPED_SHIFT });
        let size2 = s.data_size().unwrap();
        let tx2 = s.mig_read(off2, size2 as usize).unwrap();
        assert_eq!(u32::from_le_bytes(tx2[4..8].try_into().unwrap()), 1, "seq");
        // STOP is refused with data pending.
        assert_eq!(code(s.set(0)), libc::EINVAL);
        assert_eq!(s.refusal(), refusal::DATA_PENDING);
        let mut total = size + size2;
        let mut txs = 2;
        loop {
            let p = s.pending().unwrap();
            assert_eq!(p, p0 - total);
            if p == 0 {
                break;
            }
            total += s.next_tx().len() as u64;
            txs += 1;
        }
        assert_eq!(code(s.data_offset()), libc::EINVAL, "nothing pending");
        assert_eq!(s.refusal(), refusal::NOTHING_PENDING);
        let before = s.reg(reg::SAVES_DONE);
        s.set(0).unwrap();
        assert_eq!(s.reg(reg::SAVES_DONE), before + 1);
        assert_eq!(s.reg(reg::SAVE_TXS), txs);
        assert_eq!(s.reg(reg::SAVE_PAGES) as usize, s.state_size / PAGE);
        assert!(txs >= 4, "several chunks: {txs}");

        // Pre-copy then cancel: back to RUNNING, the save is gone.
        s.set(RUNNING).unwrap();
        s.set(RUNNING | SAVING).unwrap();
        assert_eq!(s.pending().unwrap(), s.expected_initial_pending(false));
        s.next_tx();
        s.set(RUNNING).unwrap();
        assert_eq!(code(s.pending()), libc::EINVAL);
        assert_eq!(s.read_mem(), state, "saving does not change the state");
    }
}

#[test]
fn resume_keeps_the_source_transaction_sizes_and_order() {
    // Trapped source (pread), mmap destination (writes through its sparse-mmap area).
    let (a, b) = (&trapped()[1], &mmapped()[1]);
    ensure_running(a);
    ensure_running(b);
    let expected = write_state(a, 0x6b);
    write_state(b, 0x01);
    let src = Sample::open(a);
    let txs = src.save_all();
    assert!(txs.len() >= 4);
    let dst = Sample::open(b);
    let map = dst
        .io
        .mmap(dst.mig.offset + MMAP_DATA, dst.chunk as usize, true)
        .unwrap();
    dst.set(RESUMING).unwrap();
    assert_eq!(code(dst.pending()), libc::EINVAL);
    assert_eq!(code(dst.data_size()), libc::EINVAL);
    let put = |tx: &[u8]| {
        let off = dst.data_offset().unwrap();
        assert_eq!(off, MMAP_DATA);
        map.write(0, tx).unwrap();
    };
    let len = txs[0].len() as u64;
    put(&txs[0]);
    // Any size but the source transaction's is refused, and leaves no trace.
    assert_eq!(code(dst.set_data_size(len - 1)), libc::EINVAL);
    assert_eq!(dst.refusal(), refusal::TX_SIZE);
    assert_eq!(code(dst.set_data_size(len + 1)), libc::EINVAL);
    assert_eq!(code(dst.set_data_size(8)), libc::EINVAL);
    assert_eq!(dst.refusal(), refusal::SIZE_RANGE);
    assert_eq!(code(dst.set_data_size(dst.chunk + 1)), libc::EINVAL);
    dst.set_data_size(len).unwrap();
    // Out of order, then corrupt.
    put(&txs[2]);
    assert_eq!(code(dst.set_data_size(txs[2].len() as u64)), libc::EINVAL);
    assert_eq!(dst.refusal(), refusal::TX_SEQ);
    let mut bad = txs[1].clone();
    bad[1000] ^= 0x20;
    put(&bad);
    assert_eq!(code(dst.set_data_size(bad.len() as u64)), libc::EINVAL);
    assert_eq!(dst.refusal(), refusal::TX_CRC);
    for tx in &txs[1..] {
        put(tx);
        dst.set_data_size(tx.len() as u64).unwrap();
    }
    assert_eq!(dst.reg(reg::LOAD_TXS) as usize, txs.len());
    assert_eq!(dst.reg(reg::LOAD_PAGES) as usize, dst.state_size / PAGE);
    let resumes = dst.reg(reg::RESUMES_DONE);
    dst.set(RUNNING).unwrap();
    assert_eq!(dst.reg(reg::RESUMES_DONE), resumes + 1);
    assert_eq!(dst.raw_state(), RESERVED | RUNNING);
    assert_eq!(dst.read_mem(), expected);
    drop(map);
    src.set(RUNNING).unwrap();
}

fn migrate_and_check(a: &Path, b: &Path, live: bool, seed: u8) {
    migrate_and_check_with(a, b, live, seed, &[]);
}

fn migrate_and_check_with(a: &Path, b: &Path, live: bool, seed: u8, extra: &[&str]) {
    ensure_running(a);
    ensure_running(b);
    let expected = write_state(a, seed);
    write_state(b, seed.wrapping_add(100));
    let mut args = vec!["migrate", path_str(a), path_str(b), "--json"];
    if live {
        args.push("--live");
    }
    args.extend_from_slice(extra);
    let out = vfio_mig(&args);
    ok(&out);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state_bits(b), RESERVED | RUNNING, "destination runs");
    assert_eq!(state_bits(a), RESERVED, "source stopped");
    assert_eq!(read_state(b), expected, "B holds A's state");
    let (sa, sb) = (Sample::open(a), Sample::open(b));
    assert_eq!(sa.reg(reg::SAVE_TXS), sb.reg(reg::LOAD_TXS), "{report}");
    assert!(sa.reg(reg::SAVE_TXS) >= 4, "several chunks");
}

#[test]
fn migrate_stop_copy_between_trapped_devices() {
    let d = trapped();
    migrate_and_check(&d[0], &d[1], false, 0x11);
}

#[test]
fn migrate_with_a_small_buffer_moves_chunks_in_pieces() {
    // A 4 KiB transfer buffer: every 64 KiB transaction is read (pread or mmap) in pieces at
    // offsets inside the staged chunk, crosses the stream as fragments, and is written back in
    // pieces before its data_size.
    let (t, m) = (trapped(), mmapped());
    migrate_and_check_with(&t[1], &t[0], true, 0x12, &["--buffer", "4096"]);
    migrate_and_check_with(&m[0], &m[1], false, 0x13, &["--buffer", "4096"]);
}

#[test]
fn migrate_live_between_trapped_devices() {
    let d = trapped();
    migrate_and_check(&d[1], &d[0], true, 0x22);
}

#[test]
fn migrate_stop_copy_between_mmap_devices() {
    let d = mmapped();
    migrate_and_check(&d[0], &d[1], false, 0x33);
}

#[test]
fn migrate_live_between_mmap_devices() {
    let d = mmapped();
    migrate_and_check(&d[1], &d[0], true, 0x44);
}

/// Writes a state derived from `seed` into `a`, saves `a` into a file (checked by `inspect`),
/// and returns the stream's bytes and the state.
fn saved_stream(a: &Path, seed: u8, live: bool) -> (Vec<u8>, Vec<u8>) {
    ensure_running(a);
    let expected = write_state(a, seed);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s");
    let mut args = vec!["save", path_str(a), "-o", path_str(&file)];
    if live {
        args.push("--live");
    }
    ok(&vfio_mig(&args));
    ok(&vfio_mig(&["inspect", path_str(&file)]));
    (std::fs::read(&file).unwrap(), expected)
}

#[test]
fn save_live_to_a_file_then_load_into_another_device() {
    let (a, b) = (&mmapped()[0], &mmapped()[1]);
    let (bytes, expected) = saved_stream(a, 0x5e, true);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("live");
    std::fs::write(&file, &bytes).unwrap();
    ensure_running(b);
    write_state(b, 0x02);
    ok(&vfio_mig(&["load", path_str(b), "-i", path_str(&file)]));
    assert_eq!(state_bits(b), RESERVED | RUNNING);
    assert_eq!(read_state(b), expected);
}

#[test]
fn trapped_state_resumes_an_mmap_device_and_the_cli_keeps_models_apart() {
    let (a, b) = (&trapped()[0], &mmapped()[0]);
    // The CLI refuses a stream of another device model (mdev types differ), before B is
    // touched and with A returned to RUNNING.
    ensure_running(a);
    ensure_running(b);
    let a_state = write_state(a, 0x71);
    let b_state = write_state(b, 0x72);
    let out = vfio_mig(&["migrate", path_str(a), path_str(b)]);
    clean_failure(
        &out,
        &["stream holds state of a mdev:mig-v1-trapped device"],
    );
    assert_eq!(state_bits(a), RESERVED | RUNNING);
    assert_eq!(state_bits(b), RESERVED | RUNNING);
    assert_eq!(read_state(a), a_state);
    assert_eq!(read_state(b), b_state);

    // The modules' data format is the same for both types: a trapped device's stream, with
    // its header naming the mmap model, resumes the mmap device through its mmapped section.
    let (bytes, expected) = saved_stream(a, 0x73, false);
    let relabelled = rewrite_stream(&bytes, Some(&model(b)), |_| {});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relabelled");
    std::fs::write(&file, &relabelled).unwrap();
    ok(&vfio_mig(&["load", path_str(b), "-i", path_str(&file)]));
    assert_eq!(state_bits(b), RESERVED | RUNNING);
    assert_eq!(read_state(b), expected);
}

#[test]
fn live_migration_of_a_dirtying_device_sends_several_rounds_and_the_latest_state() {
    for (a, b) in [
        (trapped()[0].clone(), trapped()[1].clone()),
        (mmapped()[1].clone(), mmapped()[0].clone()),
    ] {
        ensure_running(&a);
        ensure_running(&b);
        let initial = write_state(&a, 0x66);
        write_state(&b, 0x67);
        {
            // The device writes its memory while in pre-copy: 4 pages at every iteration
            // (deterministic), and 2 pages every millisecond tick.
            let s = Sample::open(&a);
            s.set_reg(reg::DIRTY_PER_ITER, 4);
            s.set_reg(reg::DIRTY_RATE, 2);
            s.set_reg(reg::DIRTY_PERIOD, 1);
        }
        let out = vfio_mig(&[
            "migrate",
            path_str(&a),
            path_str(&b),
            "--live",
            "--downtime-ms",
            "0",
            "--max-rounds",
            "4",
            "--json",
        ]);
        ok(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let text = report.to_string();
        let rounds = report["save"]["rounds"]
            .as_u64()
            .unwrap_or_else(|| panic!("no save.rounds in {text}"));
        assert!(rounds >= 2, "pre-copy rounds: {text}");

        let sa = Sample::open(&a);
        let passes = sa.reg(reg::SAVE_PASSES);
        let dirtied = sa.reg(reg::SAVE_DIRTIED);
        let sent = sa.reg(reg::SAVE_PAGES) as usize;
        eprintln!(
            "{}: rounds {rounds}, passes {passes}, dirtied {dirtied}, pages sent {sent}",
            a.display()
        );
        assert!(passes >= 2, "passes over the dirty bitmap: {passes}");
        assert!(dirtied > 0);
        assert!(sent > sa.state_size / PAGE, "dirtied pages sent again");
        let final_state = sa.read_mem();
        assert_eq!(sa.raw_state(), RESERVED, "source stopped");
        drop(sa);
        assert_ne!(
            final_state, initial,
            "the device changed its state while migrating"
        );
        assert_eq!(read_state(&b), final_state, "B holds A's latest state");
        assert_eq!(state_bits(&b), RESERVED | RUNNING);
        ensure_running(&a);
    }
}

#[test]
fn corrupt_stream_is_refused_and_the_destination_reset_to_running() {
    let (a, b) = (&trapped()[1], &trapped()[0]);
    let (mut bytes, _) = saved_stream(a, 0x19, false);
    let at = bytes.len() / 2; // inside a DATA record's payload
    bytes[at] ^= 0x55;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad");
    std::fs::write(&file, &bytes).unwrap();
    ensure_running(b);
    let b_state = write_state(b, 0x1a);
    clean_failure(
        &vfio_mig(&["load", path_str(b), "-i", path_str(&file)]),
        &["CRC"],
    );
    assert_eq!(state_bits(b), RESERVED | RUNNING);
    assert_eq!(
        read_state(b),
        b_state,
        "a failed resume leaves the state as it was"
    );
}

#[test]
fn stream_the_module_rejects_is_refused_and_the_destination_reset_to_running() {
    // The stream's checksums are right, the device data is not: the module's transaction crc
    // catches it when data_size is written; the library resets the destination.
    let (a, b) = (&mmapped()[0], &mmapped()[1]);
    let (bytes, _) = saved_stream(a, 0x2b, false);
    let forged = rewrite_stream(&bytes, None, |data| data[200] ^= 0x01);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("forged");
    std::fs::write(&file, &forged).unwrap();
    ok(&vfio_mig(&["inspect", path_str(&file)]));
    ensure_running(b);
    let b_state = write_state(b, 0x2c);
    let resets = Sample::open(b).reg(reg::RESETS);
    clean_failure(
        &vfio_mig(&["load", path_str(b), "-i", path_str(&file)]),
        &["write data_size", "was reset"],
    );
    let s = Sample::open(b);
    assert_eq!(s.refusal(), refusal::TX_CRC);
    assert_eq!(s.reg(reg::RESETS), resets + 1);
    assert_eq!(s.raw_state(), RESERVED | RUNNING);
    assert_eq!(s.read_mem(), b_state);
}

#[test]
fn forced_error_state_is_recovered_by_reset() {
    let dev = &mmapped()[1];
    ensure_running(dev);
    let state = write_state(dev, 0x4e);
    let s = Sample::open(dev);
    s.set_reg(reg::FORCE_ERROR, 1);
    assert_eq!(s.raw_state(), RESERVED | ERROR_BITS);
    assert_eq!(s.reg(reg::DEVICE_STATE), RESERVED | ERROR_BITS);
    assert_eq!(code(s.write_state(RESERVED | RUNNING)), libc::EINVAL);
    assert_eq!(s.refusal(), refusal::IN_ERROR);
    assert_eq!(code(s.pending()), libc::EINVAL);
    drop(s);

    let out = vfio_mig(&["probe", path_str(dev), "--json"]);
    ok(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "ERROR (110b)");

    // The library refuses to leave ERROR by a state write, and recovers by reset.
    let s = Sample::open(dev);
    let resets = s.reg(reg::RESETS);
    let mut v1 = V1Device::open(s.dyn_io()).unwrap();
    let err = v1.set_state(V1State::Running).unwrap_err().to_string();
    assert!(
        err.contains("ERROR (110b)") && err.contains("reset"),
        "{err}"
    );
    assert_eq!(s.raw_state(), RESERVED | ERROR_BITS, "nothing was written");
    assert_eq!(v1.recover(), Recovery::Reset);
    assert_eq!(s.raw_state(), RESERVED | RUNNING);
    assert_eq!(s.reg(reg::RESETS), resets + 1);
    assert_eq!(s.read_mem(), state, "reset keeps the state window");
    v1.set_state(V1State::PreCopy).unwrap();
    v1.set_state(V1State::Running).unwrap();
    drop(v1);
    drop(s);

    // The command line on a device in ERROR: the save fails cleanly, the device is reset.
    Sample::open(dev).set_reg(reg::FORCE_ERROR, 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s");
    let out = vfio_mig(&["save", path_str(dev), "-o", path_str(&file)]);
    clean_failure(&out, &["ERROR (110b)", "was reset"]);
    let s = Sample::open(dev);
    assert_eq!(s.raw_state(), RESERVED | RUNNING);
    assert_eq!(s.reg(reg::RESETS), resets + 2);
    assert_eq!(s.read_mem(), state);
}

#[test]
fn failures_injected_mid_migration_leave_both_devices_running() {
    // Every access the module can fail on demand (EIO, device in ERROR), on the source and on
    // the destination, with and without pre-copy: the command fails with one clear line naming
    // the step, the failed device is reset, the other returned to RUNNING, and both keep the
    // state they had.
    let (src, dst) = (&mmapped()[1], &mmapped()[0]);
    let cases: [(bool, u32, &str); 7] = [
        (true, FAIL_STATE_WRITE, "device refused RUNNING"),
        (true, FAIL_PENDING_READ, "read pending_bytes"),
        (true, FAIL_DATA_OFFSET_READ, "read data_offset"),
        (true, FAIL_DATA_SIZE_READ, "read data_size"),
        (false, FAIL_STATE_WRITE, "device refused RUNNING"),
        (false, FAIL_DATA_OFFSET_READ, "read data_offset (resuming)"),
        (false, FAIL_DATA_SIZE_WRITE, "write data_size"),
    ];
    for live in [false, true] {
        for (i, (on_source, fail, step)) in cases.into_iter().enumerate() {
            let target = if on_source { src } else { dst };
            ensure_running(src);
            ensure_running(dst);
            let src_state = write_state(src, 0x80 + i as u8);
            let dst_state = write_state(dst, 0x90 + i as u8);
            let resets = {
                let t = Sample::open(target);
                t.set_reg(reg::FAIL_NEXT, fail);
                t.reg(reg::RESETS)
            };
            let mut args = vec!["migrate", path_str(src), path_str(dst)];
            if live {
                args.push("--live");
            }
            let out = vfio_mig(&args);
            let what = format!("case {i} ({step}), live {live}");
            clean_failure(&out, &[step, "Input/output error"]);
            let t = Sample::open(target);
            assert_eq!(t.reg(reg::FAIL_NEXT), 0, "{what}: the failure fired");
            // A destination whose RESUMING transition fails is reset twice: V1Device::set_state
            // resets a device it reads back in ERROR, then abort_resume resets the destination.
            let expect = if !on_source && fail == FAIL_STATE_WRITE {
                2
            } else {
                1
            };
            assert_eq!(t.reg(reg::RESETS), resets + expect, "{what}: resets");
            drop(t);
            assert_eq!(state_bits(src), RESERVED | RUNNING, "{what}: source");
            assert_eq!(state_bits(dst), RESERVED | RUNNING, "{what}: destination");
            assert_eq!(read_state(src), src_state, "{what}");
            assert_eq!(read_state(dst), dst_state, "{what}");
        }
    }
    // And then a migration works.
    migrate_and_check(src, dst, true, 0x0f);
}
