// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v1 mock mediated device: an in-process vendor driver exposing the VFIO v1 migration
//! region, behind the same [`DeviceIo`] trait as a real device fd.
//!
//! Layout (vfio-pci style, region `i` at device-fd offset `i << 40`):
//!
//! | index          | region                                                           |
//! |----------------|------------------------------------------------------------------|
//! | 0              | BAR0: 4 KiB of read/write scratch                                |
//! | 1-7            | the other BARs, ROM and config space, all of size 0              |
//! | 8              | VGA: `EINVAL`, as on a PCI device without VGA                    |
//! | 9.. (not mig)  | unrelated device-specific regions (type 1, read-only, 256 bytes) |
//! | `region-index` | the migration region (type 3 / subtype 1), default 10            |
//!
//! The migration region starts with `struct vfio_device_migration_info` (32 bytes), followed
//! by the data section at region offset 4096 (`data=mmap`, with a sparse-mmap area over it)
//! or 64 (`data=trapped`). The data section lives in a memfd: trapped accesses are pread and
//! pwrite on it, and `mmap` maps it, so an mmapped section is real shared memory.
//!
//! A saved transaction is a 16-byte header `{ magic "MTX1", seq, total length (header
//! included), crc32c of the payload }` (little endian) followed by the next bytes of the
//! [`Encoder`]'s packet stream.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::uio::{pread, pwrite};
use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_VGA_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE, VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
    VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
};

use super::content::{gen_digest, Content, Decoder, Encoder, SplitMix64};
use super::faults::{FaultField, FaultPlan};
use super::pace::Pacer;
use super::spec::{DataMode, MockSpec, Protocol};
use super::status::{Inspect, MockHandle, MockStatus};
use crate::pci::{answer_region_info, Bar0};
use crate::region_info::{Area, Cap, Region};
use crate::rules::v1_table::{
    self, ERROR, MASK as STATE_MASK, PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY,
};
use vfio_mig::{backend::DeviceIdentity, backend::DeviceInfo, backend::DeviceIo, backend::Mapping};

pub use crate::pci::{BAR0_SIZE, REGION_SHIFT};
/// Size of each unrelated device-specific region.
pub const OTHER_REGION_SIZE: u64 = 256;
/// Type of the unrelated device-specific regions (their subtype is `index - 8`).
pub const OTHER_REGION_TYPE: u32 = 1;
/// Size of `struct vfio_device_migration_info`.
pub const MIG_INFO_SIZE: u64 = 32;
/// Region offset of the data section with `data=mmap` (page aligned).
pub const DATA_OFFSET_MMAP: u64 = 4096;
/// Region offset of the data section with `data=trapped` (deliberately not page aligned).
pub const DATA_OFFSET_TRAPPED: u64 = 64;
/// Offset of `device_state` (u32) in the migration info.
pub const OFF_DEVICE_STATE: u64 = 0;
/// Offset of the reserved u32 after `device_state`, never accessible.
pub const OFF_RESERVED: u64 = 4;
/// Offset of `pending_bytes` (u64, read-only).
pub const OFF_PENDING_BYTES: u64 = 8;
/// Offset of `data_offset` (u64, read-only).
pub const OFF_DATA_OFFSET: u64 = 16;
/// Offset of `data_size` (u64).
pub const OFF_DATA_SIZE: u64 = 24;
/// Magic of a v1 transaction header ("MTX1").
pub const TX_MAGIC: u32 = u32::from_le_bytes(*b"MTX1");
/// Size of a v1 transaction header.
pub const TX_HEADER: u64 = 16;
/// Alignment the mock requires of an `mmap` offset.
const MMAP_ALIGN: u64 = 4096;
/// Mask of the region-relative part of a device-fd offset.
const REGION_MASK: u64 = (1 << REGION_SHIFT) - 1;
/// Mixed into the seed for the generator choosing dirtied pages.
const DIRTY_RNG_SALT: u64 = 0xD1B5_4A32_D192_ED03;
/// Most pages dirtied by one catch-up, so a long pause cannot stall the device.
const MAX_DIRTY_PASSES: u64 = 2;

/// The device-fd offset of region `index`.
pub fn region_offset(index: u32) -> u64 {
    u64::from(index) << REGION_SHIFT
}

/// The field (or data) a well-formed migration-region access targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    State,
    Pending,
    DataOffset,
    DataSize,
    /// The data section, at this section-relative offset.
    Data(u64),
}

/// An ongoing save (pre-copy or stop-and-copy).
#[derive(Debug)]
struct Save {
    encoder: Encoder,
    /// Sequence number of the next staged transaction.
    seq: u32,
    /// Length of the staged transaction, if any (0: the empty chunk of `pending-slack=`).
    staged: Option<u64>,
    /// Offset of the staged transaction from the data section's start (its slot).
    staged_at: u64,
    /// When dirtying was last accounted.
    last_dirty: Instant,
    /// Dirtied bytes not yet amounting to a whole page.
    carry: f64,
}

/// An ongoing (or failed) resume.
#[derive(Debug)]
struct Resume {
    decoder: Decoder,
    /// Sequence number the next committed transaction must carry.
    next_seq: u32,
    /// The pieces so far of a transaction longer than one `data_size` write: a destination
    /// whose data section is smaller than the source's gets it split (QEMU's v1
    /// `vfio_load_buffer`), and takes it once its header's length has arrived.
    partial: Vec<u8>,
}

/// The device's state, behind the mutex.
#[derive(Debug)]
struct Inner {
    spec: MockSpec,
    content: Content,
    /// Region offset of the data section.
    data_offset: u64,
    num_regions: u32,
    /// Raw `device_state`.
    state: u32,
    /// The page generations (the device's state) while no save owns them.
    gens: Vec<u32>,
    save: Option<Save>,
    resume: Option<Resume>,
    memfd: OwnedFd,
    bar0: Bar0,
    faults: FaultPlan,
    rng: SplitMix64,
    scratch: Vec<u8>,
    status: MockStatus,
    /// The device's data rate (`rate=`): staging a chunk takes its share of it.
    stage_pacer: Option<Pacer>,
    /// The device's acceptance rate (`accept-rate=`): committing a chunk takes its share.
    accept_pacer: Option<Pacer>,
}

