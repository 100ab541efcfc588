// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 mock mediated device: an in-process vendor driver implementing the v2 migration
//! uAPI (`VFIO_DEVICE_FEATURE` + data fd) the way the kernel's `mtty` sample does, behind the
//! same [`DeviceIo`] trait as a real device fd, with the checks of the kernel's VFIO core.
//!
//! # The feature ioctl
//!
//! The typed feature operations of [`DeviceIo`] (`migration_flags`, `set_mig_state`,
//! `dma_logging_start`, ...) are the GETs and SETs below; the argument buffer itself (its
//! `argsz`, flags and payload sizes) exists only between the real device and the kernel.
//! [`DeviceIo::probe_feature`] checks access as `vfio_check_feature`: a GET or SET the feature
//! does not offer is `EINVAL`, otherwise 0 without doing anything (and counting no fault).
//! Unknown features are `ENOTTY` (vfio-pci-core's answer; an mdev without a `device_feature`
//! op, such as mtty, answers `EINVAL`).
//!
//! | feature                  | access | answer                                             |
//! |--------------------------|--------|----------------------------------------------------|
//! | `MIGRATION` (1)          | GET    | `flags=` (default `0x7`: STOP_COPY, P2P, PRE_COPY) |
//! | `MIG_DEVICE_STATE` (2)   | GET    | the state                                          |
//! | `MIG_DEVICE_STATE` (2)   | SET    | walks to the state; `data_fd` or -1 (below)        |
//! | `DMA_LOGGING_START` (6)  | SET    | starts logging the ranges                          |
//! | `DMA_LOGGING_STOP` (7)   | SET    | stops logging (0 when not started)                 |
//! | `DMA_LOGGING_REPORT` (8) | GET    | reads and clears the log into the bitmap           |
//! | `MIG_DATA_SIZE` (9)      | GET    | profile: the whole state; else what STOP_COPY would still produce |
//! | `MIG_PRECOPY_INFOv2` (12)| SET    | opts in to valid `vfio_precopy_info.flags`; EINVAL without PRE_COPY |
//!
//! `dma=off` removes the three DMA logging features (`ENOTTY`, as the core without `log_ops`).
//!
//! # States
//!
//! A SET walks from the current state to the requested one as mtty's `set_state` does: it
//! takes [`next_state`] (the mock's own port of the
//! kernel's `vfio_mig_get_next_state`, so `EINVAL` for ERROR, for states the `flags` do not
//! support, for STOP_COPY -> PRE_COPY(_P2P) and for raw values above 7) and executes that single arc, again and again; the state advances arc by arc, so
//! a failing arc leaves the device in the state before it. A SET of the current state is a
//! no-op (even ERROR while in ERROR, as in mtty). The arcs:
//!
//! - RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY: a new saving data
//!   fd; STOP -> RESUMING: a new resuming data fd. Only the last arc of a walk may open one.
//! - PRE_COPY(_P2P) -> STOP_COPY: no new fd (-1); the stream goes on in the same fd.
//! - PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P, STOP_COPY -> STOP: the session ends;
//!   the mock closes its end (the caller reads what is buffered, then 0; with a profile the
//!   reads of that fd fail with ENODEV instead, as the drivers' do).
//! - RESUMING -> STOP: waits until the consumer has taken every byte written so far, then
//!   refuses (`EINVAL`, staying in RESUMING, every time until a reset) a stream whose framing
//!   broke. mtty refuses an incomplete stream here; the mock checks content and completeness
//!   when the device next *runs*:
//! - STOP -> RUNNING, RUNNING_P2P or STOP_COPY after a resume: the state received must verify
//!   ([`Decoder::verify_complete`]: the sender's seed, every page, END, digest); if not the
//!   arc fails with `EINVAL` and the device drops into ERROR, which only a reset leaves.
//! - the other arcs (RUNNING <-> RUNNING_P2P, RUNNING_P2P <-> STOP, PRE_COPY <-> PRE_COPY_P2P,
//!   and RUNNING <-> STOP without P2P) change nothing else.
//!
//! # Driver profiles
//!
//! `profile=NAME` ([`profile`]: mtty, mlx5, hisi, pds, xe, qat, virtio, igb) changes what
//! differs between drivers: the flags, DMA logging, MIG_DATA_SIZE, what pre-copy carries,
//! ENOMSG at the temporary end, asynchronous saving, where bad data is refused (inside
//! `write(2)` through [`DeviceIo::write_data`], or at RESUMING -> STOP, never when the device
//! runs), what RESUMING -> STOP checks, ENODEV on ended data fds, whether ERROR is reachable,
//! and igb's reset that does not leave RESUMING. The paragraphs below describe the generic
//! mock; `docs/mock-device.md` has the table per profile.
//!
//! # The data fd
//!
//! A real pipe: the caller gets one end, as its own descriptor (close-on-exec, blocking), and
//! a thread of the mock serves the other. A pipe is a byte stream like the kernel's data fd:
//! reads of any size (no minimum buffer), partial reads, `poll`, `splice`. For pre-copy's
//! temporary end the feeder closes its write end when the pre-copy data runs out, so the
//! caller reads 0 once the pipe is drained, and the device opens a new write end of the same
//! pipe (through `/proc/self/fd`, so pre-copy needs `/proc`) when more data appears, before the
//! ioctl that produced it returns: in STOP_COPY a 0 is always the true end. (A
//! `SOCK_SEQPACKET` pair carries 0-byte messages too, but silently drops the rest of a
//! datagram read into a smaller buffer.)
//!
//! - Saving: a feeder thread writes the [`Encoder`] stream (every page, then pages dirtied
//!   since they were sent). In PRE_COPY the device keeps running: each PRECOPY_INFO (and the
//!   arc into STOP_COPY) first dirties the pages `dirty-rate` accounts for since the last one.
//!   When the pre-copy data runs out the fd reads 0 (mtty's behaviour; the uAPI's ENOMSG
//!   cannot come out of a pipe: with `profile=mlx5` the device answers it through
//!   [`DeviceIo::read_data`], see [`profile`]), and more data may follow later. In STOP_COPY the fd yields the rest, END included, then 0.
//! - Resuming: a consumer thread reads the pipe into a [`Decoder`]. A framing error closes
//!   the mock's end, so the caller's next write fails with EPIPE (mtty fails the write with
//!   EFAULT; a pipe raises SIGPIPE too, which Rust programs ignore), and RESUMING -> STOP fails
//!   with EINVAL.
//!
//! With `data-fd=memfd` the data fds are memfds and no thread serves them (`memfd.rs`): the
//! device reads as fast as a kernel driver's data fd, for benchmarks of the engine.
//!
//! `VFIO_MIG_GET_PRECOPY_INFO` ([`DeviceIo::precopy_info`]) on the current saving fd answers
//! `initial_bytes` (of the first pass over all pages, not yet read) and `dirty_bytes` (the
//! rest not yet read) in PRE_COPY and PRE_COPY_P2P, `EINVAL` in other states (mtty), `ENODEV`
//! for an earlier saving fd during a newer pre-copy, and `ENOTTY` for any other fd, a resuming
//! fd included. `flags` is 0, except with `reinit-at=N` (profile mlx5): the N-th PRECOPY_INFO
//! of a saving session re-initialises the device (every page saved again) and, after the
//! PRECOPY_INFOv2 opt-in, answers `VFIO_PRECOPY_INFO_REINIT` with every unread byte as
//! initial bytes and 0 dirty bytes, as `mlx5vf_precopy_ioctl` does; without the opt-in the
//! same bytes are dirty bytes and `flags` stays 0.
//!
//! # Faults
//!
//! `fail-at=FIELD[:STATE]@N[:ERRNO|:error]` ([`V2FaultRule`](super::faults::V2FaultRule)) fails the N-th access of a
//! field (default `EIO`; `:error` also drops the device into ERROR), before any other rule:
//!
//! | field          | one access is                                 | the fault                  |
//! |----------------|-----------------------------------------------|----------------------------|
//! | `migration`    | a GET of MIGRATION                            | the ioctl fails            |
//! | `get-state`    | a GET of MIG_DEVICE_STATE                     | the ioctl fails            |
//! | `set-state`    | one arc of a SET (`:STATE`: arcs into STATE)  | the walk stops before it   |
//! | `data-size`    | a GET of MIG_DATA_SIZE                        | the ioctl fails            |
//! | `precopy-info` | a PRECOPY_INFO on the current saving fd       | the ioctl fails            |
//! | `data-read`    | a `chunk`-byte block of a saving stream       | see below                  |
//! | `data-write`   | a `chunk`-byte block of a resuming stream     | see below                  |
//! | `dma-logging`  | a GET or SET of DMA_LOGGING_START/REPORT/STOP | the ioctl fails            |
//! | `reset`        | a VFIO_DEVICE_RESET                           | the reset fails            |
//!
//! A pipe cannot fail a read or a write with a chosen errno, so the data faults act as a
//! driver that loses its data would: `data-read` stops the stream before the failing block
//! (the caller reads what came before, then the read fails with the errno: the mock's
//! `read_data` answers it where the pipe would say 0), after which PRECOPY_INFO fails with the errno
//! and so does, once, the next arc that would complete the save (into STOP_COPY, or
//! STOP_COPY -> STOP); `data-write` refuses the failing block and everything after (the
//! mock's end closes: the caller's writes fail with EPIPE) and RESUMING -> STOP fails with
//! the errno until a reset. With `:error` either drops the device into ERROR as it happens.
//!
//! # Reset
//!
//! `VFIO_DEVICE_RESET` ends any session (threads joined, the mock's ends closed), forgets a
//! resumed state, and leaves the device RUNNING with its seeded content at generation 0. DMA
//! logging and the PRECOPY_INFOv2 opt-in survive a reset (they are undone by closing the
//! device, which a mock never sees).
//!
//! # Example
//!
//! ```
//! use vfio_mig::backend::DeviceIo;
//! use vfio_mig_mock::{MockSpec, MockV2};
//! use vfio_mig::{backend::v2_feature as feature, backend::v2_state::MigState};
//!
//! let spec: MockSpec = "mock:v2,size=64K,seed=7".parse()?;
//! let (src, dst) = (MockV2::new(&spec)?, MockV2::new(&spec)?);
//! assert_eq!(feature::migration_flags(&src)?.bits(), 0x7);
//!
//! // RUNNING -> STOP_COPY: the device walks RUNNING_P2P and STOP itself; the last arc opens
//! // the data fd.
//! let out = feature::set_state(&src, MigState::StopCopy)?.and_then(|s| s.into_fd());
//! let input = feature::set_state(&dst, MigState::Resuming)?.and_then(|s| s.into_fd());
//! let (out, input) = (out.expect("a data fd"), input.expect("a data fd"));
//! let mut reader = std::fs::File::from(out);
//! let mut writer = std::fs::File::from(input);
//! std::io::copy(&mut reader, &mut writer)?; // up to the 0-byte read: the end of the state
//! drop(writer);
//! feature::set_state(&src, MigState::Stop)?;
//! feature::set_state(&dst, MigState::Running)?; // RESUMING -> STOP -> ... -> RUNNING
//! assert!(dst.handle().status().resumed_ok);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod dma;
mod memfd;
pub mod profile;
mod session;

