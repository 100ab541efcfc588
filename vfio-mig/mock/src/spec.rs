// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mock device specification: `mock:v1[,opt=val...]` (or `mock:v2[,...]`).
//!
//! | option          | meaning                                                    | default      |
//! |-----------------|------------------------------------------------------------|--------------|
//! | `size=`         | total device state, with K/M/G/T suffixes                  | `64M`        |
//! | `seed=`         | seed of the content (decimal or `0x` hex)                  | `0`          |
//! | `chunk=`        | largest v1 transaction, header included; v2: fault block   | `1M`         |
//! | `section=`      | size of the data section, at least `chunk`                 | chunk, 4K up |
//! | `data=`         | `mmap` (sparse-mmap data section) or `trapped`             | `mmap`       |
//! | `page=`         | content page size                                          | `4096`       |
//! | `dirty-rate=`   | bytes per second dirtied while in pre-copy                 | `0`          |
//! | `reserved=`     | initial `device_state` bits 3-31                           | `0x80000100` |
//! | `region-index=` | index of the migration region (9 or more)                  | `10`         |
//! | `fail-at=`      | `FIELD@N[:ERRNO|:error]`, repeatable (see [`super::faults`]) | none       |
//! | `profile=`      | v2: a kernel driver to model: `mtty`, `mlx5`, `hisi`, `pds` | none (generic) |
//! |                 | (see [`super::v2::profile`]); sets the defaults of `flags`, `dma` |       |
//! | `flags=`        | v2: `VFIO_MIGRATION_*` (1 STOP_COPY, 2 P2P, 4 PRE_COPY)    | `0x7`        |
//! | `dma=`          | v2: `on`, or `off` (no DMA logging features: ENOTTY)       | `on`         |
//! | `dma-dirty=`    | v2: pages the device DMA-writes before each log report     | `0`          |
//! | `data-size-min=`| v2: least MIG_DATA_SIZE before STOP_COPY (an estimate far  | `0`          |
//! |                 | above the pre-copy data, as mlx5's whole-state estimate)   |              |
//! | `id=`           | a name shared across processes, `[A-Za-z0-9._-]`, 1 to 64: | none         |
//! |                 | the key of the device's lock and fencing state (`vfio_mig_fence`) |         |
//! | `rate=`         | bytes per second the device produces while saving (v2: on | unlimited    |
//! |                 | its data fd; v1: staging a chunk takes its share); `/s` allowed |         |
//! | `accept-rate=`  | bytes per second the resuming device takes in             | unlimited    |
//! | `latency=`      | device time per v1 chunk staged and per v2 state change    | `0`          |
//! |                 | (`us`, `ms` or `s` suffix, e.g. `5ms`)                     |              |
//! | `content=`      | `exact` (splitmix64 per word) or `fast` (one add per word, | `exact`      |
//! |                 | still verified exactly; see [`super::content::ContentKind`]) |            |
//! | `data-offset=`  | v1: `fixed` (every chunk at the section's start) or        | `fixed`      |
//! |                 | `moving` (chunk `n` at slot `n mod slots` of the section, as a |          |
//! |                 | driver with a ring of staging buffers; needs room for 2 chunks) |         |
//! | `areas=`        | v1: sparse mmap areas the data section is split into (1-8; | `1`          |
//! |                 | chunks that straddle two areas are reached with pread)     |              |
//! | `pending-slack=`| v1: bytes `pending_bytes` over-reports while saving (an    | `0`          |
//! |                 | estimate): once the data is out, a staged chunk has data_size 0 |         |
//! | `precopy-delay=`| v2: pre-copy data becomes readable this long after PRE_COPY | `0`         |
//! |                 | is entered (an asynchronous first save); reads meanwhile get |            |
//! |                 | ENOMSG while PRECOPY_INFO already counts the bytes         |              |
//! | `reinit-at=`    | v2, `profile=mlx5`: the N-th PRECOPY_INFO of a saving      | never        |
//! |                 | session finds the firmware re-initialised (new initial data, |            |
//! |                 | `VFIO_PRECOPY_INFO_REINIT` after the PRECOPY_INFOv2 opt-in) |             |
//! | `data-fd=`      | v2: `pipe` (fed by a thread) or `memfd` (the state in a    | `pipe`       |
//! |                 | sealed memfd, read at page-cache speed; stop-copy only,    |              |
//! |                 | docs/mock-device.md)                                  |              |
//!
//! `rate`, `accept-rate` and `latency` make a *bandwidth-modelled* device: it waits (see
//! [`super::pace`]) instead of computing, so several of them can be measured on a small
//! machine; with `content=fast` a device costs almost no CPU of its own.
//!
//! `section`, `data`, `reserved` and `region-index` are v1 options; a `mock:v2` spec refuses
//! them, as a `mock:v1` spec refuses the v2 ones. v2 `fail-at` rules name v2 fields
//! ([`super::faults::V2FaultRule`]); a v2 fault block is `chunk` bytes of a data fd's stream
//! (see [`super::v2`]).
//!
//! [`MockSpec`]'s `Display` prints a canonical form: protocol, `size` and `seed` always, every
//! other option only when it differs from its default, in the order of the table.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::content::{ContentKind, PACKET_HEADER};
use super::faults::{FaultRule, V2FaultField, V2FaultRule};
use super::v2::profile::{Behaviour, ProfileName};
use vfio_mig::Error;