/// The shared inner state; the inspection handle holds it too.
#[derive(Debug)]
struct Shared(Mutex<Inner>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent-enough device for diagnostics.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inspect for Shared {
    fn status(&self) -> MockStatus {
        let g = self.lock();
        let mut s = g.status.clone();
        s.state_raw = g.state;
        s.fault_hits = g.faults.hits();
        s.staged = g.save.as_ref().and_then(|v| v.staged);
        s.stream_pending = g.save.as_ref().map_or(0, |v| v.encoder.pending());
        s
    }

    fn state_digest(&self) -> u32 {
        let g = self.lock();
        match &g.save {
            Some(save) => gen_digest(save.encoder.gens()),
            None => gen_digest(&g.gens),
        }
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The v1 mock mediated device.
///
/// Cloning shares the device (like duplicating its fd). [`MockV1::handle`] gives a
/// [`MockHandle`] to inspect it while the code under test holds it as a `dyn DeviceIo`.
///
/// # Example
///
/// A complete stop-and-copy save of one mock, resumed into another with the same seed:
///
/// ```
/// use vfio_mig::backend::query_region;
/// use vfio_mig::backend::DeviceIo;
/// use vfio_mig_mock::{MockSpec, MockV1};
///
/// let spec: MockSpec = "mock:v1,size=16K,seed=7,chunk=8K,data=trapped".parse()?;
/// let (src, dst) = (MockV1::new(&spec)?, MockV1::new(&spec)?);
///
/// // The migration region is found by its type and subtype, not by its index.
/// let find = |dev: &MockV1| -> std::io::Result<u64> {
///     let n = dev.device_info()?.num_regions;
///     let region = (0..n)
///         .filter_map(|i| query_region(dev, i).ok())
///         .find(|r| r.region_type() == Some((3, 1)))
///         .expect("a migration region");
///     Ok(region.offset)
/// };
/// let (s, d) = (find(&src)?, find(&dst)?);
/// let rd32 = |dev: &MockV1, at| -> std::io::Result<u32> {
///     let mut b = [0u8; 4];
///     dev.read_at(&mut b, at)?;
///     Ok(u32::from_le_bytes(b))
/// };
/// let rd64 = |dev: &MockV1, at| -> std::io::Result<u64> {
///     let mut b = [0u8; 8];
///     dev.read_at(&mut b, at)?;
///     Ok(u64::from_le_bytes(b))
/// };
///
/// // Read-modify-write the state: SAVING on the source, RESUMING on the destination.
/// let state = rd32(&src, s)?;
/// src.write_at(&((state & !7) | 0b010).to_le_bytes(), s)?;
/// let state = rd32(&dst, d)?;
/// dst.write_at(&((state & !7) | 0b100).to_le_bytes(), d)?;
///
/// while rd64(&src, s + 8)? > 0 {
///     // pending_bytes > 0: stage a chunk, read it, and hand it to the destination.
///     let offset = rd64(&src, s + 16)?;
///     let size = rd64(&src, s + 24)?;
///     let mut chunk = vec![0u8; size as usize];
///     src.read_at(&mut chunk, s + offset)?;
///     let offset = rd64(&dst, d + 16)?;
///     dst.write_at(&chunk, d + offset)?;
///     dst.write_at(&size.to_le_bytes(), d + 24)?;
/// }
/// let state = rd32(&dst, d)?;
/// dst.write_at(&((state & !7) | 0b001).to_le_bytes(), d)?;
/// assert!(dst.handle().status().resumed_ok);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct MockV1 {
    shared: Arc<Shared>,
    identity: DeviceIdentity,
}

impl std::fmt::Debug for MockV1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockV1")
            .field("instance", &self.identity.instance)
            .finish()
    }
}

impl MockV1 {
    /// Creates a device as `spec` describes (`spec.protocol` must be v1).
    pub fn new(spec: &MockSpec) -> io::Result<Self> {
        if spec.protocol != Protocol::V1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{spec}: not a v1 mock"),
            ));
        }
        let memfd = memfd_create("vfio-mig-mock-v1", MFdFlags::MFD_CLOEXEC)?;
        let section = libc::off_t::try_from(spec.section).map_err(|_| errno(libc::EINVAL))?;
        nix::unistd::ftruncate(&memfd, section)?;
        let content = Content::new(spec.seed, spec.size, spec.page).with_kind(spec.content);
        let inner = Inner {
            content,
            data_offset: match spec.data {
                DataMode::Mmap => DATA_OFFSET_MMAP,
                DataMode::Trapped => DATA_OFFSET_TRAPPED,
            },
            // Index 9 always exists (the unrelated region moves to 10 if the migration
            // region takes 9).
            num_regions: (spec.region_index + 1).max(VFIO_PCI_VGA_REGION_INDEX + 3),
            state: spec.reserved | RUNNING,
            gens: vec![0; content.page_count() as usize],
            save: None,
            resume: None,
            memfd,
            bar0: Bar0::default(),
            faults: FaultPlan::new(&spec.faults),
            rng: SplitMix64::new(spec.seed ^ DIRTY_RNG_SALT),
            scratch: Vec::new(),
            status: MockStatus::default(),
            stage_pacer: (spec.rate > 0).then(|| Pacer::new(spec.rate)),
            accept_pacer: (spec.accept_rate > 0).then(|| Pacer::new(spec.accept_rate)),
            spec: spec.clone(),
        };
        Ok(Self {
            shared: Arc::new(Shared(Mutex::new(inner))),
            identity: DeviceIdentity {
                model: "mock:v1".into(),
                instance: spec.to_string(),
            },
        })
    }

    /// A handle to inspect this device.
    pub fn handle(&self) -> MockHandle {
        MockHandle::new(self.shared.clone())
    }

    /// The spec this device was created from.
    pub fn spec(&self) -> MockSpec {
        self.shared.lock().spec.clone()
    }
}

impl Inner {
    /// The low three bits of `device_state` (see [`v1_table`]).
    fn state(&self) -> u32 {
        self.state & STATE_MASK
    }

    /// Refuses an access with `EINVAL`, remembering why.
    fn refuse(&mut self, why: impl Into<String>) -> io::Error {
        let why = why.into();
        log::debug!("mock v1: refused: {why}");
        self.status.last_refusal = Some(why);
        errno(libc::EINVAL)
    }

    fn enter_error(&mut self) {
        self.state = (self.state & !STATE_MASK) | ERROR;
    }

    /// Counts an access of `field`; fails it when a `fail-at` rule says so.
    fn fault(&mut self, field: FaultField) -> io::Result<()> {
        self.faults.check(field).map_err(|hit| {
            if hit.error_state {
                self.enter_error();
            }
            self.status.last_refusal = Some(format!("fail-at {field}"));
            hit.to_io()
        })
    }

    fn is_mmap(&self) -> bool {
        self.spec.data == DataMode::Mmap
    }

    /// The sparse mmap areas of the data section: `areas=` equal parts of it.
    fn areas(&self) -> Vec<Area> {
        let n = u64::from(self.spec.areas.max(1));
        let size = self.spec.section / n;
        (0..n)
            .map(|i| Area {
                offset: self.data_offset + i * size,
                size,
            })
            .collect()
    }