use std::collections::VecDeque;
use std::io;
use std::mem::size_of;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    vfio_precopy_info, VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_MIGRATION, VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
    VFIO_PCI_VGA_REGION_INDEX, VFIO_PRECOPY_INFO_REINIT, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};

use super::content::{gen_digest, Content, Decoder, Encoder, SplitMix64, PACKET_HEADER};
use super::faults::{V2FaultField, V2FaultPlan};
use super::spec::{DataFd, MockSpec, Protocol};
use super::status::{Inspect, MockHandle, MockStatus};
use crate::pci::{answer_region_info, Bar0};
use crate::region_info::Region;
use crate::rules::v2_arcs::{
    self, is_pre_copy, next_state, ERROR, FLAG_PRE_COPY, PRE_COPY, PRE_COPY_P2P, RESUMING, RUNNING,
    RUNNING_P2P, STOP, STOP_COPY,
};
use vfio_mig::{
    backend::DataSession, backend::DeviceIdentity, backend::DeviceInfo, backend::DeviceIo,
    backend::DmaLoggingRange, backend::Mapping,
};

pub use dma::LOG_MAX_RANGES;
use dma::{DmaLog, MIN_DMA_LOG_PAGE};
use memfd::{FileSave, StateFile};
use profile::{Behaviour, WriteRefusal};
use session::{file_id, Faults, FeedOptions, FileId, LoadSession, SaveSession};