/// Default total device state: 64 MiB.
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// Default largest v1 transaction (header included): 1 MiB.
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// Default content page size.
pub const DEFAULT_PAGE: u32 = 4096;
/// Default reserved bits 3-31 of `device_state`: not zero, so read-modify-write is tested.
pub const DEFAULT_RESERVED: u32 = 0x8000_0100;
/// Default index of the migration region (index 9 holds an unrelated region).
pub const DEFAULT_REGION_INDEX: u32 = 10;
/// The data section is sized in multiples of this (and mmapped in pages of this).
pub const SECTION_ALIGN: u64 = 4096;
/// Smallest transaction: the 16-byte header plus one payload byte.
pub const MIN_CHUNK: u64 = 17;
/// Largest transaction and data section (transaction lengths are u32 in the header).
pub const MAX_SECTION: u64 = 1 << 30;
/// First index of a vfio-pci device-specific region (`VFIO_PCI_NUM_REGIONS`).
pub const FIRST_DEVICE_REGION: u32 = 9;
/// Highest accepted region index, so the region table stays small.
pub const MAX_REGION_INDEX: u32 = 64;
/// Longest `id=` name.
pub const MAX_ID_LEN: usize = 64;
/// Default v2 migration flags: STOP_COPY | P2P | PRE_COPY, as mtty.
pub const DEFAULT_V2_FLAGS: u64 = 0x7;
/// The options only a `mock:v1` spec takes.
const V1_ONLY: [&str; 7] = [
    "section",
    "data",
    "reserved",
    "region-index",
    "data-offset",
    "areas",
    "pending-slack",
];
/// The options only a `mock:v2` spec takes.
const V2_ONLY: [&str; 8] = [
    "flags",
    "dma",
    "dma-dirty",
    "profile",
    "data-size-min",
    "precopy-delay",
    "reinit-at",
    "data-fd",
];
/// Most sparse mmap areas of the v1 data section (`areas=`).
pub const MAX_AREAS: u32 = 8;
/// Slots of a moving v1 `data_offset` start at multiples of this (not of a page, so that
/// chunks straddle the boundaries of several sparse areas).
pub const SLOT_ALIGN: u64 = 64;

/// Which migration protocol the mock speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The v1 migration region.
    V1,
    /// The v2 device feature and data fd ([`super::v2::MockV2`]).
    V2,
}

/// How the data section of the v1 migration region is accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataMode {
    /// Through a sparse-mmap area (data section page aligned, at region offset 4096).
    Mmap,
    /// Through pread/pwrite only (data section at region offset 64, not page aligned).
    Trapped,
}

/// What a v2 device's data fds are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataFd {
    /// Pipes, fed and drained by a thread of the device (every v2 feature of the mock).
    #[default]
    Pipe,
    /// Memfds and no thread: the state is read out of a sealed memfd at page-cache speed,
    /// as a kernel driver's data fd copies out of kernel memory (stop-copy only).
    Memfd,
}

/// A parsed mock device specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockSpec {
    /// The protocol.
    pub protocol: Protocol,
    /// Total device state in bytes.
    pub size: u64,
    /// Content seed.
    pub seed: u64,
    /// Largest v1 transaction in bytes, its header included.
    pub chunk: u64,
    /// Data section size in bytes (`>= chunk`).
    pub section: u64,
    /// Data section access.
    pub data: DataMode,
    /// Content page size in bytes.
    pub page: u32,
    /// Bytes per second dirtied while in pre-copy.
    pub dirty_rate: u64,
    /// Initial `device_state` bits 3-31 (bits 0-2 clear).
    pub reserved: u32,
    /// Index of the migration region.
    pub region_index: u32,
    /// Fault injection rules (v1).
    pub faults: Vec<FaultRule>,
    /// v2: the kernel driver the device models (`None`: the generic mock).
    pub profile: Option<ProfileName>,
    /// v2: the `VFIO_MIGRATION_*` flags the device reports.
    pub flags: u64,
    /// v2: whether the device offers DMA logging.
    pub dma: bool,
    /// v2: pages the device DMA-writes before each DMA logging report.
    pub dma_dirty: u64,
    /// Fault injection rules (v2).
    pub v2_faults: Vec<V2FaultRule>,
    /// v2: the least MIG_DATA_SIZE reports while the device is not yet in STOP_COPY
    /// (`data-size-min=`; 0: the exact remainder).
    pub data_size_min: u64,
    /// A name that identifies this mock across processes, for its lock and fencing state
    /// (`id=`); a mock without one is private to its process.
    pub id: Option<String>,
    /// Bytes per second the device produces while saving (`rate=`; 0: unlimited).
    pub rate: u64,
    /// Bytes per second the device takes in while resuming (`accept-rate=`; 0: unlimited).
    pub accept_rate: u64,
    /// Device time per v1 chunk staged and per v2 state change (`latency=`).
    pub latency: Duration,
    /// How the content's words are generated (`content=`).
    pub content: ContentKind,
    /// v1: whether `data_offset` moves from chunk to chunk (`data-offset=moving`).
    pub moving_offset: bool,
    /// v1: sparse mmap areas the data section is split into (`areas=`).
    pub areas: u32,
    /// v1: bytes `pending_bytes` reports above the data left (`pending-slack=`).
    pub pending_slack: u64,
    /// v2: delay before the pre-copy data becomes readable (`precopy-delay=`).
    pub precopy_delay: Duration,
    /// v2: the PRECOPY_INFO (1-based, per saving session) at which the device re-initialises
    /// (`reinit-at=`); `None`: never.
    pub reinit_at: Option<u64>,
    /// v2: what the data fds are (`data-fd=`).
    pub data_fd: DataFd,
}