    fn region(&self, index: u32) -> Option<Region> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let (flags, size, caps) = if index == self.spec.region_index {
            let mut caps = vec![Cap::Type {
                region_type: VFIO_REGION_TYPE_MIGRATION_DEPRECATED,
                subtype: VFIO_REGION_SUBTYPE_MIGRATION_DEPRECATED,
            }];
            let mut flags = rw;
            if self.is_mmap() {
                flags |= VFIO_REGION_INFO_FLAG_MMAP;
                caps.push(Cap::SparseMmap(self.areas()));
            }
            (flags, self.data_offset + self.spec.section, caps)
        } else if index == VFIO_PCI_BAR0_REGION_INDEX {
            (rw, BAR0_SIZE, vec![])
        } else if index < VFIO_PCI_VGA_REGION_INDEX {
            (0, 0, vec![])
        } else if index > VFIO_PCI_VGA_REGION_INDEX && index < self.num_regions {
            let caps = vec![Cap::Type {
                region_type: OTHER_REGION_TYPE,
                subtype: index - VFIO_PCI_VGA_REGION_INDEX,
            }];
            (VFIO_REGION_INFO_FLAG_READ, OTHER_REGION_SIZE, caps)
        } else {
            return None;
        };
        Some(Region {
            flags,
            size,
            offset: region_offset(index),
            caps,
        })
    }

    fn is_other_region(&self, index: u32) -> bool {
        index > VFIO_PCI_VGA_REGION_INDEX
            && index < self.num_regions
            && index != self.spec.region_index
    }

    /// What a migration-region access of `len` bytes at region offset `rel` targets.
    fn classify(&mut self, rel: u64, len: usize) -> io::Result<Target> {
        let len = len as u64;
        if rel < MIG_INFO_SIZE {
            return match (rel, len) {
                (OFF_DEVICE_STATE, 4) => Ok(Target::State),
                (OFF_PENDING_BYTES, 8) => Ok(Target::Pending),
                (OFF_DATA_OFFSET, 8) => Ok(Target::DataOffset),
                (OFF_DATA_SIZE, 8) => Ok(Target::DataSize),
                _ => Err(self.refuse(format!(
                    "migration info access of {len} bytes at offset {rel}: fields are \
                     accessed only whole, at their own offset (u32 @0, u64 @8/16/24)"
                ))),
            };
        }
        let section = self.data_offset..self.data_offset + self.spec.section;
        match rel.checked_add(len) {
            Some(end) if rel >= section.start && end <= section.end => {
                Ok(Target::Data(rel - self.data_offset))
            }
            _ => Err(self.refuse(format!(
                "access of {len} bytes at region offset {rel} outside the migration info and \
                 the data section ({}..{})",
                section.start, section.end
            ))),
        }
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let (index, rel) = ((offset >> REGION_SHIFT) as u32, offset & REGION_MASK);
        if index == self.spec.region_index {
            self.mig_read(buf, rel)
        } else if index == VFIO_PCI_BAR0_REGION_INDEX && Bar0::holds(rel) {
            Ok(self.bar0.read(buf, rel))
        } else if self.is_other_region(index) && rel < OTHER_REGION_SIZE {
            // A fixed pattern: an EDID-like header then zeros.
            let n = buf.len().min((OTHER_REGION_SIZE - rel) as usize);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                let at = rel as usize + i;
                *b = if (1..7).contains(&at) { 0xff } else { 0 };
            }
            Ok(n)
        } else {
            Err(self.refuse(format!(
                "read at device offset {offset:#x}: no such region data"
            )))
        }
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let (index, rel) = ((offset >> REGION_SHIFT) as u32, offset & REGION_MASK);
        if index == self.spec.region_index {
            self.mig_write(buf, rel)
        } else if index == VFIO_PCI_BAR0_REGION_INDEX && Bar0::holds(rel) {
            Ok(self.bar0.write(buf, rel))
        } else {
            Err(self.refuse(format!("write at device offset {offset:#x}: not writable")))
        }
    }

    fn mig_read(&mut self, buf: &mut [u8], rel: u64) -> io::Result<usize> {
        match self.classify(rel, buf.len())? {
            Target::State => {
                self.fault(FaultField::StateRead)?;
                buf.copy_from_slice(&self.state.to_le_bytes());
            }
            Target::Pending => {
                self.fault(FaultField::Pending)?;
                let v = self.read_pending()?;
                buf.copy_from_slice(&v.to_le_bytes());
            }
            Target::DataOffset => {
                self.fault(FaultField::DataOffset)?;
                let v = self.read_data_offset()?;
                buf.copy_from_slice(&v.to_le_bytes());
            }
            Target::DataSize => {
                self.fault(FaultField::DataSizeRead)?;
                let Some(v) = self.save.as_ref().and_then(|s| s.staged) else {
                    return Err(self.refuse("data_size read with no transaction staged"));
                };
                buf.copy_from_slice(&v.to_le_bytes());
            }
            Target::Data(off) => {
                self.fault(FaultField::DataRead)?;
                let staged = self
                    .save
                    .as_ref()
                    .and_then(|s| Some((s.staged?, s.staged_at)));
                match staged {
                    Some((len, at)) if off >= at && off + buf.len() as u64 <= at + len => {
                        read_exact_at(&self.memfd, buf, off)?;
                    }
                    Some((len, at)) => {
                        return Err(self.refuse(format!(
                            "data read {off}+{} outside the staged transaction ({at}+{len})",
                            buf.len()
                        )))
                    }
                    None => return Err(self.refuse("data read with no transaction staged")),
                }
            }
        }
        Ok(buf.len())
    }

    fn mig_write(&mut self, buf: &[u8], rel: u64) -> io::Result<usize> {
        match self.classify(rel, buf.len())? {
            Target::State => {
                self.fault(FaultField::StateWrite)?;
                let v = u32::from_le_bytes(buf.try_into().expect("classified as 4 bytes"));
                self.write_state(v)?;
            }
            Target::Pending => {
                self.fault(FaultField::Pending)?;
                return Err(self.refuse("pending_bytes is read-only"));
            }
            Target::DataOffset => {
                self.fault(FaultField::DataOffset)?;
                return Err(self.refuse("data_offset is read-only"));
            }
            Target::DataSize => {
                self.fault(FaultField::DataSizeWrite)?;
                let v = u64::from_le_bytes(buf.try_into().expect("classified as 8 bytes"));
                self.commit(v)?;
            }
            Target::Data(off) => {
                self.fault(FaultField::DataWrite)?;
                if self.state() != RESUMING {
                    return Err(self.refuse(format!(
                        "data write in {}; only RESUMING accepts data",
                        v1_table::name(self.state)
                    )));
                }
                write_all_at(&self.memfd, buf, off)?;
            }
        }
        Ok(buf.len())
    }

    /// `device_state` write: reserved bits kept, a requestable target, an arc of the uAPI,
    /// and the mock's own conditions on leaving a saving or resuming state.
    fn write_state(&mut self, value: u32) -> io::Result<()> {
        let from = self.state();
        if from == ERROR {
            return Err(self.refuse("device is in ERROR; only a reset leaves it"));
        }
        if value & !STATE_MASK != self.state & !STATE_MASK {
            return Err(self.refuse(format!(
                "device_state write {value:#010x} changes reserved bits 3-31 (device has {:#010x})",
                self.state & !STATE_MASK
            )));
        }
        let to = value & STATE_MASK;
        if !v1_table::is_valid(to) {
            return Err(self.refuse(format!("{} cannot be requested", v1_table::name(to))));
        }
        if !v1_table::transition_allowed(from, to) {
            return Err(self.refuse(format!(
                "the v1 uAPI has no transition {} -> {}",
                v1_table::name(from),
                v1_table::name(to)
            )));
        }
        if from == to {
            return Ok(());
        }
        match (from, to) {
            // STOP -> STOP-AND-COPY is how QEMU saves a paused VM (SAVING ORed into 000b).
            (RUNNING, PRE_COPY) | (RUNNING, STOP_COPY) | (STOP, STOP_COPY) => {
                let gens = std::mem::take(&mut self.gens);
                let mut encoder = Encoder::with_gens(self.content, gens);
                if to == STOP_COPY {
                    encoder.finish();
                }
                self.save = Some(Save {
                    encoder,
                    seq: 0,
                    staged: None,
                    staged_at: 0,
                    last_dirty: Instant::now(),
                    carry: 0.0,
                });
            }
            (PRE_COPY, STOP_COPY) => {
                // The device ran until now: account for what it dirtied, then stop it.
                self.apply_dirty();
                if let Some(save) = self.save.as_mut() {
                    save.encoder.finish();
                }
            }
            // PRE-COPY -> STOP abandons the save, the device stopped.
            (PRE_COPY, RUNNING) | (STOP_COPY, RUNNING) | (PRE_COPY, STOP) => self.end_save(),
            (STOP_COPY, STOP) => {
                let (stream, staged) = self
                    .save
                    .as_ref()
                    .map_or((0, None), |s| (s.encoder.pending(), s.staged));
                // An empty chunk (data_size 0) needs no consuming read: QEMU's v1 code left
                // stop-and-copy on it without reading pending_bytes again.
                if stream > 0 || staged.is_some_and(|len| len > 0) {
                    return Err(self.refuse(format!(
                        "STOP-AND-COPY -> STOP with data pending ({stream} stream bytes \
                         unstaged, staged transaction {staged:?} not consumed)"
                    )));
                }
                self.end_save();
                self.status.saves_completed += 1;
            }
            (RUNNING, RESUMING) | (STOP, RESUMING) => {
                self.status.resumed_ok = false;
                self.status.corrupt = false;
                self.status.first_bad_page = None;
                self.resume = Some(Resume {
                    decoder: Decoder::new(self.content),
                    next_seq: 0,
                    partial: Vec::new(),
                });
            }
            (RESUMING, RUNNING) => {
                let verdict = match &self.resume {
                    Some(r) => r.decoder.verify_complete(),
                    None => Err("no resume in progress".to_string()),
                };
                if let Err(why) = verdict {
                    // A driver that cannot use the state it was given fails the device.
                    self.enter_error();
                    return Err(self.refuse(format!("RESUMING -> RUNNING refused: {why}")));
                }
                let resume = self.resume.take().expect("verified above");
                self.gens = resume.decoder.into_gens();
                self.status.resumed_ok = true;
            }
            _ => {}
        }
        self.state = value;
        Ok(())
    }

    /// Ends the save, giving the generation table back to the device.
    fn end_save(&mut self) {
        if let Some(save) = self.save.take() {
            self.gens = save.encoder.into_gens();
        }
    }

    /// Dirties the pages the running device wrote since the last call (pre-copy only).
    fn apply_dirty(&mut self) {
        let rate = self.spec.dirty_rate;
        let page = f64::from(self.content.page_size());
        let cap = u64::from(self.content.page_count()) * MAX_DIRTY_PASSES;
        let Some(save) = self.save.as_mut() else {
            return;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(save.last_dirty).as_secs_f64();
        save.last_dirty = now;
        if rate == 0 {
            return;
        }
        let bytes = save.carry + rate as f64 * elapsed;
        let pages = (bytes / page).floor();
        save.carry = bytes - pages * page;
        let pages = (pages as u64).min(cap);
        let before = save.encoder.dirtied_pages();
        save.encoder.dirty(pages, &mut self.rng);
        self.status.dirtied_pages += save.encoder.dirtied_pages() - before;
    }

    /// `pending_bytes` read: consumes the staged transaction, then reports what is left,
    /// transaction headers included.
    fn read_pending(&mut self) -> io::Result<u64> {
        let state = self.state();
        if !v1_table::is_saving(state) {
            return Err(self.refuse(format!("pending_bytes read in {}", v1_table::name(state))));
        }
        if state == PRE_COPY {
            self.apply_dirty();
        }
        let chunk = self.spec.chunk;
        let save = self.save.as_mut().expect("a saving state has a save");
        if let Some(len) = save.staged.take().filter(|&len| len > 0) {
            self.status.transactions_saved += 1;
            self.status.bytes_saved += len;
        }
        let stream = save.encoder.pending();
        let per_tx = chunk - TX_HEADER;
        // A driver whose pending_bytes is an estimate may report more than it will stage.
        Ok(stream + stream.div_ceil(per_tx) * TX_HEADER + self.spec.pending_slack)
    }

    /// `data_offset` read: in a saving state, stages the next transaction if none is staged.
    fn read_data_offset(&mut self) -> io::Result<u64> {
        let state = self.state();
        if state == RESUMING {
            let next_seq = self.resume.as_ref().map_or(0, |r| r.next_seq);
            return Ok(self.data_offset + self.spec.slot_offset(next_seq));
        }
        if !v1_table::is_saving(state) {
            return Err(self.refuse(format!("data_offset read in {}", v1_table::name(state))));
        }
        let slack = self.spec.pending_slack;
        let save = self.save.as_mut().expect("a saving state has a save");
        if save.staged.is_none() {
            if save.encoder.pending() > 0 {
                self.stage()?;
            } else if slack > 0 {
                // pending_bytes said `slack` bytes, but nothing is left: an empty chunk.
                save.staged = Some(0);
                save.staged_at = self.spec.slot_offset(save.seq);
            } else {
                return Err(self.refuse("data_offset read with nothing pending"));
            }
        }
        let at = self.save.as_ref().map_or(0, |s| s.staged_at);
        Ok(self.data_offset + at)
    }

    /// Builds the next transaction at the start of the data section.
    fn stage(&mut self) -> io::Result<()> {
        let save = self.save.as_mut().expect("staging needs a save");
        let payload = (self.spec.chunk - TX_HEADER).min(save.encoder.pending()) as usize;
        let total = TX_HEADER as usize + payload;
        // A bandwidth-modelled device assembles the chunk at its own pace: the read of
        // data_offset blocks meanwhile, as a vendor driver's does.
        if !self.spec.latency.is_zero() {
            std::thread::sleep(self.spec.latency);
        }
        if let Some(p) = &mut self.stage_pacer {
            p.pace_blocking(total as u64);
        }
        self.scratch.resize(total, 0);
        let n = save.encoder.emit(&mut self.scratch[TX_HEADER as usize..]);
        debug_assert_eq!(n, payload);
        let crc = crc32c::crc32c(&self.scratch[TX_HEADER as usize..total]);
        for (i, v) in [TX_MAGIC, save.seq, total as u32, crc]
            .into_iter()
            .enumerate()
        {
            self.scratch[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        let at = self.spec.slot_offset(save.seq);
        write_all_at(&self.memfd, &self.scratch[..total], at)?;
        save.seq += 1;
        save.staged = Some(total as u64);
        save.staged_at = at;
        self.status.transactions_staged += 1;
        Ok(())
    }

    /// `data_size` write while resuming: checks the transaction at the section's start and
    /// feeds its payload to the decoder. A transaction whose header says it is longer than
    /// `size` is the first piece of a split one: the pieces are kept, in order, until the
    /// whole transaction is in; a piece running past it is refused.
    fn commit(&mut self, size: u64) -> io::Result<()> {
        let state = self.state();
        if state != RESUMING {
            return Err(self.refuse(format!("data_size write in {}", v1_table::name(state))));
        }
        if size == 0 || size > self.spec.section {
            return Err(self.refuse(format!("data_size {size} not in 1..={}", self.spec.section)));
        }
        let continued = self.resume.as_ref().is_some_and(|r| !r.partial.is_empty());
        if size < TX_HEADER && !continued {
            return Err(self.refuse(format!(
                "data_size {size} shorter than a transaction header"
            )));
        }
        if let Some(p) = &mut self.accept_pacer {
            // The data_size write blocks while the device takes the chunk in.
            p.pace_blocking(size);
        }
        let mut tx = std::mem::take(&mut self.scratch);
        tx.resize(size as usize, 0);
        let result = self.read_piece(&mut tx, size).and_then(|()| {
            let resume = self.resume.as_mut().expect("RESUMING has a resume");
            if resume.partial.is_empty() {
                let len = tx_len(&tx);
                if u64::from(len) <= size {
                    return self.commit_bytes(&tx);
                }
                resume.partial.extend_from_slice(&tx);
                return Ok(());
            }
            resume.partial.extend_from_slice(&tx);
            let (have, len) = (
                resume.partial.len() as u64,
                u64::from(tx_len(&resume.partial)),
            );
            if have < len {
                return Ok(());
            }
            let whole = std::mem::take(&mut resume.partial);
            if have > len {
                return Err(self.refuse(format!(
                    "data_size pieces of {have} bytes run past the transaction's length {len}"
                )));
            }
            self.commit_bytes(&whole)
        });
        self.scratch = tx;
        result
    }

    /// Reads the `size` bytes the user wrote at the next transaction's slot.
    fn read_piece(&mut self, tx: &mut [u8], size: u64) -> io::Result<()> {
        let next_seq = self.resume.as_ref().map_or(0, |r| r.next_seq);
        let at = self.spec.slot_offset(next_seq);
        if at + size > self.spec.section {
            return Err(self.refuse(format!(
                "data_size {size} at slot {at} runs past the {} byte data section",
                self.spec.section
            )));
        }
        read_exact_at(&self.memfd, tx, at)
    }

    fn commit_bytes(&mut self, tx: &[u8]) -> io::Result<()> {
        let size = tx.len() as u64;
        let next_seq = self.resume.as_ref().map_or(0, |r| r.next_seq);
        let word = |i: usize| le_word(tx, i);
        let (magic, seq, len, crc) = (word(0), word(1), word(2), word(3));
        let why = if magic != TX_MAGIC {
            Some(format!(
                "transaction magic {magic:#010x}, expected {TX_MAGIC:#010x}"
            ))
        } else if seq != next_seq {
            Some(format!("transaction seq {seq}, expected {next_seq}"))
        } else if u64::from(len) != size {
            Some(format!(
                "data_size {size} differs from the transaction's length {len} \
                 (source transaction sizes must be kept)"
            ))
        } else if crc32c::crc32c(&tx[TX_HEADER as usize..]) != crc {
            Some(format!("transaction {seq}: payload crc mismatch"))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(self.refuse(why));
        }
        let resume = self.resume.as_mut().expect("RESUMING has a resume");
        let fed = resume.decoder.feed(&tx[TX_HEADER as usize..]);
        self.status.corrupt = resume.decoder.is_corrupt();
        self.status.first_bad_page = resume.decoder.first_bad_page();
        if let Err(e) = fed {
            return Err(self.refuse(format!("transaction {seq}: state stream: {e}")));
        }
        resume.next_seq += 1;
        self.status.transactions_loaded += 1;
        self.status.bytes_loaded += size;
        Ok(())
    }

    fn mmap(&mut self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        self.fault(FaultField::Mmap)?;
        let (index, rel) = ((offset >> REGION_SHIFT) as u32, offset & REGION_MASK);
        if !self.is_mmap() || index != self.spec.region_index {
            return Err(self.refuse(format!("mmap at {offset:#x}: no mmappable area there")));
        }
        let areas = self.areas();
        let inside = areas.iter().any(|a| a.contains(rel, len as u64));
        if rel % MMAP_ALIGN != 0 || len == 0 || !inside {
            return Err(self.refuse(format!(
                "mmap of {len} bytes at region offset {rel}: not a page-aligned part of one \
                 sparse area ({areas:?})"
            )));
        }
        // SAFETY: the checks above keep the mapping inside the data section, which is the
        // memfd's whole length; the memfd is never shrunk, and the mock only accesses it with
        // pread and pwrite, never through references.
        unsafe { Mapping::new(&self.memfd, rel - self.data_offset, len, writable) }
    }

    fn reset(&mut self) -> io::Result<()> {
        self.fault(FaultField::Reset)?;
        self.state = self.spec.reserved | RUNNING;
        self.gens = vec![0; self.content.page_count() as usize];
        self.save = None;
        self.resume = None;
        self.rng = SplitMix64::new(self.spec.seed ^ DIRTY_RNG_SALT);
        self.status.resumed_ok = false;
        self.status.corrupt = false;
        self.status.first_bad_page = None;
        self.status.resets += 1;
        Ok(())
    }

    fn region_info_raw(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.fault(FaultField::RegionInfo)?;
        let answer = answer_region_info(buf, |index| self.region(index));
        answer.map_err(|why| self.refuse(why))
    }
}

fn read_exact_at(fd: &OwnedFd, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = pread(fd, buf, off as libc::off_t)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(())
}

fn write_all_at(fd: &OwnedFd, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        let n = pwrite(fd, buf, off as libc::off_t)?;
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

impl DeviceIo for MockV1 {
    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    fn device_info(&self) -> io::Result<DeviceInfo> {
        Ok(DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: self.shared.lock().num_regions,
            num_irqs: VFIO_PCI_NUM_IRQS,
        })
    }

    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()> {
        self.shared.lock().region_info_raw(buf)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.shared.lock().read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        self.shared.lock().write(buf, offset)
    }

    fn mmap(&self, offset: u64, len: usize, writable: bool) -> io::Result<Mapping> {
        self.shared.lock().mmap(offset, len, writable)
    }

    fn reset(&self) -> io::Result<()> {
        self.shared.lock().reset()
    }

    // A v1-era vendor driver does not know VFIO_DEVICE_FEATURE's migration features: the
    // trait's defaults answer ENOTTY.
}

/// Word `i` (little-endian u32) of a transaction header; the caller checked its length.
fn le_word(tx: &[u8], i: usize) -> u32 {
    let b = &tx[i * 4..i * 4 + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The length a transaction's header announces (its third word).
fn tx_len(tx: &[u8]) -> u32 {
    le_word(tx, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultField;
    use crate::rules::v1_table::SAVING;
    use vfio_bindings::bindings::vfio::vfio_region_info;
    use vfio_mig::backend::query_region;
    use vfio_mig::{backend::read_pod, backend::write_pod};

    /// A tiny hand-written driver: raw field accesses on a mock.
    struct Drv {
        dev: MockV1,
        base: u64,
    }

    fn code(r: io::Result<impl Sized>) -> i32 {
        match r {
            Ok(_) => 0,
            Err(e) => e.raw_os_error().unwrap_or(-1),
        }
    }

    impl Drv {
        fn new(spec: &str) -> Self {
            let dev = MockV1::new(&spec.parse().unwrap()).unwrap();
            let n = dev.device_info().unwrap().num_regions;
            let mig = (0..n)
                .filter_map(|i| query_region(&dev, i).ok())
                .find(|r| r.region_type() == Some((3, 1)))
                .unwrap();
            Self {
                dev,
                base: mig.offset,
            }
        }
        fn status(&self) -> MockStatus {
            self.dev.handle().status()
        }
        fn raw_state(&self) -> io::Result<u32> {
            let mut b = [0u8; 4];
            self.dev.read_at(&mut b, self.base)?;
            Ok(u32::from_le_bytes(b))
        }
        fn write_raw(&self, v: u32) -> io::Result<usize> {
            self.dev.write_at(&v.to_le_bytes(), self.base)
        }
        fn set(&self, bits: u32) -> io::Result<usize> {
            let cur = self.raw_state()?;
            self.write_raw((cur & !STATE_MASK) | bits)
        }
        fn r64(&self, off: u64) -> io::Result<u64> {
            let mut b = [0u8; 8];
            self.dev.read_at(&mut b, self.base + off)?;
            Ok(u64::from_le_bytes(b))
        }
        fn pending(&self) -> io::Result<u64> {
            self.r64(OFF_PENDING_BYTES)
        }
        fn data_offset(&self) -> io::Result<u64> {
            self.r64(OFF_DATA_OFFSET)
        }
        fn data_size(&self) -> io::Result<u64> {
            self.r64(OFF_DATA_SIZE)
        }
        fn read_data(&self, off: u64, len: usize) -> io::Result<Vec<u8>> {
            let mut v = vec![0u8; len];
            self.dev.read_at(&mut v, self.base + off)?;
            Ok(v)
        }
        fn set_data_size(&self, size: u64) -> io::Result<usize> {
            self.dev
                .write_at(&size.to_le_bytes(), self.base + OFF_DATA_SIZE)
        }
        /// One saving iteration through pread: stage, read. Consumed by the next pending read.
        fn next_tx(&self) -> io::Result<Vec<u8>> {
            let off = self.data_offset()?;
            let size = self.data_size()?;
            self.read_data(off, size as usize)
        }
        /// Saves everything (trapped reads), from the current saving state, then STOP.
        fn save_all(&self) -> Vec<Vec<u8>> {
            let mut txs = Vec::new();
            if self.status().state_raw & STATE_MASK == RUNNING {
                self.set(SAVING).unwrap();
            }
            while self.pending().unwrap() > 0 {
                txs.push(self.next_tx().unwrap());
            }
            self.set(0).unwrap();
            txs
        }
        fn load(&self, tx: &[u8]) -> io::Result<usize> {
            let off = self.data_offset()?;
            self.dev.write_at(tx, self.base + off)?;
            self.set_data_size(tx.len() as u64)
        }
        fn load_all(&self, txs: &[Vec<u8>]) {
            self.set(RESUMING).unwrap();
            for tx in txs {
                self.load(tx).unwrap();
            }
        }
    }

    const EINVAL: i32 = libc::EINVAL;
    const SMALL: &str = "mock:v1,size=10000,seed=5,chunk=2K,page=1024";

    #[test]
    fn regions_follow_the_vfio_pci_layout() {
        let d = Drv::new(SMALL);
        let info = d.dev.device_info().unwrap();
        assert_eq!(info.flags, VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
        assert_eq!(info.num_regions, 11);
        assert_eq!(d.base, 10 << 40);
        let bar0 = query_region(&d.dev, 0).unwrap();
        assert_eq!((bar0.size, bar0.offset, bar0.flags), (4096, 0, 3));
        assert_eq!(query_region(&d.dev, 7).unwrap().size, 0);
        assert_eq!(code(query_region(&d.dev, 8)), EINVAL);
        assert_eq!(code(query_region(&d.dev, 11)), EINVAL);
        let other = query_region(&d.dev, 9).unwrap();
        assert_eq!(other.region_type(), Some((1, 1)));
        assert_eq!(other.flags & 1, 1);
        let mig = query_region(&d.dev, 10).unwrap();
        // chunk=2K: the section defaults to the chunk rounded up to 4 KiB.
        assert_eq!(mig.size, 4096 + 4096);
        assert_eq!(mig.flags & 7, 7);
        assert_eq!(
            mig.sparse_areas().unwrap(),
            &[vfio_mig::backend::SparseArea {
                offset: 4096,
                size: 4096
            }][..]
        );
        // BAR0 is scratch; the unrelated region reads but refuses writes.
        d.dev.write_at(b"abc", 100).unwrap();
        let mut b = [0u8; 3];
        d.dev.read_at(&mut b, 100).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(d.dev.read_at(&mut [0u8; 8], 4092).unwrap(), 4);
        assert_eq!(code(d.dev.read_at(&mut b, 4096)), EINVAL);
        assert_eq!(d.dev.read_at(&mut [0u8; 8], 9 << 40).unwrap(), 8);
        assert_eq!(code(d.dev.write_at(&b, 9 << 40)), EINVAL);
        assert_eq!(code(d.dev.read_at(&mut b, 3 << 40)), EINVAL);
        // A short argsz gets the needed size back.
        let mut buf = vec![0u8; 32];
        write_pod(
            &mut buf,
            0,
            &vfio_region_info {
                argsz: 32,
                index: 10,
                ..Default::default()
            },
        );
        d.dev.region_info_raw(&mut buf).unwrap();
        assert!(read_pod::<vfio_region_info>(&buf, 0).unwrap().argsz > 32);
        buf[0] = 64; // argsz larger than the buffer
        assert_eq!(code(d.dev.region_info_raw(&mut buf)), EINVAL);
        assert_eq!(code(d.dev.region_info_raw(&mut [0u8; 8])), EINVAL);
        // Trapped: no mmap flag, no sparse areas, data at 64; region-index moves things.
        let d = Drv::new("mock:v1,size=4K,data=trapped,chunk=100,region-index=9");
        let mig = query_region(&d.dev, 9).unwrap();
        assert_eq!(mig.flags & 7, 3);
        assert_eq!(mig.sparse_areas(), None);
        assert_eq!(mig.size, 64 + 4096);
        assert_eq!(
            query_region(&d.dev, 10).unwrap().region_type(),
            Some((1, 2))
        );
        assert_eq!(code(d.dev.migration_flags()), libc::ENOTTY);
    }

    #[test]
    fn fields_only_at_native_width_and_alignment() {
        let d = Drv::new("mock:v1,size=4K,data=trapped,chunk=100");
        d.set(SAVING).unwrap();
        let b = d.base;
        let dev = &d.dev;
        for (off, len) in [
            (0, 8),
            (0, 2),
            (1, 4),
            (4, 4),
            (4, 8),
            (8, 4),
            (12, 8),
            (16, 4),
            (20, 8),
            (24, 16),
            (28, 8),
            (30, 4),
            (32, 4),
            (40, 8),
            (60, 8),
            (0, 32),
            (0, 0),
            (64 + 4090, 8),
            (64 + 4096, 1),
        ] {
            let mut buf = vec![0u8; len];
            assert_eq!(
                code(dev.read_at(&mut buf, b + off)),
                EINVAL,
                "read {off}+{len}"
            );
            assert_eq!(
                code(dev.write_at(&buf, b + off)),
                EINVAL,
                "write {off}+{len}"
            );
        }
        assert!(d.status().last_refusal.is_some());
        // Read-only fields.
        assert_eq!(code(dev.write_at(&5u64.to_le_bytes(), b + 8)), EINVAL);
        assert_eq!(code(dev.write_at(&64u64.to_le_bytes(), b + 16)), EINVAL);
        // The data section is reachable (here: nothing staged, so refused for that reason).
        assert_eq!(code(d.read_data(64, 1)), EINVAL);
        assert!(d
            .status()
            .last_refusal
            .unwrap()
            .contains("no transaction staged"));
    }

    #[test]
    fn state_writes_keep_reserved_bits_and_follow_the_arcs() {
        let d = Drv::new(SMALL);
        let initial = d.raw_state().unwrap();
        assert_eq!(initial, 0x8000_0100 | RUNNING);
        // Reserved bits must be written back as read.
        assert_eq!(code(d.write_raw(RUNNING)), EINVAL);
        assert_eq!(code(d.write_raw(initial | 0x10)), EINVAL);
        // Invalid and ERROR states cannot be requested.
        for bits in [0b101, 0b111, 0b110] {
            assert_eq!(code(d.set(bits)), EINVAL, "{bits:03b}");
        }
        // Same state is a no-op.
        d.set(RUNNING).unwrap();
        // Arcs: RUNNING -> STOP -> (not PRE-COPY) -> RUNNING -> RESUMING -> (not SAVING).
        d.set(0).unwrap();
        assert_eq!(code(d.set(RUNNING | SAVING)), EINVAL);
        d.set(RUNNING).unwrap();
        d.set(RESUMING).unwrap();
        assert_eq!(code(d.set(SAVING)), EINVAL);
        assert_eq!(code(d.set(0)), EINVAL);
        assert_eq!(d.raw_state().unwrap(), 0x8000_0100 | RESUMING);
        // PRE-COPY -> RESUMING is not an arc.
        let d = Drv::new(SMALL);
        d.set(RUNNING | SAVING).unwrap();
        assert_eq!(code(d.set(RESUMING)), EINVAL);
        d.set(RUNNING).unwrap();
    }

    #[test]
    fn a_paused_device_saves_through_stop_to_stop_and_copy() {
        // QEMU's vfio_save_setup() ORs SAVING into a stopped device: 000b -> 010b.
        let (src, dst) = (Drv::new(SMALL), Drv::new(SMALL));
        src.set(0).unwrap();
        src.set(SAVING).unwrap();
        let txs = src.save_all();
        assert_eq!(src.status().saves_completed, 1);
        dst.load_all(&txs);
        dst.set(RUNNING).unwrap();
        assert!(dst.status().resumed_ok);
    }

    #[test]
    fn error_is_left_only_by_reset() {
        let d = Drv::new("mock:v1,size=4K,chunk=1K,fail-at=state-write@2:error");
        d.set(0).unwrap();
        assert_eq!(code(d.set(RUNNING)), libc::EIO);
        let st = d.status();
        assert_eq!(st.state_raw & STATE_MASK, ERROR);
        assert_eq!(st.state_raw, 0x8000_0100 | 0b110);
        for bits in 0..8 {
            assert_eq!(code(d.set(bits)), EINVAL, "{bits:03b}");
        }
        assert_eq!(code(d.pending()), EINVAL);
        d.dev.reset().unwrap();
        assert_eq!(d.raw_state().unwrap(), 0x8000_0100 | RUNNING);
        assert_eq!(d.status().resets, 1);
        d.set(0).unwrap();
    }

    #[test]
    fn fields_outside_their_states_are_refused() {
        let d = Drv::new(SMALL);
        assert_eq!(code(d.pending()), EINVAL);
        assert_eq!(code(d.data_offset()), EINVAL);
        assert_eq!(code(d.data_size()), EINVAL);
        assert_eq!(code(d.set_data_size(16)), EINVAL);
        d.set(RESUMING).unwrap();
        assert_eq!(d.data_offset().unwrap(), 4096);
        assert_eq!(d.data_offset().unwrap(), 4096);
        assert_eq!(code(d.pending()), EINVAL);
        assert_eq!(code(d.data_size()), EINVAL);
        assert_eq!(code(d.read_data(4096, 4)), EINVAL);
        let d = Drv::new(SMALL);
        d.set(SAVING).unwrap();
        assert_eq!(code(d.set_data_size(16)), EINVAL);
        assert_eq!(code(d.dev.write_at(&[0u8; 4], d.base + 4096)), EINVAL);
    }

    #[test]
    fn staging_and_consuming() {
        let d = Drv::new(SMALL);
        d.set(SAVING).unwrap();
        // 10 pages of 1024 bytes (the last 784) + 11 packet headers, in 2032-byte payloads.
        let stream: u64 = 10_000 + 11 * 16;
        let txs = stream.div_ceil(2032);
        let p0 = d.pending().unwrap();
        assert_eq!(p0, stream + txs * 16);
        assert_eq!(code(d.data_size()), EINVAL, "nothing staged yet");
        assert_eq!(d.data_offset().unwrap(), 4096);
        assert_eq!(
            d.data_offset().unwrap(),
            4096,
            "repeated reads keep the same chunk"
        );
        assert_eq!(d.data_size().unwrap(), 2048);
        assert_eq!(d.data_size().unwrap(), 2048);
        assert_eq!(d.status().transactions_staged, 1);
        assert_eq!(d.status().staged, Some(2048));
        // Reads inside the staged range only.
        let tx = d.read_data(4096, 2048).unwrap();
        assert_eq!(&tx[..4], b"MTX1");
        assert_eq!(u32::from_le_bytes(tx[4..8].try_into().unwrap()), 0);
        assert_eq!(d.read_data(4096 + 100, 10).unwrap(), tx[100..110]);
        assert_eq!(code(d.read_data(4096 + 2040, 16)), EINVAL);
        // The next pending read consumes it: exactly data_size less.
        assert_eq!(d.pending().unwrap(), p0 - 2048);
        assert_eq!(d.status().staged, None);
        assert_eq!(d.status().transactions_saved, 1);
        assert_eq!(code(d.data_size()), EINVAL);
        assert_eq!(code(d.read_data(4096, 1)), EINVAL);
        // STOP is refused with data pending, and with a staged chunk not consumed.
        assert_eq!(code(d.set(0)), EINVAL);
        let mut sizes = 2048;
        loop {
            let size = d.next_tx().unwrap().len() as u64;
            sizes += size;
            if sizes == p0 {
                break;
            }
            d.pending().unwrap();
        }
        assert_eq!(code(d.set(0)), EINVAL, "last chunk staged, not consumed");
        assert_eq!(d.pending().unwrap(), 0);
        assert_eq!(code(d.data_offset()), EINVAL, "nothing pending");
        d.set(0).unwrap();
        let st = d.status();
        assert_eq!(st.saves_completed, 1);
        assert_eq!(st.transactions_saved, txs);
        assert_eq!(st.bytes_saved, p0);
    }

    #[test]
    fn precopy_to_stopcopy_keeps_the_staged_chunk_and_cancel_discards() {
        let d = Drv::new(SMALL);
        d.set(RUNNING | SAVING).unwrap();
        let p0 = d.pending().unwrap();
        let first = d.next_tx().unwrap();
        d.set(SAVING).unwrap();
        assert_eq!(d.data_size().unwrap(), first.len() as u64);
        assert_eq!(d.read_data(4096, first.len()).unwrap(), first);
        // Stop-copy adds the END packet (and its transaction header, maybe).
        assert!(d.pending().unwrap() >= p0 - first.len() as u64 + 16);
        d.next_tx().unwrap();
        // Cancel: back to RUNNING; a new save starts from scratch.
        d.set(RUNNING).unwrap();
        assert_eq!(d.status().staged, None);
        assert_eq!(code(d.pending()), EINVAL);
        d.set(RUNNING | SAVING).unwrap();
        assert_eq!(d.pending().unwrap(), p0);
        let again = d.next_tx().unwrap();
        assert_eq!(again, first, "same state, same first transaction");
    }

    fn roundtrip(spec: &str) {
        let src = Drv::new(spec);
        let dst = Drv::new(spec);
        let txs = src.save_all();
        dst.load_all(&txs);
        dst.set(RUNNING).unwrap();
        let st = dst.status();
        assert!(st.resumed_ok);
        assert_eq!(st.transactions_loaded, txs.len() as u64);
        assert_eq!(
            dst.dev.handle().state_digest(),
            src.dev.handle().state_digest()
        );
    }

    #[test]
    fn trapped_save_and_resume() {
        roundtrip("mock:v1,size=20000,seed=9,chunk=1000,data=trapped,page=700");
    }

    #[test]
    fn mmapped_save_and_resume_through_mmap() {
        let spec = "mock:v1,size=30000,seed=11,chunk=4K,section=8K";
        let src = Drv::new(spec);
        let dst = Drv::new(spec);
        let smap = src.dev.mmap(src.base + 4096, 8192, false).unwrap();
        let dmap = dst.dev.mmap(dst.base + 4096, 8192, true).unwrap();
        src.set(SAVING).unwrap();
        dst.set(RESUMING).unwrap();
        let mut n = 0;
        while src.pending().unwrap() > 0 {
            let off = src.data_offset().unwrap() - 4096;
            let size = src.data_size().unwrap();
            let mut chunk = vec![0u8; size as usize];
            smap.read(off as usize, &mut chunk).unwrap();
            let doff = dst.data_offset().unwrap() - 4096;
            dmap.write(doff as usize, &chunk).unwrap();
            dst.set_data_size(size).unwrap();
            n += 1;
        }
        src.set(0).unwrap();
        dst.set(RUNNING).unwrap();
        assert!(dst.status().resumed_ok);
        assert_eq!(dst.status().transactions_loaded, n);
        assert_eq!(
            dst.dev.handle().state_digest(),
            src.dev.handle().state_digest()
        );
    }

    #[test]
    fn mmap_is_refused_outside_the_sparse_area() {
        let d = Drv::new("mock:v1,size=4K,chunk=4K,section=8K");
        let b = d.base;
        assert_eq!(code(d.dev.mmap(b, 4096, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(b + 4096 + 8192, 4096, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(b + 8192, 8192, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(b + 4096 + 100, 100, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(b + 4096, 0, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(0, 4096, true)), EINVAL);
        assert!(d.dev.mmap(b + 8192, 4096, true).is_ok());
        let d = Drv::new("mock:v1,size=4K,chunk=4K,data=trapped");
        assert_eq!(code(d.dev.mmap(d.base + 64, 4096, true)), EINVAL);
        assert_eq!(code(d.dev.mmap(d.base + 4096, 4096, true)), EINVAL);
    }

    #[test]
    fn resume_checks_each_transaction() {
        let spec = "mock:v1,size=5000,seed=1,chunk=1K,data=trapped";
        let src = Drv::new(spec);
        let txs = src.save_all();
        assert!(txs.len() >= 4);
        let dst = Drv::new(spec);
        dst.set(RESUMING).unwrap();
        // A shorter size is the first piece of a split transaction (QEMU's v1
        // vfio_load_buffer); pieces running past the transaction's length are refused.
        let off = dst.data_offset().unwrap();
        dst.dev.write_at(&txs[0], dst.base + off).unwrap();
        dst.set_data_size(txs[0].len() as u64 - 1).unwrap();
        assert_eq!(code(dst.set_data_size(2)), EINVAL);
        assert!(dst
            .status()
            .last_refusal
            .unwrap()
            .contains("run past the transaction's length"));
        assert_eq!(code(dst.set_data_size(0)), EINVAL);
        assert_eq!(code(dst.set_data_size(1025)), EINVAL, "beyond the section");
        assert_eq!(code(dst.set_data_size(8)), EINVAL, "shorter than a header");
        dst.load(&txs[0]).unwrap();
        // Out of order.
        assert_eq!(code(dst.load(&txs[2])), EINVAL);
        assert!(dst
            .status()
            .last_refusal
            .unwrap()
            .contains("seq 2, expected 1"));
        // Corrupt payload, corrupt magic.
        let mut bad = txs[1].clone();
        bad[100] ^= 0x40;
        assert_eq!(code(dst.load(&bad)), EINVAL);
        assert!(dst.status().last_refusal.unwrap().contains("crc"));
        let mut bad = txs[1].clone();
        bad[0] = b'X';
        assert_eq!(code(dst.load(&bad)), EINVAL);
        // The refusals left no trace: the right transactions still complete the resume.
        for tx in &txs[1..] {
            dst.load(tx).unwrap();
        }
        dst.set(RUNNING).unwrap();
        assert!(dst.status().resumed_ok);
    }

    #[test]
    fn wrong_seed_fails_running_then_reset_recovers() {
        let src = Drv::new("mock:v1,size=5000,seed=1,chunk=2K");
        let dst = Drv::new("mock:v1,size=5000,seed=2,chunk=2K");
        let txs = src.save_all();
        dst.load_all(&txs);
        let st = dst.status();
        assert!(st.corrupt);
        assert_eq!(st.first_bad_page, Some(0));
        assert_eq!(code(dst.set(RUNNING)), EINVAL);
        let st = dst.status();
        assert_eq!(st.state_raw & STATE_MASK, ERROR);
        assert!(!st.resumed_ok);
        assert!(st.last_refusal.unwrap().contains("seed 2"));
        assert_eq!(code(dst.set(RUNNING)), EINVAL);
        assert_eq!(code(dst.set(RESUMING)), EINVAL);
        dst.dev.reset().unwrap();
        let st = dst.status();
        assert_eq!(st.state_raw & STATE_MASK, RUNNING);
        assert_eq!((st.resets, st.corrupt), (1, false));
        // The same destination now takes a good state.
        let good = Drv::new("mock:v1,size=5000,seed=2,chunk=2K");
        let txs = good.save_all();
        dst.load_all(&txs);
        dst.set(RUNNING).unwrap();
        assert!(dst.status().resumed_ok);
    }

    #[test]
    fn incomplete_state_fails_running() {
        let spec = "mock:v1,size=5000,seed=3,chunk=1K";
        let src = Drv::new(spec);
        let dst = Drv::new(spec);
        let txs = src.save_all();
        dst.load_all(&txs[..txs.len() - 1]);
        assert_eq!(code(dst.set(RUNNING)), EINVAL);
        assert_eq!(dst.status().state_raw & STATE_MASK, ERROR);
        assert!(dst.status().last_refusal.unwrap().contains("incomplete"));
    }

    #[test]
    fn dirty_rate_grows_pending_in_precopy() {
        let spec = "mock:v1,size=256K,seed=4,chunk=64K,page=1K,dirty-rate=10M";
        let src = Drv::new(spec);
        let dst = Drv::new(spec);
        src.set(RUNNING | SAVING).unwrap();
        // Drain the initial pass: dirtied pages queue behind it.
        let initial = src.pending().unwrap();
        let mut txs = Vec::new();
        let mut taken = 0;
        while taken < initial {
            txs.push(src.next_tx().unwrap());
            taken += txs.last().unwrap().len() as u64;
            src.pending().unwrap();
        }
        let low = src.pending().unwrap();
        let start = Instant::now();
        let mut high = low;
        while high <= low && start.elapsed().as_secs() < 2 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            high = src.pending().unwrap();
        }
        assert!(high > low, "pending {low} -> {high}");
        assert!(src.status().dirtied_pages > 0);
        // Stop-and-copy still converges and the destination verifies every dirtied page.
        src.set(SAVING).unwrap();
        while src.pending().unwrap() > 0 {
            txs.push(src.next_tx().unwrap());
        }
        src.set(0).unwrap();
        dst.load_all(&txs);
        dst.set(RUNNING).unwrap();
        assert!(dst.status().resumed_ok);
        assert_eq!(
            dst.dev.handle().state_digest(),
            src.dev.handle().state_digest()
        );
        assert_ne!(
            src.dev.handle().state_digest(),
            Drv::new(spec).dev.handle().state_digest()
        );
    }

    /// One repeatable access of a field.
    type Access = Box<dyn Fn(&Drv) -> io::Result<()>>;

    /// Puts the device where an access of `field` can be repeated, and returns the access.
    fn setup(field: FaultField, d: &Drv) -> Access {
        use FaultField::*;
        match field {
            Pending | DataOffset | DataSizeRead | DataRead => {
                d.set(SAVING).unwrap();
                d.data_offset().unwrap_or(0);
            }
            DataSizeWrite | DataWrite => {
                d.set(RESUMING).unwrap();
            }
            _ => {}
        }
        match field {
            StateRead => Box::new(|d| d.raw_state().map(drop)),
            StateWrite => Box::new(|d| d.write_raw(0x8000_0101).map(drop)),
            Pending => Box::new(|d| d.pending().map(drop)),
            DataOffset => Box::new(|d| d.data_offset().map(drop)),
            DataSizeRead => Box::new(|d| d.data_size().map(drop)),
            DataSizeWrite => Box::new(|d| d.set_data_size(16).map(drop)),
            DataRead => Box::new(|d| d.read_data(4096, 4).map(drop)),
            DataWrite => Box::new(|d| d.dev.write_at(&[1; 4], d.base + 4096).map(drop)),
            RegionInfo => Box::new(|d| query_region(&d.dev, 0).map(drop)),
            Mmap => Box::new(|d| d.dev.mmap(d.base + 4096, 4096, true).map(drop)),
            Reset => Box::new(|d| d.dev.reset()),
        }
    }

    #[test]
    fn each_fault_fires_on_exactly_the_nth_access() {
        for &field in FaultField::ALL {
            // The setup itself may access the field once (data-offset); count from there.
            let probe = Drv::new("mock:v1,size=8K,chunk=4K");
            let _ = setup(field, &probe);
            let before = probe.dev.shared.lock().faults.count(field);
            let n = before + 2;
            let d = Drv::new(&format!(
                "mock:v1,size=8K,chunk=4K,fail-at={field}@{n}:ETIMEDOUT"
            ));
            let access = setup(field, &d);
            for i in before + 1..=before + 3 {
                let got = code(access(&d));
                if i == n {
                    assert_eq!(got, libc::ETIMEDOUT, "{field} access {i}");
                } else {
                    assert_ne!(got, libc::ETIMEDOUT, "{field} access {i}");
                }
            }
            assert_eq!(d.status().fault_hits, 1, "{field}");
        }
    }

    #[test]
    fn an_error_fault_drops_the_device_into_error() {
        let d = Drv::new("mock:v1,size=8K,chunk=4K,fail-at=pending@1:error");
        d.set(SAVING).unwrap();
        assert_eq!(code(d.pending()), libc::EIO);
        assert_eq!(d.status().state_raw & STATE_MASK, ERROR);
        assert_eq!(code(d.set(RUNNING)), EINVAL);
        let d = Drv::new("mock:v1,size=8K,chunk=4K,fail-at=reset@1:error");
        assert_eq!(code(d.dev.reset()), libc::EIO);
        assert_eq!(d.status().state_raw & STATE_MASK, ERROR);
        d.dev.reset().unwrap();
        assert_eq!(d.status().state_raw & STATE_MASK, RUNNING);
    }
}