pub use crate::pci::{BAR0_SIZE, REGION_SHIFT};
/// Mixed into the seed for the generator choosing pages dirtied in pre-copy.
const DIRTY_RNG_SALT: u64 = 0xD1B5_4A32_D192_ED03;
/// Most pages dirtied by one catch-up, so a long pause cannot stall the device.
const MAX_DIRTY_PASSES: u64 = 2;
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`, under a name that can be a pattern.
const PRECOPY_INFO_V2: u32 = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2;
/// Earlier saving fds remembered, to answer ENODEV rather than ENOTTY for them.
const OLD_FDS: usize = 16;

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// The data session of the current streaming state.
#[derive(Debug)]
enum Session {
    Save(SaveSession),
    /// A stop-copy session over the device's state file (`data-fd=memfd`).
    SaveFile(FileSave),
    Load(LoadSession),
}

/// The device's state, behind the mutex.
#[derive(Debug)]
struct Inner {
    spec: MockSpec,
    /// What the device does where kernel drivers differ (its profile).
    behaviour: Behaviour,
    content: Content,
    /// `VFIO_MIGRATION_*` flags.
    flags: u64,
    /// The raw `enum vfio_device_mig_state` value (see [`v2_arcs`]).
    state: u32,
    /// The page generations (the device's state) while no save owns them.
    gens: Vec<u32>,
    session: Option<Session>,
    /// `data-fd=memfd`: the whole stop-copy stream of the state, ready to be read.
    state_file: Option<StateFile>,
    /// A resumed state that passed RESUMING -> STOP, verified when the device next runs.
    loaded: Option<Decoder>,
    faults: Faults,
    rng: SplitMix64,
    /// When pre-copy dirtying was last accounted, and the bytes short of a page.
    dirty_clock: (Instant, f64),
    precopy_v2: bool,
    /// The firmware re-initialised ([`Inspect::reinit`]): the next PRECOPY_INFO reports it.
    reinit_armed: bool,
    dma: Option<DmaLog>,
    bar0: Bar0,
    old_saving: VecDeque<FileId>,
    /// Resuming fds of ended sessions, to answer ENODEV for them where the driver does.
    old_resuming: VecDeque<FileId>,
    /// RESUMING -> STOP failed on a driver whose reset does not leave RESUMING (igb).
    resume_stuck: bool,
    status: MockStatus,
}

/// The shared inner state; the inspection handle holds it too.
#[derive(Debug)]
struct Shared(Mutex<Inner>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent-enough device for diagnostics.
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.sync();
        g
    }
}

impl Inspect for Shared {
    fn status(&self) -> MockStatus {
        let g = self.lock();
        let mut s = g.status.clone();
        s.state_raw = g.state;
        s.v2_state = Some(g.state);
        s.fault_hits = session::lock_faults(&g.faults).hits();
        s.precopy_info_v2 = g.precopy_v2;
        match &g.session {
            Some(Session::Save(save)) => {
                let st = save.lock();
                s.stream_pending = st.unwritten();
                s.bytes_saved += save.consumed(&st);
            }
            Some(Session::SaveFile(save)) => {
                s.stream_pending = save.remaining();
                s.bytes_saved += save.consumed();
            }
            Some(Session::Load(load)) => {
                let st = load.lock();
                s.bytes_loaded += st.received;
                s.corrupt = st.decoder.is_corrupt();
                s.first_bad_page = st.decoder.first_bad_page();
            }
            None => {}
        }
        if let Some(dma) = &g.dma {
            s.dma_logging = dma.active;
        }
        s
    }

    fn reinit(&self) {
        let mut g = self.lock();
        if g.spec.behaviour().reinit {
            g.reinit_armed = true;
        }
    }

    fn state_digest(&self) -> u32 {
        let g = self.lock();
        match &g.session {
            Some(Session::Save(save)) => gen_digest(save.lock().encoder.gens()),
            Some(Session::SaveFile(save)) => gen_digest(&save.gens),
            _ => gen_digest(&g.gens),
        }
    }

    fn dma_written(&self) -> Vec<u64> {
        self.lock()
            .dma
            .as_ref()
            .map(DmaLog::written)
            .unwrap_or_default()
    }
}

/// The v2 mock mediated device.
///
/// Cloning shares the device (like duplicating its fd). [`MockV2::handle`] gives a
/// [`MockHandle`] to inspect it while the code under test holds it as a `dyn DeviceIo`.
/// Dropping the last clone and handle stops its threads and closes its ends of any data fd.
#[derive(Clone)]
pub struct MockV2 {
    shared: Arc<Shared>,
    identity: DeviceIdentity,
}

impl std::fmt::Debug for MockV2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockV2")
            .field("instance", &self.identity.instance)
            .finish()
    }
}

impl MockV2 {
    /// Creates a device as `spec` describes (`spec.protocol` must be v2).
    pub fn new(spec: &MockSpec) -> io::Result<Self> {
        if spec.protocol != Protocol::V2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{spec}: not a v2 mock"),
            ));
        }
        let content = Content::new(spec.seed, spec.size, spec.page).with_kind(spec.content);
        let gens = vec![0; content.page_count() as usize];
        let behaviour = spec.behaviour();
        // The device's memory holds its state from the start, as a GPU's VRAM does.
        let state_file = match spec.data_fd {
            DataFd::Pipe => None,
            DataFd::Memfd => Some(StateFile::build(content, &gens, behaviour.match_header)?),
        };
        let inner = Inner {
            content,
            flags: spec.flags,
            state: RUNNING,
            gens,
            session: None,
            state_file,
            loaded: None,
            faults: Arc::new(Mutex::new(V2FaultPlan::new(&spec.v2_faults))),
            rng: SplitMix64::new(spec.seed ^ DIRTY_RNG_SALT),
            dirty_clock: (Instant::now(), 0.0),
            precopy_v2: false,
            reinit_armed: false,
            dma: None,
            bar0: Bar0::default(),
            old_saving: VecDeque::new(),
            old_resuming: VecDeque::new(),
            resume_stuck: false,
            status: MockStatus::default(),
            behaviour,
            spec: spec.clone(),
        };
        // A profile is another device model: its state does not load into another profile.
        let model = match spec.profile {
            Some(p) => format!("mock:v2-{p}"),
            None => "mock:v2".into(),
        };
        Ok(Self {
            shared: Arc::new(Shared(Mutex::new(inner))),
            identity: DeviceIdentity {
                model,
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
    /// Refuses with `EINVAL`, remembering why.
    fn refuse(&mut self, why: impl Into<String>) -> io::Error {
        let why = why.into();
        log::debug!("mock v2: refused: {why}");
        self.status.last_refusal = Some(why);
        errno(libc::EINVAL)
    }

    fn enter_error(&mut self) {
        self.state = ERROR;
    }

    /// Counts an access; fails it when a `fail-at` rule says so.
    fn fault(&mut self, field: V2FaultField, state: Option<u32>) -> io::Result<()> {
        let r = session::lock_faults(&self.faults).check(field, state);
        r.map_err(|hit| {
            if hit.error_state {
                self.enter_error();
            }
            self.status.last_refusal = Some(match state {
                Some(s) => format!("fail-at {field}:{}", v2_arcs::name(s)),
                None => format!("fail-at {field}"),
            });
            hit.to_io()
        })
    }

    /// Applies the `:error` of a data fault a session thread hit since the last look.
    fn sync(&mut self) {
        let error = match &self.session {
            Some(Session::Save(s)) => {
                let mut st = s.lock();
                let hit = st.failed.filter(|h| h.error_state && !st.error_applied);
                if hit.is_some() {
                    st.error_applied = true;
                }
                hit.is_some()
            }
            Some(Session::Load(s)) => {
                let mut st = s.lock();
                let hit = st.failed.filter(|h| h.error_state && !st.error_applied);
                if hit.is_some() {
                    st.error_applied = true;
                }
                hit.is_some()
            }
            // Nothing runs between the reads of a state file: no data fault to apply.
            Some(Session::SaveFile(_)) | None => false,
        };
        if error {
            self.status.last_refusal = Some("data fault: the device failed".into());
            self.enter_error();
        }
    }

    /// Ends the current session, folding its counters into the status. Returns the device
    /// state (page generations) of a saving session and whether the caller read all of it.
    fn end_session(&mut self) -> Option<(Vec<u32>, bool)> {
        match self.session.take()? {
            Session::Save(save) => {
                remember(&mut self.old_saving, save.id);
                let end = save.stop();
                self.status.bytes_saved += end.consumed;
                Some((end.encoder.into_gens(), end.complete))
            }
            Session::SaveFile(save) => {
                // Every session reads the same memfd: its fds are told apart by their ended
                // description (reads return 0), not by the file's identity.
                let end = save.end();
                self.status.bytes_saved += end.consumed;
                Some((end.gens, end.complete))
            }
            Session::Load(mut load) => {
                remember(&mut self.old_resuming, load.id);
                load.abort();
                self.status.bytes_loaded += load.lock().received;
                None
            }
        }
    }

    /// Ends the session and gives a saving session's state back to the device.
    fn drop_session(&mut self) {
        if let Some((gens, _)) = self.end_session() {
            self.gens = gens;
        }
    }

    fn is_running(&self) -> bool {
        v2_arcs::is_running(self.state)
    }

    /// The whole stream of the device's state: MATCH if the profile sends it, every page with
    /// its header, then END.
    fn full_stream(&self) -> u64 {
        let header = if self.behaviour.match_header {
            PACKET_HEADER as u64
        } else {
            0
        };
        header
            + u64::from(self.content.page_count()) * PACKET_HEADER as u64
            + self.content.size()
            + PACKET_HEADER as u64
    }

    // ---- VFIO_DEVICE_FEATURE -------------------------------------------------------------

    /// A PROBE of `feature` for `access`, as the kernel's `vfio_check_feature`: a GET or SET
    /// the feature does not offer is `EINVAL`, an unknown feature `ENOTTY`; counts no fault.
    fn probe(&mut self, feature: u32, access: u32) -> io::Result<()> {
        let (get, set) = match feature & VFIO_DEVICE_FEATURE_MASK {
            VFIO_DEVICE_FEATURE_MIGRATION | VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => (true, false),
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => (true, true),
            PRECOPY_INFO_V2 => {
                if self.flags & FLAG_PRE_COPY == 0 {
                    return Err(self.refuse("MIG_PRECOPY_INFOv2 without PRE_COPY"));
                }
                (false, true)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
                if self.spec.dma =>
            {
                (false, true)
            }
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT if self.spec.dma => (true, false),
            _ => return Err(errno(libc::ENOTTY)),
        };
        let asks_get = access & VFIO_DEVICE_FEATURE_GET != 0;
        let asks_set = access & VFIO_DEVICE_FEATURE_SET != 0;
        if (asks_get && !get) || (asks_set && !set) {
            return Err(errno(libc::EINVAL));
        }
        Ok(())
    }

    /// GET of MIGRATION.
    fn migration(&mut self) -> io::Result<u64> {
        self.fault(V2FaultField::Migration, None)?;
        Ok(self.flags)
    }

    /// GET of MIG_DEVICE_STATE.
    fn get_state(&mut self) -> io::Result<u32> {
        self.fault(V2FaultField::GetState, None)?;
        Ok(self.state)
    }

    /// GET of MIG_DATA_SIZE.
    fn get_data_size(&mut self) -> io::Result<u64> {
        match self.fault(V2FaultField::DataSize, None) {
            Err(e) if self.behaviour.data_size_error_as_length => {
                // xe_vfio_pci_get_data_size: the PF's -errno, stored unsigned, and success.
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                return Ok((errno as u64).wrapping_neg());
            }
            r => r?,
        }
        Ok(self.data_size())
    }

    /// SET of MIG_PRECOPY_INFOv2.
    fn enable_precopy_v2(&mut self) -> io::Result<()> {
        if self.flags & FLAG_PRE_COPY == 0 {
            return Err(self.refuse("MIG_PRECOPY_INFOv2 without PRE_COPY"));
        }
        self.precopy_v2 = true;
        Ok(())
    }

    /// The DMA logging features exist (`dma=on`), else `ENOTTY`, as the core without `log_ops`.
    fn dma_offered(&self) -> io::Result<()> {
        if self.spec.dma {
            Ok(())
        } else {
            Err(errno(libc::ENOTTY))
        }
    }

    /// SET of DMA_LOGGING_START.
    fn dma_start(&mut self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        self.dma_offered()?;
        self.fault(V2FaultField::DmaLogging, None)?;
        if self.dma.as_ref().is_some_and(|d| d.active) {
            return Err(self.refuse("DMA logging is already started"));
        }
        let max = self.behaviour.dma_max_ranges;
        let log = DmaLog::start(ranges, page_size, self.spec.seed, max).map_err(errno)?;
        let page = log.page;
        self.dma = Some(log);
        Ok(page)
    }

    /// SET of DMA_LOGGING_STOP.
    fn dma_stop(&mut self) -> io::Result<()> {
        self.dma_offered()?;
        self.fault(V2FaultField::DmaLogging, None)?;
        if let Some(d) = self.dma.as_mut() {
            d.stop();
        }
        Ok(())
    }

    /// GET of DMA_LOGGING_REPORT.
    fn dma_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        self.dma_offered()?;
        self.fault(V2FaultField::DmaLogging, None)?;
        if page_size < MIN_DMA_LOG_PAGE || !page_size.is_power_of_two() {
            return Err(self.refuse(format!("DMA log report page size {page_size}")));
        }
        if iova.checked_add(length).is_none() {
            return Err(errno(libc::EOVERFLOW));
        }
        // The trait's contract: a bitmap too short is refused (EINVAL) before the device
        // looks; the kernel would fault writing past the caller's bitmap.
        let need = dma::bitmap_words(length, page_size);
        if (bitmap.len() as u64) < need {
            let have = bitmap.len();
            return Err(self.refuse(format!(
                "DMA log report of {length} bytes at {page_size}-byte pages: a bitmap of \
                 {have} words, {need} needed"
            )));
        }
        if self.behaviour.dma_reports_nothing {
            // mtty_log_read_and_clear: returns 0, sets no bit, started or not.
            return Ok(());
        }
        let running = self.is_running();
        let n = self.spec.dma_dirty;
        let outside = self.behaviour.dma_report_in_one_range
            && self
                .dma
                .as_ref()
                .is_some_and(|d| d.active && !d.within_one_range(iova, length));
        if outside {
            // igb_pci_dirty_range_valid: "dirty sync outside tracked range".
            return Err(self.refuse(format!(
                "DMA log report of {iova:#x}+{length:#x}: not inside one tracked range"
            )));
        }
        let Some(log) = self.dma.as_mut().filter(|d| d.active) else {
            return Err(self.refuse("DMA log report while logging is stopped"));
        };
        // The device writes while it runs; a stopped device does no DMA.
        let wrote = if running { log.dma_write(n) } else { 0 };
        let bits = log.report(iova, length, page_size, bitmap).map_err(errno)?;
        self.status.dma_pages_dirtied += wrote;
        self.status.dma_bits_reported += bits;
        Ok(())
    }

    /// `MIG_DATA_SIZE`: a profile's driver reports its whole stop-copy state (mtty, mlx5's
    /// firmware total, hisi's and pds's constant); the generic mock what STOP_COPY would still
    /// produce. Before STOP_COPY either is at least `data-size-min=` (an estimate, as the uAPI
    /// allows).
    fn data_size(&mut self) -> u64 {
        let exact = self.exact_data_size();
        if self.state == STOP_COPY {
            exact
        } else {
            exact.max(self.spec.data_size_min)
        }
    }

    /// What the profile's MIG_DATA_SIZE or STOP_COPY would still produce, exactly.
    fn exact_data_size(&mut self) -> u64 {
        if self.behaviour.data_size_full {
            return self.full_stream();
        }
        if is_pre_copy(self.state) {
            self.apply_dirty();
        }
        match &self.session {
            Some(Session::Save(save)) => {
                let st = save.lock();
                let end = if st.encoder.is_finished() {
                    0
                } else {
                    PACKET_HEADER as u64
                };
                st.unwritten() + save.in_pipe(&st, None) + end
            }
            Some(Session::SaveFile(save)) => save.remaining(),
            _ => self.full_stream(),
        }
    }

    // ---- states and arcs -----------------------------------------------------------------

    /// A SET of MIG_DEVICE_STATE: walks to `target` one arc at a time, as mtty's
    /// `set_state`, each arc from the mock's own port of `vfio_mig_get_next_state`.
    fn set_state(&mut self, target: u32) -> io::Result<Option<OwnedFd>> {
        if self.state == ERROR && self.behaviour.error_errno != libc::EINVAL {
            // pds_vfio_set_device_state: in ERROR every request fails, before the core.
            self.status.last_refusal = Some("SET in ERROR: the device needs a reset".into());
            return Err(errno(self.behaviour.error_errno));
        }
        let mut fd = None;
        if self.state != target && !self.spec.latency.is_zero() {
            // A bandwidth-modelled device: the firmware takes this long for a state change
            // (the SET blocks meanwhile, as it does on mlx5 and hisi).
            std::thread::sleep(self.spec.latency);
        }
        while self.state != target {
            let cur = self.state;
            let next = match next_state(self.flags, cur, target) {
                Ok(n) => n,
                Err(e) => {
                    let (a, b) = (v2_arcs::name(cur), v2_arcs::name(target));
                    return Err(self.refuse(format!("{a} -> {b} ({target}): {e}")));
                }
            };
            self.fault(V2FaultField::SetState, Some(next))?;
            let opened = self.arc(cur, next)?;
            self.state = next;
            if let Some(f) = opened {
                if next != target {
                    // mtty WARNs: the kernel's table never opens a session midway.
                    drop(f);
                    let (a, b) = (v2_arcs::name(cur), v2_arcs::name(next));
                    return Err(self.refuse(format!("{a} -> {b} opened a data fd midway")));
                }
                self.status.data_fds += 1;
                fd = Some(f);
            }
        }
        Ok(fd)
    }

    /// One arc, as mtty's `step_state`: what the device does, and the data fd it opens.
    fn arc(&mut self, cur: u32, next: u32) -> io::Result<Option<OwnedFd>> {
        if cur == STOP && matches!(next, RUNNING | RUNNING_P2P | STOP_COPY) && self.loaded.is_some()
        {
            self.run_loaded(cur, next)?;
        }
        match (cur, next) {
            (RUNNING, PRE_COPY) | (RUNNING_P2P, PRE_COPY_P2P) => self.start_save(true).map(Some),
            (STOP, STOP_COPY) => self.start_save(false).map(Some),
            (PRE_COPY | PRE_COPY_P2P, STOP_COPY) => {
                self.save_failure()?;
                // The device ran until now: account for what it dirtied, then stop it.
                self.apply_dirty();
                // A re-initialisation no PRECOPY_INFO reported yet: the final SAVE carries
                // the device's new state all the same, now inside the downtime.
                let reinit = std::mem::take(&mut self.reinit_armed);
                if reinit {
                    self.status.reinits += 1;
                }
                if let Some(Session::Save(save)) = &self.session {
                    let mut st = save.lock();
                    if reinit {
                        st.encoder.dirty_all();
                    }
                    st.encoder.finish();
                    save.more_data(&mut st)?;
                }
                Ok(None)
            }
            (PRE_COPY, RUNNING) | (PRE_COPY_P2P, RUNNING_P2P) => {
                self.drop_session();
                Ok(None)
            }
            (STOP_COPY, STOP) => {
                self.save_failure()?;
                if self.behaviour.dma_off_at_stop {
                    // pds_vfio_dirty_disable: a later REPORT finds tracking off (EINVAL).
                    if let Some(d) = self.dma.as_mut() {
                        d.stop();
                    }
                }
                if let Some((gens, complete)) = self.end_session() {
                    self.gens = gens;
                    if complete {
                        self.status.saves_completed += 1;
                    }
                }
                Ok(None)
            }
            (STOP, RESUMING) => self.start_resume().map(Some),
            (RESUMING, STOP) => {
                self.finish_resume()?;
                Ok(None)
            }
            _ => Ok(None),
        }
    }

    /// Fails (once) an arc that would complete a save whose stream a `data-read` fault cut.
    fn save_failure(&mut self) -> io::Result<()> {
        let hit = match &self.session {
            Some(Session::Save(save)) => {
                let mut st = save.lock();
                match st.failed {
                    Some(hit) if !st.fail_reported => {
                        st.fail_reported = true;
                        Some(hit)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        match hit {
            Some(hit) => {
                self.status.last_refusal = Some("fail-at data-read: the save lost data".into());
                Err(hit.to_io())
            }
            None => Ok(()),
        }
    }

    fn start_save(&mut self, pre_copy: bool) -> io::Result<OwnedFd> {
        self.drop_session();
        if self.spec.data_fd == DataFd::Memfd {
            return self.start_file_save();
        }
        let mut encoder = Encoder::with_gens(self.content, std::mem::take(&mut self.gens));
        let b = self.behaviour;
        if b.precopy_empty {
            encoder = encoder.with_nothing_before_finish();
        } else if b.match_header {
            encoder = encoder.with_match_header(b.precopy_header_only);
        }
        if !pre_copy {
            encoder.finish();
        }
        let chunk = self.spec.chunk;
        let feed = FeedOptions {
            keep_open: b.enomsg || !self.spec.precopy_delay.is_zero(),
            latency: b.save_latency,
            rate: self.spec.rate,
            first_delay: self.spec.precopy_delay,
        };
        match SaveSession::start(encoder, pre_copy, chunk, self.faults.clone(), feed) {
            Ok((save, fd)) => {
                self.session = Some(Session::Save(save));
                self.dirty_clock = (Instant::now(), 0.0);
                Ok(fd)
            }
            Err(failed) => {
                let (encoder, e) = *failed;
                self.gens = encoder.into_gens();
                self.status.last_refusal = Some(format!("start a saving session: {e}"));
                Err(e)
            }
        }
    }

    /// STOP -> STOP_COPY with `data-fd=memfd`: a description of the state file, rebuilt
    /// first if the state changed since it was built (a resume, a reset).
    fn start_file_save(&mut self) -> io::Result<OwnedFd> {
        let file = match self.state_file.take() {
            Some(file) if file.holds(&self.gens) => Ok(file),
            _ => StateFile::build(self.content, &self.gens, self.behaviour.match_header),
        };
        let started = file.and_then(|file| {
            let file = self.state_file.insert(file);
            FileSave::start(file, &mut self.gens)
        });
        match started {
            Ok((save, fd)) => {
                self.session = Some(Session::SaveFile(save));
                Ok(fd)
            }
            Err(e) => {
                self.status.last_refusal = Some(format!("start a saving session: {e}"));
                Err(e)
            }
        }
    }

    fn start_resume(&mut self) -> io::Result<OwnedFd> {
        self.drop_session();
        // The resume overwrites the device's memory: its old stop-copy image is moot (and at
        // xe sizes, gigabytes of shared memory held beside the resuming memfd). The next
        // STOP_COPY builds the image again from whatever state the device then holds.
        self.state_file = None;
        self.loaded = None;
        self.status.resumed_ok = false;
        self.status.corrupt = false;
        self.status.first_bad_page = None;
        let decoder = Decoder::new(self.content);
        let (chunk, faults) = (self.spec.chunk, self.faults.clone());
        let (load, fd) = match self.spec.data_fd {
            DataFd::Pipe => LoadSession::start(decoder, chunk, faults, self.spec.accept_rate)?,
            DataFd::Memfd => LoadSession::start_file(decoder, chunk, faults)?,
        };
        self.session = Some(Session::Load(load));
        Ok(fd)
    }

    /// RESUMING -> STOP: takes everything written so far, then checks the stream's framing.
    fn finish_resume(&mut self) -> io::Result<()> {
        if self.resume_stuck {
            // igb: the VF was reset to RUNNING but the driver still says RESUMING; the
            // device refuses LOAD (BAD_STATE) until the device fd is closed.
            self.status.last_refusal =
                Some("RESUMING -> STOP refused: the device was reset under RESUMING".into());
            return Err(errno(self.behaviour.resume_errno));
        }
        let r = self.load_resumed();
        self.resume_stuck = r.is_err() && self.behaviour.reset_keeps_failed_resume;
        r
    }

    /// The checks and the load of RESUMING -> STOP.
    fn load_resumed(&mut self) -> io::Result<()> {
        let Some(Session::Load(load)) = self.session.as_mut() else {
            return Err(self.refuse("RESUMING without a resuming session"));
        };
        load.finish();
        let (failed, framing) = {
            let mut st = load.lock();
            let failed = st.failed;
            if failed.is_some_and(|h| h.error_state) {
                st.error_applied = true;
            }
            (failed, st.framing.clone())
        };
        if let Some(hit) = failed {
            if hit.error_state {
                self.enter_error();
            }
            self.status.last_refusal = Some("fail-at data-write: the resume lost data".into());
            return Err(hit.to_io());
        }
        let resume_errno = self.behaviour.resume_errno;
        // mlx5 and virtio refused a broken stream inside write() and check nothing here.
        let framing = framing.filter(|_| self.behaviour.complete_at_stop);
        if let Some(why) = framing {
            let e = self.refuse(format!("RESUMING -> STOP refused: state stream: {why}"));
            return Err(if resume_errno == libc::EINVAL {
                e
            } else {
                errno(resume_errno)
            });
        }
        let b = self.behaviour;
        if b.verify_at_stop() && b.complete_at_stop {
            // Real drivers load the state here (mtty_load_state, vf_qm_load_data, the pds
            // firmware) and fail the arc, staying in RESUMING, when it is unusable; hisi
            // takes only the match data, igb an empty stream, as loading nothing.
            let verdict = {
                let st = load.lock();
                let fed = st.decoder.bytes_fed();
                let nothing = (b.empty_loads_nothing && fed == 0)
                    || (b.match_only_loads_nothing
                        && fed == PACKET_HEADER as u64
                        && !st.decoder.header_refused());
                if nothing {
                    Ok(())
                } else {
                    st.decoder.verify_complete()
                }
            };
            if let Err(why) = verdict {
                let (corrupt, bad) = {
                    let st = load.lock();
                    (st.decoder.is_corrupt(), st.decoder.first_bad_page())
                };
                self.status.corrupt = corrupt;
                self.status.first_bad_page = bad;
                self.status.last_refusal = Some(format!("RESUMING -> STOP refused: {why}"));
                return Err(errno(resume_errno));
            }
        }
        let Some(Session::Load(load)) = self.session.take() else {
            unreachable!("checked above");
        };
        remember(&mut self.old_resuming, load.id);
        let decoder = {
            let st = load.lock();
            self.status.bytes_loaded += st.received;
            self.status.corrupt = st.decoder.is_corrupt();
            self.status.first_bad_page = st.decoder.first_bad_page();
            st.decoder.clone()
        };
        self.loaded = Some(decoder);
        Ok(())
    }

    /// STOP -> a running state (or STOP_COPY) after a resume: the state must verify, or the
    /// device fails (ERROR).
    fn run_loaded(&mut self, cur: u32, next: u32) -> io::Result<()> {
        let decoder = self.loaded.take().expect("called with a loaded state");
        match decoder.verify_complete() {
            Ok(()) => {
                self.gens = decoder.into_gens();
                self.status.resumed_ok = true;
                Ok(())
            }
            Err(why) if !self.behaviour.enters_error => {
                // The driver loaded what came (or nothing) and has no path into ERROR: the
                // device runs without the whole migrated state.
                log::warn!("mock v2: runs without a complete resumed state: {why}");
                self.status.ran_incomplete = true;
                Ok(())
            }
            Err(why) => {
                self.status.corrupt = decoder.is_corrupt();
                self.status.first_bad_page = decoder.first_bad_page();
                self.enter_error();
                let (a, b) = (v2_arcs::name(cur), v2_arcs::name(next));
                Err(self.refuse(format!("{a} -> {b} refused: resumed state: {why}")))
            }
        }
    }

    /// Dirties the pages the running device wrote since the last call (pre-copy only), and
    /// makes them readable.
    fn apply_dirty(&mut self) {
        let (last, carry) = self.dirty_clock;
        let now = Instant::now();
        let rate = self.spec.dirty_rate;
        let page = f64::from(self.content.page_size());
        let cap = u64::from(self.content.page_count()) * MAX_DIRTY_PASSES;
        let bytes = carry + rate as f64 * now.duration_since(last).as_secs_f64();
        let pages = (bytes / page).floor();
        self.dirty_clock = (now, bytes - pages * page);
        let pages = (pages as u64).min(cap);
        if pages == 0 {
            return;
        }
        let Some(Session::Save(save)) = &self.session else {
            return;
        };
        let mut st = save.lock();
        let before = st.encoder.dirtied_pages();
        st.encoder.dirty(pages, &mut self.rng);
        self.status.dirtied_pages += st.encoder.dirtied_pages() - before;
        if let Err(e) = save.more_data(&mut st) {
            log::warn!("mock v2: cannot reopen the pre-copy data pipe: {e}");
        }
    }

    // ---- VFIO_MIG_GET_PRECOPY_INFO ---------------------------------------------------------

    fn precopy_info(&mut self, fd: BorrowedFd<'_>) -> io::Result<vfio_precopy_info> {
        let id = file_id(fd)?;
        let current = matches!(&self.session, Some(Session::Save(s)) if s.id == id);
        if !current {
            if !self.old_saving.contains(&id) {
                return Err(errno(libc::ENOTTY));
            }
            if !is_pre_copy(self.state) {
                let why = format!("PRECOPY_INFO in {}", v2_arcs::name(self.state));
                return Err(self.refuse(why));
            }
            return Err(errno(libc::ENODEV));
        }
        self.fault(V2FaultField::PrecopyInfo, None)?;
        if !is_pre_copy(self.state) {
            let why = format!("PRECOPY_INFO in {}", v2_arcs::name(self.state));
            return Err(self.refuse(why));
        }
        if let Some(Session::Save(save)) = &self.session {
            if let Some(hit) = save.lock().failed {
                return Err(hit.to_io());
            }
        }
        self.apply_dirty();
        let reinit_at = self.spec.reinit_at;
        let v2 = self.precopy_v2;
        let armed = std::mem::take(&mut self.reinit_armed);
        let Some(Session::Save(save)) = &self.session else {
            unreachable!("checked above");
        };
        let mut st = save.lock();
        st.info_queries += 1;
        let reinit = armed || reinit_at == Some(st.info_queries);
        if reinit {
            // The firmware re-initialised: a new SAVE re-reads the whole device.
            st.encoder.dirty_all();
            if let Err(e) = save.more_data(&mut st) {
                log::warn!("mock v2: cannot reopen the pre-copy data pipe: {e}");
            }
        }
        let in_pipe = save.in_pipe(&st, Some(fd));
        let unread = st.unwritten() + in_pipe;
        let read = st.written.saturating_sub(in_pipe);
        let mut flags = 0;
        if reinit && v2 {
            // mlx5vf_precopy_ioctl with reinit_state: every byte not yet read (read-ahead
            // and the new SAVE) is initial data from the caller's position on, and the dirty
            // bytes restart at 0. Without the opt-in the same bytes count as dirty.
            st.initial_start = read;
            st.initial_total = unread;
            flags = VFIO_PRECOPY_INFO_REINIT;
        }
        let initial = (st.initial_start + st.initial_total)
            .saturating_sub(read)
            .min(unread);
        drop(st);
        if reinit {
            self.status.reinits += 1;
        }
        Ok(vfio_precopy_info {
            argsz: size_of::<vfio_precopy_info>() as u32,
            flags,
            initial_bytes: initial,
            dirty_bytes: unread - initial,
        })
    }

    // ---- the data fd hooks (DeviceIo::read_data / write_data) -----------------------------

    /// Before a read of a data fd: ENOMSG when the profile answers it at pre-copy's temporary
    /// end (nothing unread, nothing being produced), as `mlx5vf_save_read` does. Otherwise the
    /// caller reads the fd itself (blocking until asynchronous data arrives).
    ///
    /// With `precopy-delay=`, reads before the first save completes get ENOMSG as well: the
    /// uAPI lets a driver answer ENOMSG whenever no data is ready in PRE_COPY, and the user
    /// then waits with poll(2), which the mock's pipe answers when the data lands.
    fn read_gate(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if self.behaviour.ended_fd_enodev && self.old_saving.contains(&file_id(fd)?) {
            self.status.last_refusal = Some("read of an ended session's data fd".into());
            return Err(errno(libc::ENODEV));
        }
        let delayed = !self.spec.precopy_delay.is_zero();
        if !(self.behaviour.enomsg || delayed) || !is_pre_copy(self.state) {
            return Ok(());
        }
        let Some(Session::Save(save)) = &self.session else {
            return Ok(());
        };
        if save.id != file_id(fd)? {
            return Ok(());
        }
        let st = save.lock();
        let temporary_end = self.behaviour.enomsg && st.unwritten() == 0;
        let no_data = st.failed.is_none() && save.in_pipe(&st, Some(fd)) == 0;
        if no_data && (temporary_end || st.delayed()) {
            drop(st);
            self.status.enomsg_reads += 1;
            return Err(errno(libc::ENOMSG));
        }
        Ok(())
    }

    /// A write into the resuming data fd, for a profile whose driver checks data inside
    /// write(2): the bytes go straight to the decoder and a refusal is this write's errno.
    /// `None`: not such a profile or not this session's fd; the caller writes the fd.
    /// The end of a saving stream: a save that lost its data fails the read with the fault's
    /// errno once what came before was read, as the drivers' read handlers do when their
    /// save failed (mlx5's `MLX5_MIGF_STATE_ERROR`, hisi's and pds's error returns), so the
    /// caller never takes a cut stream for a whole one.
    fn read_end(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let Some(Session::Save(save)) = &self.session else {
            return Ok(());
        };
        if save.id != file_id(fd)? {
            return Ok(());
        }
        let failed = save.lock().failed;
        match failed {
            Some(hit) => Err(hit.to_io()),
            None => Ok(()),
        }
    }

    fn write_direct(&mut self, fd: BorrowedFd<'_>, buf: &[u8]) -> Option<io::Result<usize>> {
        let b = self.behaviour;
        let id = file_id(fd).ok()?;
        if b.ended_fd_enodev && self.old_resuming.contains(&id) {
            self.status.last_refusal = Some("write of an ended session's data fd".into());
            return Some(Err(errno(libc::ENODEV)));
        }
        if b.write_refusal.is_none() && b.write_limit.is_none() {
            return None;
        }
        let full = self.full_stream();
        let Some(Session::Load(load)) = &self.session else {
            return None;
        };
        if id != load.id {
            return None;
        }
        let st = load.lock();
        if let Some(e) = st.refused {
            return Some(Err(errno(e)));
        }
        if let Some(hit) = st.failed {
            return Some(Err(hit.to_io()));
        }
        if let Some(e) = b.write_limit {
            if st.received + buf.len() as u64 > full {
                let had = st.received;
                drop(st);
                self.status.last_refusal = Some(format!(
                    "data fd write of {} bytes after {had}: past the {full}-byte state",
                    buf.len()
                ));
                return Some(Err(errno(e)));
            }
        }
        drop(st);
        let mut st = load.take_direct(buf);
        if let Some(hit) = st.failed {
            return Some(Err(hit.to_io()));
        }
        let refused = match b.write_refusal {
            None => None,
            Some(WriteRefusal::HeaderOnly(e)) => st.decoder.header_refused().then_some((e, e)),
            // Another device's MATCH packet is well formed: xe's PF queues it, and the
            // restore refuses it at RESUMING -> STOP.
            Some(WriteRefusal::Framing(e)) => {
                (st.framing.is_some() && !st.decoder.header_refused()).then_some((e, e))
            }
            Some(WriteRefusal::Everything { framing, content }) => {
                if st.framing.is_some() {
                    Some((framing, libc::ENODEV))
                } else if st.decoder.is_corrupt() {
                    Some((content, libc::ENODEV))
                } else {
                    None
                }
            }
        };
        let why = st.framing.clone();
        if let Some((now, later)) = refused {
            st.refused = Some(later);
            drop(st);
            self.status.last_refusal = Some(format!(
                "data fd write refused: {}",
                why.unwrap_or_else(|| "a page does not match this device".into())
            ));
            return Some(Err(errno(now)));
        }
        Some(Ok(buf.len()))
    }

    // ---- reset and regions ---------------------------------------------------------------

    fn reset(&mut self) -> io::Result<()> {
        self.fault(V2FaultField::Reset, None)?;
        if self.resume_stuck {
            // igb: the VF resets, igb-vfio-pci's mig_state and resuming file stay.
            self.gens = vec![0; self.content.page_count() as usize];
            self.status.resets += 1;
            return Ok(());
        }
        self.drop_session();
        self.loaded = None;
        self.state = RUNNING;
        self.gens = vec![0; self.content.page_count() as usize];
        self.rng = SplitMix64::new(self.spec.seed ^ DIRTY_RNG_SALT);
        self.status.resumed_ok = false;
        self.status.corrupt = false;
        self.status.first_bad_page = None;
        self.status.resets += 1;
        Ok(())
    }

    fn region(&self, index: u32) -> Option<Region> {
        let (flags, size) = if index == VFIO_PCI_BAR0_REGION_INDEX {
            (
                VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                BAR0_SIZE,
            )
        } else if index < VFIO_PCI_VGA_REGION_INDEX {
            (0, 0)
        } else {
            return None;
        };
        Some(Region {
            flags,
            size,
            offset: u64::from(index) << REGION_SHIFT,
            caps: vec![],
        })
    }

    fn region_info_raw(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let answer = answer_region_info(buf, |index| self.region(index));
        answer.map_err(|why| self.refuse(why))
    }

    /// Refuses (`EINVAL`) an access at device offset `offset` outside BAR0, the v2 mock's
    /// only region with data.
    fn check_bar0(&mut self, offset: u64) -> io::Result<()> {
        if Bar0::holds(offset) {
            Ok(())
        } else {
            Err(self.refuse(format!(
                "access at device offset {offset:#x}: no such region data"
            )))
        }
    }
}

fn remember(list: &mut VecDeque<FileId>, id: FileId) {
    if list.len() == OLD_FDS {
        list.pop_front();
    }
    list.push_back(id);
}

impl DeviceIo for MockV2 {
    fn identity(&self) -> DeviceIdentity {
        self.identity.clone()
    }

    fn device_info(&self) -> io::Result<DeviceInfo> {
        Ok(DeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
        })
    }

    fn region_info_raw(&self, buf: &mut [u8]) -> io::Result<()> {
        self.shared.lock().region_info_raw(buf)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut g = self.shared.lock();
        g.check_bar0(offset)?;
        Ok(g.bar0.read(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        let mut g = self.shared.lock();
        g.check_bar0(offset)?;
        Ok(g.bar0.write(buf, offset))
    }

    fn mmap(&self, offset: u64, _len: usize, _writable: bool) -> io::Result<Mapping> {
        Err(self.shared.lock().refuse(format!(
            "mmap at {offset:#x}: the v2 mock has nothing mmappable"
        )))
    }

    fn reset(&self) -> io::Result<()> {
        self.shared.lock().reset()
    }

    fn probe_feature(&self, feature: u32, access: u32) -> io::Result<()> {
        self.shared.lock().probe(feature, access)
    }

    fn migration_flags(&self) -> io::Result<u64> {
        self.shared.lock().migration()
    }

    fn mig_state(&self) -> io::Result<u32> {
        self.shared.lock().get_state()
    }

    fn set_mig_state(&self, state: u32) -> io::Result<Option<DataSession>> {
        Ok(self
            .shared
            .lock()
            .set_state(state)?
            .map(DataSession::from_fd))
    }

    fn mig_data_size(&self) -> io::Result<u64> {
        self.shared.lock().get_data_size()
    }

    fn enable_precopy_info_v2(&self) -> io::Result<()> {
        self.shared.lock().enable_precopy_v2()
    }

    fn dma_logging_start(&self, ranges: &[DmaLoggingRange], page_size: u64) -> io::Result<u64> {
        self.shared.lock().dma_start(ranges, page_size)
    }

    fn dma_logging_stop(&self) -> io::Result<()> {
        self.shared.lock().dma_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> io::Result<()> {
        self.shared
            .lock()
            .dma_report(iova, length, page_size, bitmap)
    }

    fn precopy_info(&self, session: &DataSession) -> io::Result<vfio_precopy_info> {
        self.shared.lock().precopy_info(session.require_fd()?)
    }

    fn read_data(&self, session: &DataSession, buf: &mut [u8]) -> io::Result<usize> {
        let data_fd = session.require_fd()?;
        self.shared.lock().read_gate(data_fd)?;
        // The read itself runs unlocked: it may wait for the feeder.
        let n = nix::unistd::read(data_fd, buf)?;
        if n == 0 && !buf.is_empty() {
            self.shared.lock().read_end(data_fd)?;
        }
        Ok(n)
    }

    fn write_data(&self, session: &DataSession, buf: &[u8]) -> io::Result<usize> {
        let data_fd = session.require_fd()?;
        if let Some(r) = self.shared.lock().write_direct(data_fd, buf) {
            return r;
        }
        Ok(nix::unistd::write(data_fd, buf)?)
    }
}