impl Default for MockSpec {
    fn default() -> Self {
        Self {
            protocol: Protocol::V1,
            size: DEFAULT_SIZE,
            seed: 0,
            chunk: DEFAULT_CHUNK,
            section: default_section(DEFAULT_CHUNK),
            data: DataMode::Mmap,
            page: DEFAULT_PAGE,
            dirty_rate: 0,
            reserved: DEFAULT_RESERVED,
            region_index: DEFAULT_REGION_INDEX,
            faults: Vec::new(),
            profile: None,
            flags: DEFAULT_V2_FLAGS,
            dma: true,
            dma_dirty: 0,
            v2_faults: Vec::new(),
            data_size_min: 0,
            id: None,
            rate: 0,
            accept_rate: 0,
            latency: Duration::ZERO,
            content: ContentKind::Exact,
            moving_offset: false,
            areas: 1,
            pending_slack: 0,
            precopy_delay: Duration::ZERO,
            reinit_at: None,
            data_fd: DataFd::Pipe,
        }
    }
}

/// The default section for a chunk size: the chunk rounded up to 4 KiB.
pub fn default_section(chunk: u64) -> u64 {
    chunk.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

/// Parses a number: decimal or `0x` hex.
fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a byte count with an optional K/M/G/T suffix (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        b't' | b'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n = parse_number(digits)?;
    n.checked_mul(1u64 << shift)
}

/// Parses a duration: a number with a `us`, `ms` or `s` suffix, or `0`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let (digits, micros_per_unit) = if let Some(d) = s.strip_suffix("us") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix("ms") {
        (d, 1_000)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1_000_000)
    } else {
        return None;
    };
    let n: u64 = digits.parse().ok()?;
    Some(Duration::from_micros(n.checked_mul(micros_per_unit)?))
}

/// Prints a duration with the largest of `s`, `ms`, `us` that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let us = d.as_micros();
    if us == 0 {
        "0".into()
    } else if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else if us % 1_000 == 0 {
        format!("{}ms", us / 1_000)
    } else {
        format!("{us}us")
    }
}

/// Prints a byte count with the largest suffix that divides it exactly.
pub fn format_size(n: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{suffix}", n >> shift);
        }
    }
    n.to_string()
}

impl MockSpec {
    /// What the v2 device does where drivers differ: its profile's, or the generic mock's.
    pub fn behaviour(&self) -> Behaviour {
        self.profile
            .map_or_else(Behaviour::generic, ProfileName::behaviour)
    }

    /// The stride between the staging slots of a moving `data_offset`: a chunk, rounded up
    /// to [`SLOT_ALIGN`].
    pub fn slot_stride(&self) -> u64 {
        self.chunk.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
    }

    /// How many staging slots the data section holds (1 with a fixed `data_offset`).
    pub fn slots(&self) -> u64 {
        if self.moving_offset {
            (self.section / self.slot_stride()).max(1)
        } else {
            1
        }
    }

    /// Offset, from the data section's start, of the slot of transaction `seq`.
    pub fn slot_offset(&self, seq: u32) -> u64 {
        (u64::from(seq) % self.slots()) * self.slot_stride()
    }

    /// `data-fd=memfd` has no pre-copy, no pacing and no per-read fault point: a memfd
    /// cannot say "more later", and nothing of the device runs between the caller's reads.
    fn validate_memfd(&self) -> Result<(), String> {
        let why = if self.flags & crate::rules::v2_arcs::FLAG_PRE_COPY != 0 {
            "a device with PRE_COPY (give flags without 0x4, or a profile without it: xe, pds)"
        } else if self.rate != 0 {
            "option `rate` (nothing paces a memfd)"
        } else if self.accept_rate != 0 {
            "option `accept-rate` (nothing paces a memfd)"
        } else if self
            .v2_faults
            .iter()
            .any(|r| r.field == V2FaultField::DataRead)
        {
            "a `data-read` fault (nothing of the device runs between reads of a memfd)"
        } else {
            return Ok(());
        };
        Err(format!("option `data-fd=memfd`: not with {why}"))
    }

    /// Number of content pages (the last may be short).
    pub fn page_count(&self) -> u64 {
        self.size.div_ceil(u64::from(self.page))
    }

    fn validate(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("option `size`: must be at least 1 byte".into());
        }
        if self.data_fd == DataFd::Memfd {
            self.validate_memfd()?;
        }
        let b = self.behaviour();
        if let Some(max) = b.max_stream {
            let stream = (self.page_count() + 2) * PACKET_HEADER as u64 + self.size;
            if stream > max {
                return Err(format!(
                    "option `size`: {} bytes in {}-byte pages make a {stream}-byte state, more \
                     than the {max} bytes profile {} holds",
                    self.size,
                    self.page,
                    self.profile.map_or("", ProfileName::name)
                ));
            }
        }
        if self.reinit_at.is_some() && !b.reinit {
            return Err(format!(
                "option `reinit-at`: profile {} does not re-initialise its pre-copy data (only \
                 profile=mlx5 reports VFIO_PRECOPY_INFO_REINIT)",
                self.profile.map_or("(none)", ProfileName::name)
            ));
        }
        if !b.enters_error {
            if let Some(rule) = self.v2_faults.iter().find(|r| r.error_state) {
                return Err(format!(
                    "option `fail-at={rule}`: profile {} never enters ERROR (its driver has \
                     no path into it)",
                    self.profile.map_or("", ProfileName::name)
                ));
            }
        }
        if self.page == 0 || u64::from(self.page) > MAX_SECTION {
            return Err(format!(
                "option `page`: {} is not between 1 and {}",
                self.page,
                format_size(MAX_SECTION)
            ));
        }
        if self.page_count() >= u64::from(u32::MAX) {
            return Err(format!(
                "option `size`: {} bytes in {} byte pages is too many pages",
                self.size, self.page
            ));
        }
        if self.chunk < MIN_CHUNK || self.chunk > MAX_SECTION {
            return Err(format!(
                "option `chunk`: {} is not between {MIN_CHUNK} and {}",
                self.chunk,
                format_size(MAX_SECTION)
            ));
        }
        if self.section < self.chunk || self.section > MAX_SECTION {
            return Err(format!(
                "option `section`: {} must be at least chunk ({}) and at most {}",
                self.section,
                self.chunk,
                format_size(MAX_SECTION)
            ));
        }
        if self.data == DataMode::Mmap && self.section % SECTION_ALIGN != 0 {
            return Err(format!(
                "option `section`: {} is not a multiple of {SECTION_ALIGN}, required with data=mmap",
                self.section
            ));
        }
        if self.moving_offset && self.section < 2 * self.slot_stride() {
            return Err(format!(
                "option `data-offset`: a moving data_offset needs a section of at least two \
                 chunk slots ({} bytes), not {}",
                2 * self.slot_stride(),
                self.section
            ));
        }
        if self.areas == 0 || self.areas > MAX_AREAS {
            return Err(format!(
                "option `areas`: {} is not between 1 and {MAX_AREAS}",
                self.areas
            ));
        }
        if self.areas > 1
            && (self.data != DataMode::Mmap
                || self.section % (u64::from(self.areas) * SECTION_ALIGN) != 0)
        {
            return Err(format!(
                "option `areas`: {} areas need data=mmap and a section that is a multiple of \
                 {} bytes",
                self.areas,
                u64::from(self.areas) * SECTION_ALIGN
            ));
        }
        if self.reserved & crate::rules::v1_table::MASK != 0 {
            return Err(format!(
                "option `reserved`: {:#x} sets state bits 0-2; give bits 3-31 only",
                self.reserved
            ));
        }
        if !(FIRST_DEVICE_REGION..=MAX_REGION_INDEX).contains(&self.region_index) {
            return Err(format!(
                "option `region-index`: {} is not a device-specific region index \
                 ({FIRST_DEVICE_REGION}..={MAX_REGION_INDEX})",
                self.region_index
            ));
        }
        Ok(())
    }
}

impl FromStr for MockSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let usage = |msg: String| Error::InvalidInput(format!("mock spec `{s}`: {msg}"));
        let mut parts = s.split(',');
        let head = parts.next().unwrap_or_default();
        let protocol = match head {
            "mock:v1" => Protocol::V1,
            "mock:v2" => Protocol::V2,
            _ => {
                return Err(usage(format!(
                    "must start with `mock:v1` or `mock:v2`, not `{head}`"
                )))
            }
        };
        let mut spec = MockSpec {
            protocol,
            ..Default::default()
        };
        let mut seen: Vec<&str> = Vec::new();
        let mut section = None;
        for part in parts {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| usage(format!("option `{part}` is not NAME=VALUE")))?;
            if key != "fail-at" {
                if seen.contains(&key) {
                    return Err(usage(format!("option `{key}` given twice")));
                }
                seen.push(key);
            }
            match protocol {
                Protocol::V2 if V1_ONLY.contains(&key) => {
                    return Err(usage(format!("option `{key}` is for mock:v1 only")))
                }
                Protocol::V1 if V2_ONLY.contains(&key) => {
                    return Err(usage(format!("option `{key}` is for mock:v2 only")))
                }
                _ => {}
            }
            let bad = |what: &str| usage(format!("option `{key}`: `{value}` is not {what}"));
            let size = || parse_size(value).ok_or_else(|| bad("a size (e.g. 4096, 64K, 1M, 2G)"));
            match key {
                "size" => spec.size = size()?,
                "seed" => spec.seed = parse_number(value).ok_or_else(|| bad("a u64"))?,
                "chunk" => spec.chunk = size()?,
                "section" => section = Some(size()?),
                "data" => {
                    spec.data = match value {
                        "mmap" => DataMode::Mmap,
                        "trapped" => DataMode::Trapped,
                        _ => return Err(bad("`mmap` or `trapped`")),
                    }
                }
                "page" => {
                    spec.page = size()?
                        .try_into()
                        .map_err(|_| bad("a page size below 4G"))?
                }
                "dirty-rate" | "rate" | "accept-rate" => {
                    let v = value.strip_suffix("/s").unwrap_or(value);
                    let rate = parse_size(v)
                        .ok_or_else(|| bad("a rate in bytes per second (e.g. 10M)"))?;
                    match key {
                        "dirty-rate" => spec.dirty_rate = rate,
                        "rate" => spec.rate = rate,
                        _ => spec.accept_rate = rate,
                    }
                }
                "latency" => {
                    spec.latency = parse_duration(value)
                        .ok_or_else(|| bad("a duration with us, ms or s (e.g. 5ms)"))?
                }
                "content" => {
                    spec.content = match value {
                        "exact" => ContentKind::Exact,
                        "fast" => ContentKind::Fast,
                        _ => return Err(bad("`exact` or `fast`")),
                    }
                }
                "reserved" => {
                    spec.reserved = parse_number(value)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or_else(|| bad("a u32 (e.g. 0x80000100)"))?
                }
                "region-index" => {
                    spec.region_index =
                        value.parse().map_err(|_| bad("a region index (e.g. 10)"))?
                }
                "fail-at" if protocol == Protocol::V2 => spec.v2_faults.push(
                    value
                        .parse()
                        .map_err(|e| usage(format!("option `fail-at`: {e}")))?,
                ),
                "fail-at" => spec.faults.push(
                    value
                        .parse()
                        .map_err(|e| usage(format!("option `fail-at`: {e}")))?,
                ),
                "flags" => {
                    spec.flags = parse_number(value).ok_or_else(|| bad("a u64 (e.g. 0x7)"))?
                }
                "profile" => spec.profile = Some(value.parse().map_err(&usage)?),
                "dma" => {
                    spec.dma = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(bad("`on` or `off`")),
                    }
                }
                "id" => {
                    let ok = (1..=MAX_ID_LEN).contains(&value.len())
                        && value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                    if !ok {
                        return Err(bad("a name of 1 to 64 characters from [A-Za-z0-9._-]"));
                    }
                    spec.id = Some(value.to_owned())
                }
                "dma-dirty" => {
                    spec.dma_dirty = parse_number(value).ok_or_else(|| bad("a page count"))?
                }
                "data-size-min" => spec.data_size_min = size()?,
                "data-offset" => {
                    spec.moving_offset = match value {
                        "fixed" => false,
                        "moving" => true,
                        _ => return Err(bad("`fixed` or `moving`")),
                    }
                }
                "areas" => spec.areas = value.parse().map_err(|_| bad("an area count (1-8)"))?,
                "pending-slack" => spec.pending_slack = size()?,
                "precopy-delay" => {
                    spec.precopy_delay = parse_duration(value)
                        .ok_or_else(|| bad("a duration with us, ms or s (e.g. 50ms)"))?
                }
                "reinit-at" => {
                    spec.reinit_at = Some(
                        value
                            .parse()
                            .ok()
                            .filter(|&n: &u64| n >= 1)
                            .ok_or_else(|| bad("a PRECOPY_INFO count of at least 1"))?,
                    )
                }
                "data-fd" => {
                    spec.data_fd = match value {
                        "pipe" => DataFd::Pipe,
                        "memfd" => DataFd::Memfd,
                        _ => return Err(bad("`pipe` or `memfd`")),
                    }
                }
                _ => {
                    return Err(usage(format!(
                        "unknown option `{key}` (known: size, seed, chunk, section, data, page, \
                         dirty-rate, reserved, region-index, fail-at, id, rate, accept-rate, \
                         latency, content; v1: data-offset, areas, pending-slack; v2: profile, \
                         flags, dma, dma-dirty, data-size-min, precopy-delay, reinit-at, data-fd)"
                    )))
                }
            }
        }
        spec.section = section.unwrap_or_else(|| default_section(spec.chunk));
        // A profile's defaults give way to options given explicitly, wherever they came.
        let b = spec.behaviour();
        if !seen.contains(&"flags") {
            spec.flags = b.flags;
        }
        if !seen.contains(&"dma") {
            spec.dma = b.dma;
        }
        if let (Some(max), false) = (b.max_stream, seen.contains(&"size")) {
            // MATCH, one page header and END around the bytes of one page.
            spec.size = max - 3 * PACKET_HEADER as u64;
        }
        spec.validate().map_err(usage)?;
        Ok(spec)
    }
}

impl fmt::Display for MockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = MockSpec::default();
        let protocol = match self.protocol {
            Protocol::V1 => "v1",
            Protocol::V2 => "v2",
        };
        write!(
            f,
            "mock:{protocol},size={},seed={}",
            format_size(self.size),
            self.seed
        )?;
        if self.chunk != d.chunk {
            write!(f, ",chunk={}", format_size(self.chunk))?;
        }
        if self.section != default_section(self.chunk) {
            write!(f, ",section={}", format_size(self.section))?;
        }
        if self.data == DataMode::Trapped {
            write!(f, ",data=trapped")?;
        }
        if self.page != d.page {
            write!(f, ",page={}", self.page)?;
        }
        if self.dirty_rate != d.dirty_rate {
            write!(f, ",dirty-rate={}", format_size(self.dirty_rate))?;
        }
        if self.reserved != d.reserved {
            write!(f, ",reserved={:#x}", self.reserved)?;
        }
        if self.region_index != d.region_index {
            write!(f, ",region-index={}", self.region_index)?;
        }
        for rule in &self.faults {
            write!(f, ",fail-at={rule}")?;
        }
        let b = self.behaviour();
        if let Some(p) = self.profile {
            write!(f, ",profile={p}")?;
        }
        if self.flags != b.flags {
            write!(f, ",flags={:#x}", self.flags)?;
        }
        if self.dma != b.dma {
            write!(f, ",dma={}", if self.dma { "on" } else { "off" })?;
        }
        if self.dma_dirty != d.dma_dirty {
            write!(f, ",dma-dirty={}", self.dma_dirty)?;
        }
        for rule in &self.v2_faults {
            write!(f, ",fail-at={rule}")?;
        }
        if self.data_size_min != d.data_size_min {
            write!(f, ",data-size-min={}", format_size(self.data_size_min))?;
        }
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        if self.rate != d.rate {
            write!(f, ",rate={}", format_size(self.rate))?;
        }
        if self.accept_rate != d.accept_rate {
            write!(f, ",accept-rate={}", format_size(self.accept_rate))?;
        }
        if self.latency != d.latency {
            write!(f, ",latency={}", format_duration(self.latency))?;
        }
        if self.content != d.content {
            write!(f, ",content={}", self.content.name())?;
        }
        if self.moving_offset {
            write!(f, ",data-offset=moving")?;
        }
        if self.areas != d.areas {
            write!(f, ",areas={}", self.areas)?;
        }
        if self.pending_slack != d.pending_slack {
            write!(f, ",pending-slack={}", format_size(self.pending_slack))?;
        }
        if self.precopy_delay != d.precopy_delay {
            write!(f, ",precopy-delay={}", format_duration(self.precopy_delay))?;
        }
        if let Some(n) = self.reinit_at {
            write!(f, ",reinit-at={n}")?;
        }
        if self.data_fd == DataFd::Memfd {
            write!(f, ",data-fd=memfd")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultField;

    fn err(s: &str) -> String {
        s.parse::<MockSpec>().unwrap_err().to_string()
    }

    #[test]
    fn defaults() {
        let s: MockSpec = "mock:v1".parse().unwrap();
        assert_eq!(s, MockSpec::default());
        assert_eq!(s.size, 64 << 20);
        assert_eq!(s.section, 1 << 20);
        assert_eq!(s.reserved, 0x8000_0100);
        assert_eq!(s.to_string(), "mock:v1,size=64M,seed=0");
        let s: MockSpec = "mock:v2,seed=3".parse().unwrap();
        assert_eq!(s.protocol, Protocol::V2);
        assert_eq!(s.to_string(), "mock:v2,size=64M,seed=3");
    }

    #[test]
    fn a_profile_sets_defaults_that_explicit_options_override() {
        let s: MockSpec = "mock:v2,profile=hisi".parse().unwrap();
        assert_eq!((s.flags, s.dma), (0x5, false));
        assert_eq!(s.to_string(), "mock:v2,size=64M,seed=0,profile=hisi");
        let s: MockSpec = "mock:v2,flags=0x3,profile=mlx5,dma=off".parse().unwrap();
        assert_eq!((s.flags, s.dma), (0x3, false));
        let text = "mock:v2,size=64M,seed=0,profile=mlx5,flags=0x3,dma=off";
        assert_eq!(s.to_string(), text);
        assert_eq!(text.parse::<MockSpec>().unwrap(), s);
        let s: MockSpec = "mock:v2,profile=mtty,dma=off".parse().unwrap();
        assert_eq!(
            s.to_string(),
            "mock:v2,size=64M,seed=0,profile=mtty,dma=off"
        );
        assert!(err("mock:v2,profile=e1000").contains("unknown profile `e1000`"));
        // igb: without size=, the state fills the 1 KiB blob; a larger one is refused.
        let s: MockSpec = "mock:v2,profile=igb".parse().unwrap();
        assert_eq!(s.size, 976);
        assert!(err("mock:v2,profile=igb,size=2K").contains("1024 bytes profile igb holds"));
        assert!(err("mock:v2,profile=hisi,fail-at=reset@1:error").contains("never enters ERROR"));
        assert!(err("mock:v1,profile=mtty").contains("for mock:v2 only"));
    }

    #[test]
    fn every_option_parses_and_prints_back() {
        let text = "mock:v1,size=3G,seed=7,chunk=1000,section=8K,data=trapped,page=512,\
                    dirty-rate=10M,reserved=0x8,region-index=12,fail-at=pending@3,\
                    fail-at=state-write@2:error,fail-at=mmap@1:EAGAIN";
        let s: MockSpec = text.parse().unwrap();
        assert_eq!(s.size, 3 << 30);
        assert_eq!(s.seed, 7);
        assert_eq!(s.chunk, 1000);
        assert_eq!(s.section, 8192);
        assert_eq!(s.data, DataMode::Trapped);
        assert_eq!(s.page, 512);
        assert_eq!(s.dirty_rate, 10 << 20);
        assert_eq!(s.reserved, 8);
        assert_eq!(s.region_index, 12);
        assert_eq!(s.faults.len(), 3);
        assert_eq!(s.faults[1].field, FaultField::StateWrite);
        assert!(s.faults[1].error_state);
        assert_eq!(s.to_string(), text);
        assert_eq!(s.to_string().parse::<MockSpec>().unwrap(), s);
    }

    #[test]
    fn sizes_and_numbers() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("2M"), Some(2 << 20));
        assert_eq!(parse_size("0x10"), Some(16));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999999999999"), None);
        assert_eq!(parse_size("16777216T"), None);
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1536), "1536");
        assert_eq!(format_size(3 << 20), "3M");
        let s: MockSpec = "mock:v1,seed=0xff,dirty-rate=1K/s".parse().unwrap();
        assert_eq!(s.seed, 255);
        assert_eq!(s.dirty_rate, 1024);
    }

    #[test]
    fn id_parses_prints_and_is_checked() {
        let s: MockSpec = "mock:v1,id=vm1.gpu-0_a,fail-at=pending@3,seed=2"
            .parse()
            .unwrap();
        assert_eq!(s.id.as_deref(), Some("vm1.gpu-0_a"));
        assert_eq!(
            s.to_string(),
            "mock:v1,size=64M,seed=2,fail-at=pending@3,id=vm1.gpu-0_a"
        );
        assert_eq!(s.to_string().parse::<MockSpec>().unwrap(), s);
        assert!(err("mock:v1,id=").contains("option `id`"));
        assert!(err("mock:v1,id=a/b").contains("option `id`"));
        assert!(err(&format!("mock:v1,id={}", "x".repeat(65))).contains("option `id`"));
        assert!(err("mock:v1,id=a,id=b").contains("given twice"));
    }

    #[test]
    fn section_follows_chunk() {
        let s: MockSpec = "mock:v1,chunk=5000".parse().unwrap();
        assert_eq!(s.section, 8192);
        assert_eq!(s.to_string(), "mock:v1,size=64M,seed=0,chunk=5000");
        let s: MockSpec = "mock:v1,chunk=100,section=100,data=trapped"
            .parse()
            .unwrap();
        assert_eq!(s.section, 100);
        assert!(s.to_string().contains("section=100"));
    }

    #[test]
    fn bad_specs_name_the_option() {
        assert!(err("mock:v3").contains("must start with `mock:v1` or `mock:v2`"));
        assert!(err("/sys/bus/mdev").contains("must start with"));
        assert!(err("mock:v1,size").contains("option `size` is not NAME=VALUE"));
        assert!(err("mock:v1,size=12Q").contains("option `size`: `12Q` is not a size"));
        assert!(err("mock:v1,size=0").contains("option `size`"));
        assert!(err("mock:v1,seed=x").contains("option `seed`"));
        assert!(err("mock:v1,colour=red").contains("unknown option `colour`"));
        assert!(err("mock:v1,size=1M,size=2M").contains("option `size` given twice"));
        assert!(err("mock:v1,chunk=16").contains("option `chunk`"));
        assert!(err("mock:v1,chunk=64K,section=32K").contains("option `section`"));
        assert!(err("mock:v1,chunk=100,section=100").contains("required with data=mmap"));
        assert!(err("mock:v1,data=dma").contains("option `data`"));
        assert!(err("mock:v1,page=0").contains("option `page`"));
        assert!(err("mock:v1,size=1T,page=1").contains("too many pages"));
        assert!(err("mock:v1,reserved=0x5").contains("option `reserved`"));
        assert!(err("mock:v1,reserved=0x100000000").contains("option `reserved`"));
        assert!(err("mock:v1,region-index=8").contains("option `region-index`"));
        assert!(err("mock:v1,fail-at=nope@1").contains("option `fail-at`: unknown field"));
        assert!(err("mock:v1,dirty-rate=fast").contains("option `dirty-rate`"));
        assert!(err("mock:v2,data=trapped").contains("option `data` is for mock:v1 only"));
        assert!(err("mock:v2,region-index=9").contains("for mock:v1 only"));
        assert!(err("mock:v1,flags=7").contains("option `flags` is for mock:v2 only"));
        assert!(err("mock:v1,dma-dirty=3").contains("for mock:v2 only"));
        assert!(err("mock:v2,dma=maybe").contains("option `dma`"));
        assert!(err("mock:v2,flags=x").contains("option `flags`"));
        assert!(err("mock:v2,fail-at=pending@1").contains("unknown v2 field `pending`"));
        assert!(err("mock:v1,fail-at=set-state@1").contains("unknown field `set-state`"));
        // The message carries the whole spec, for the CLI's one-line error.
        assert!(err("mock:v1,size=0").starts_with("mock spec `mock:v1,size=0`"));
    }

    #[test]
    fn bandwidth_model_options_parse_and_print_back() {
        let text = "mock:v2,size=1G,seed=1,rate=300M,accept-rate=1G,latency=5ms,content=fast";
        let s: MockSpec = text.parse().unwrap();
        assert_eq!(s.rate, 300 << 20);
        assert_eq!(s.accept_rate, 1 << 30);
        assert_eq!(s.latency, Duration::from_millis(5));
        assert_eq!(s.content, ContentKind::Fast);
        assert_eq!(s.to_string(), text);
        assert_eq!(s.to_string().parse::<MockSpec>().unwrap(), s);
        let s: MockSpec = "mock:v1,rate=10M/s,latency=250us".parse().unwrap();
        assert_eq!((s.rate, s.latency), (10 << 20, Duration::from_micros(250)));
        assert_eq!(
            s.to_string(),
            "mock:v1,size=64M,seed=0,rate=10M,latency=250us"
        );
        let s: MockSpec = "mock:v1,latency=2s,content=exact".parse().unwrap();
        assert_eq!(s.to_string(), "mock:v1,size=64M,seed=0,latency=2s");
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("ms"), None);
        assert!(err("mock:v2,latency=5").contains("option `latency`"));
        assert!(err("mock:v2,rate=fast").contains("option `rate`"));
        assert!(err("mock:v2,accept-rate=x").contains("option `accept-rate`"));
        assert!(err("mock:v1,content=slow").contains("option `content`"));
    }

    #[test]
    fn v2_options_parse_and_print_back() {
        let text = "mock:v2,size=1M,seed=9,chunk=4K,dirty-rate=1M,flags=0x5,dma=off,dma-dirty=8,\
                    fail-at=set-state:STOP_COPY@1:error,fail-at=data-read@2:EPIPE";
        let s: MockSpec = text.parse().unwrap();
        assert_eq!(s.protocol, Protocol::V2);
        assert_eq!((s.flags, s.dma, s.dma_dirty), (5, false, 8));
        assert!(s.faults.is_empty());
        assert_eq!(s.v2_faults.len(), 2);
        assert_eq!(s.to_string(), text);
        assert_eq!(s.to_string().parse::<MockSpec>().unwrap(), s);
        let d: MockSpec = "mock:v2".parse().unwrap();
        assert_eq!((d.flags, d.dma, d.dma_dirty), (DEFAULT_V2_FLAGS, true, 0));
    }

    #[test]
    fn memfd_data_fds_round_trip_and_default_to_pipes() {
        let text = "mock:v2,size=8G,seed=1,profile=xe,data-fd=memfd";
        let s: MockSpec = text.parse().unwrap();
        assert_eq!(s.data_fd, DataFd::Memfd);
        assert_eq!(s.to_string(), text);
        assert_eq!(
            "mock:v2,data-fd=pipe".parse::<MockSpec>().unwrap().data_fd,
            DataFd::Pipe
        );
        assert_eq!("mock:v2".parse::<MockSpec>().unwrap().data_fd, DataFd::Pipe);
    }
}
