// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a migration: bytes pushed as they arrive, every device loaded, then
//! run in a call of its own, after the VMM's restore steps.

use std::io::Read;

use crate::engine::loader::{check_compatible, DeviceLoader, LoadReport};
use crate::engine::multi::check_unit;
use crate::engine::parallel::each;
use crate::engine::run::run_unit;
use crate::engine::{NoObserver, Observer};
use crate::error::{Error, Report, Result};
use crate::migration::MigrationDevice;
use crate::stream::format::{header_frame_len, record_frame_len, RECORD_HEADER_LEN};
use crate::stream::{FrameDecoder, Phase, Record};

use super::handback::{as_refs, fold, Handback};
use super::options::DestinationOptions;

/// Record payloads batched per push before they are applied to the devices (in parallel
/// when several devices have records in the batch).
const BATCH_BYTES: usize = 8 << 20;

/// Where a destination is after a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Status {
    /// The stream is not complete yet: push more.
    NeedMore,
    /// The trailer verified and every device took its state; none runs yet. The VMM does its
    /// own restore steps, then calls [`Destination::run`].
    Loaded,
}

/// Where a destination is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// No header yet: the devices are untouched.
    Waiting,
    /// Loading: the devices are resuming.
    Loading,
    /// Loaded, not running.
    Loaded,
    /// Ran, failed or was abandoned: the devices are back in the VMM's hands.
    Ended,
}

/// One record, as a device's loader applies it: a DATA record's bytes where they arrived
/// (the pushed bytes, or the inbox for a record split across pushes).
enum Item<'a> {
    Data {
        phase: Phase,
        bytes: &'a [u8],
        chunk_end: bool,
    },
    EndOfPhase(Phase),
}

/// The destination side of a migration of one or several devices, as one unit.
///
/// Feed it the stream as it arrives ([`push`](Self::push), in pieces of any size, or
/// [`read_from`](Self::read_from)); every device enters RESUMING only once the header matched
/// it, and the devices load in parallel. Once the trailer verified, every device takes its
/// state (v2 RESUMING -> STOP, where drivers refuse bad data) and none runs:
/// [`Status::Loaded`]. The VMM then restores what is its own (PCI command register,
/// interrupts) and calls [`run`](Self::run).
///
/// Any failure before `run`, and dropping the destination before `run`, resets every device
/// it touched: none ever runs partial or unchecked state.
pub struct Destination<D: MigrationDevice> {
    devs: Vec<D>,
    stage: Stage,
    /// The start of a header or record that earlier pushes brought only part of.
    inbox: Vec<u8>,
    decoder: Option<FrameDecoder>,
    loaders: Vec<DeviceLoader<'static>>,
    /// Per device: whether the header says it comes with pre-copy data.
    live: Vec<bool>,
    /// Per device: whether its END_OF_PHASE(PRE_COPY) was applied.
    pre_copy_ended: Vec<bool>,
    /// END_OF_PHASE(PRE_COPY) records of devices whose pre-copy had already ended (a device
    /// that re-initialised its pre-copy data, REINIT), not yet taken by the session layer.
    reloaded: usize,
}

impl<D: MigrationDevice> std::fmt::Debug for Destination<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<String> = self.devs.iter().map(|d| d.identity().instance).collect();
        f.debug_struct("Destination")
            .field("devices", &ids)
            .field("stage", &self.stage)
            .finish()
    }
}

impl<D: MigrationDevice> Destination<D> {
    /// A destination for `devs`, which receive the stream's devices in order. Refuses, with
    /// the devices handed back untouched, a unit of several devices where some lack the P2P
    /// states unless `opts` allows it: such a device could run before its peers can answer.
    pub fn new(devs: Vec<D>, opts: &DestinationOptions) -> std::result::Result<Self, Handback<D>> {
        let mut devs = devs;
        let check = if devs.is_empty() {
            Err(Error::InvalidInput("a destination of no devices".into()))
        } else {
            check_unit(&as_refs(&mut devs), opts.allow_non_p2p_unit)
        };
        if let Err(error) = check {
            return Err(Handback::new(error, devs));
        }
        let loaders = (0..devs.len())
            .map(|i| DeviceLoader::new(i as u16, &NoObserver))
            .collect();
        Ok(Self {
            devs,
            stage: Stage::Waiting,
            inbox: Vec::new(),
            decoder: None,
            loaders,
            live: Vec::new(),
            pre_copy_ended: Vec::new(),
            reloaded: 0,
        })
    }

    /// Takes the next bytes of the stream, split anywhere. Applies every whole record to its
    /// device (the devices of a unit in parallel); [`Status::Loaded`] once the trailer
    /// verified and every device took its state. On failure every device is reset (the error
    /// says so) and the destination is over.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Status> {
        self.push_observed(bytes, &NoObserver)
    }

    /// [`push`](Self::push), reporting each device's phases and progress to `obs` as its
    /// records are applied.
    pub fn push_observed(&mut self, bytes: &[u8], obs: &dyn Observer) -> Result<Status> {
        match self.stage {
            Stage::Waiting | Stage::Loading => {}
            Stage::Loaded if bytes.is_empty() => return Ok(Status::Loaded),
            Stage::Loaded => {
                return Err(self.fail(Error::stream(
                    "stream end",
                    format!("{} bytes after the trailer", bytes.len()),
                )))
            }
            Stage::Ended => {
                return Err(Error::InvalidInput(
                    "push: the destination is over (ran, failed or abandoned)".into(),
                ))
            }
        }
        let r = self.take(bytes, obs);
        r.map_err(|e| self.fail(e))
    }

    /// Reads the stream from `input` until it is loaded ([`push`](Self::push) for a
    /// transport the VMM does not frame itself). The end of `input` before the trailer is an
    /// error (and every device is reset).
    pub fn read_from<R: Read>(&mut self, mut input: R) -> Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        while self.read_some(&mut input, &mut buf, &NoObserver)? != Status::Loaded {}
        Ok(())
    }

    /// One read from `input`, pushed: for a caller that acts between reads (a session
    /// acknowledging the pre-copy data), each device's phases and progress reported to `obs`.
    /// The end of `input` before the trailer is an error (and every device is reset).
    ///
    /// The stream header is read into `buf`; past it, each record is read straight into the
    /// destination's own buffer, up to its end and no further, and decoded there: no byte is
    /// copied in user space, and nothing after the trailer is consumed.
    pub fn read_some<R: Read + ?Sized>(
        &mut self,
        input: &mut R,
        buf: &mut [u8],
        obs: &dyn Observer,
    ) -> Result<Status> {
        let want = match (&self.decoder, self.stage) {
            (Some(d), Stage::Loading) => Some(
                record_frame_len(&self.inbox, d.is_authenticated())
                    .unwrap_or(RECORD_HEADER_LEN)
                    .saturating_sub(self.inbox.len()),
            ),
            _ => None,
        };
        loop {
            let read = match want {
                // A length beyond any record's: the decoder refuses the frame as it is.
                Some(0) => return self.push_observed(&[], obs),
                Some(want) => {
                    let start = self.inbox.len();
                    self.inbox.resize(start + want, 0);
                    let read = input.read(&mut self.inbox[start..]);
                    self.inbox
                        .truncate(start + read.as_ref().map_or(0, |&n| n.min(want)));
                    read.map(|n| (n, &[][..]))
                }
                None => input.read(buf).map(|n| (n, &buf[..n.min(buf.len())])),
            };
            return match read {
                Ok((0, _)) => Err(self.fail(Error::stream(
                    "read the migration stream",
                    "truncated stream: it ended before its trailer",
                ))),
                Ok((_, bytes)) => self.push_observed(bytes, obs),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(self.fail(Error::transport("read the migration stream", e))),
            };
        }
    }

    /// Abandons the load after `error`, a failure of the caller's own (its channel, a
    /// message of its protocol): every device it touched is reset, and the error says so;
    /// `error` alone when the destination had already ended or touched no device.
    pub fn cancel_with(&mut self, error: Error) -> Error {
        if self.stage == Stage::Ended {
            return error;
        }
        self.fail(error)
    }

    /// Whether every device the stream carries live loaded all its pre-copy data (its
    /// END_OF_PHASE(PRE_COPY) applied, after every pre-copy record): the point where a
    /// session acknowledges the switch-over (QEMU's switchover-ack). False before the header
    /// and for a stream without pre-copy.
    pub fn pre_copy_loaded(&self) -> bool {
        self.stage != Stage::Ended
            && self.live.iter().any(|&l| l)
            && self
                .live
                .iter()
                .zip(&self.pre_copy_ended)
                .all(|(&live, &ended)| ended || !live)
    }

    /// How many devices ended their pre-copy phase again since the last call: each
    /// re-initialised its pre-copy data (`VFIO_PRECOPY_INFO_REINIT`) after the destination
    /// acknowledged it and sent it anew; a session acknowledges each (SWITCHOVER_ACK_AGAIN).
    pub fn take_pre_copy_reloaded(&mut self) -> usize {
        std::mem::take(&mut self.reloaded)
    }

    /// What each device loaded, in device order.
    pub fn reports(&self) -> Vec<LoadReport> {
        self.loaders.iter().map(DeviceLoader::report).collect()
    }

    /// Runs the loaded unit: every device to its quiescent running state (RUNNING_P2P) first,
    /// then each to RUNNING in turn, so none runs before its peers can answer. If a device fails
    /// before any runs, every device is reset. Past the first RUNNING there is no way back: a
    /// device that then fails is reset and named, the others keep running (the source must
    /// not run the state again either way). The devices come back in every case.
    pub fn run(mut self) -> std::result::Result<Vec<D>, Handback<D>> {
        if self.stage != Stage::Loaded {
            let error = Error::InvalidInput(format!(
                "run: the stream is not loaded ({})",
                match self.stage {
                    Stage::Waiting | Stage::Loading => "it is incomplete; every device is reset",
                    _ => "the destination is over",
                }
            ));
            let error = if self.stage == Stage::Ended {
                error
            } else {
                self.fail(error)
            };
            return Err(self.hand_back(error));
        }
        // The engine's run step (one per destination, whatever carried the stream): every
        // device to RUNNING_P2P, then RUNNING one after another; past the first RUNNING a
        // failure is `PastNoReturn`, with the failed devices already reset and named.
        match run_unit(&mut as_refs(&mut self.devs)) {
            Ok(()) => {
                self.stage = Stage::Ended;
                Ok(std::mem::take(&mut self.devs))
            }
            Err(e @ Error::PastNoReturn { .. }) => {
                self.stage = Stage::Ended;
                Err(self.hand_back(e))
            }
            Err(e) => {
                let error = self.fail(e);
                Err(self.hand_back(error))
            }
        }
    }

    /// The devices back, resetting them first unless they ran: a destination abandoned
    /// before [`run`](Self::run) never leaves partial or unchecked state behind.
    pub fn into_devices(mut self) -> Vec<D> {
        self.abandon();
        std::mem::take(&mut self.devs)
    }

    fn hand_back(mut self, error: Error) -> Handback<D> {
        Handback::new(error, std::mem::take(&mut self.devs))
    }

    /// Resets every device this destination touched, if it has not ended.
    fn abandon(&mut self) -> Option<Error> {
        match self.stage {
            Stage::Ended => None,
            Stage::Waiting => {
                self.stage = Stage::Ended;
                None
            }
            Stage::Loading | Stage::Loaded => {
                Some(self.fail(Error::InvalidInput("the destination was abandoned".into())))
            }
        }
    }

    /// Resets every device after `e` (unless none was touched yet).
    fn fail(&mut self, e: Error) -> Error {
        let touched = self.stage != Stage::Waiting;
        self.stage = Stage::Ended;
        self.decoder = None;
        if !touched {
            return e;
        }
        let outcomes = self
            .devs
            .iter_mut()
            .map(|d| (d.identity().instance, d.abort_resume()))
            .collect();
        fold(e, outcomes)
    }

    /// Decodes the frames of `bytes` (after what is left of earlier pushes) where they lie
    /// and applies the records: a frame split across pushes is copied into the inbox once,
    /// a frame that arrived whole is not copied at all.
    fn take(&mut self, bytes: &[u8], obs: &dyn Observer) -> Result<Status> {
        let mut held = std::mem::take(&mut self.inbox);
        let mut rest = bytes;
        // Complete the frame an earlier push began, from the first bytes of this one.
        while !held.is_empty() && !rest.is_empty() {
            let add = match self.frame_len(&held) {
                Some(need) => need.saturating_sub(held.len()).min(rest.len()),
                None => 1, // not yet long enough to tell: a few bytes of a header
            };
            held.extend_from_slice(&rest[..add]);
            rest = &rest[add..];
            if self.frame_len(&held) == Some(held.len()) {
                break;
            }
        }
        let held_whole = !held.is_empty() && self.frame_len(&held) == Some(held.len());
        let mut frames: Vec<&[u8]> = Vec::new();
        if held_whole {
            frames.push(&held);
        }
        let mut batches: Vec<Vec<Item<'_>>> = (0..self.devs.len()).map(|_| Vec::new()).collect();
        let mut batched = 0;
        let mut ended = false;
        let mut next = frames.pop();
        loop {
            let frame = match next.take() {
                Some(frame) => frame,
                None => match self.frame_len(rest).filter(|&n| n > 0 && n <= rest.len()) {
                    Some(n) if !ended && (held.is_empty() || held_whole) => {
                        let (frame, after) = rest.split_at(n);
                        rest = after;
                        frame
                    }
                    _ => break,
                },
            };
            let Some(decoder) = self.decoder.as_mut() else {
                self.open(frame)?;
                continue;
            };
            match decoder.record(frame)? {
                Record::Data {
                    device,
                    phase,
                    bytes,
                    chunk_end,
                } => {
                    batched += bytes.len();
                    batches[usize::from(device)].push(Item::Data {
                        phase,
                        bytes,
                        chunk_end,
                    });
                }
                Record::EndOfPhase { device, phase } => {
                    if phase == Phase::PreCopy {
                        // Applied, with the records before it, before this push returns.
                        let ended = &mut self.pre_copy_ended[usize::from(device)];
                        if *ended {
                            self.reloaded += 1;
                        }
                        *ended = true;
                    }
                    batches[usize::from(device)].push(Item::EndOfPhase(phase))
                }
                Record::End(_) => ended = true,
            }
            if batched >= BATCH_BYTES {
                self.apply(&mut batches, obs)?;
                batched = 0;
            }
        }
        self.apply(&mut batches, obs)?;
        drop(batches);
        // Keep the start of a frame this push did not complete: the held frame still
        // incomplete (then this push went into it whole), or the rest of this push (the
        // inbox's allocation is reused).
        if held_whole {
            held.clear();
        }
        held.extend_from_slice(rest);
        self.inbox = held;
        if !ended {
            return Ok(Status::NeedMore);
        }
        if !self.inbox.is_empty() {
            return Err(Error::stream(
                "stream end",
                format!("{} bytes after the trailer", self.inbox.len()),
            ));
        }
        each(&mut as_refs(&mut self.devs), "load the unit's state", |d| {
            d.load_state()
        })?;
        self.stage = Stage::Loaded;
        Ok(Status::Loaded)
    }

    /// The length of the frame `bytes` begins with (the header's before it was read, else a
    /// record's), or `None` while `bytes` is too short to tell.
    fn frame_len(&self, bytes: &[u8]) -> Option<usize> {
        match &self.decoder {
            None => header_frame_len(bytes),
            Some(d) => record_frame_len(bytes, d.is_authenticated()),
        }
    }

    /// Opens the stream on its header `frame`: checks every device against it before
    /// touching any, then has them all enter RESUMING.
    fn open(&mut self, frame: &[u8]) -> Result<()> {
        let (decoder, header) = FrameDecoder::open(frame, None)?;
        if header.devices.len() != self.devs.len() {
            return Err(Error::stream(
                "check stream compatibility",
                format!(
                    "the stream carries {} devices, {} destination devices were given",
                    header.devices.len(),
                    self.devs.len()
                ),
            ));
        }
        for (dev, desc) in self.devs.iter().zip(&header.devices) {
            check_compatible(dev, desc)?;
        }
        self.stage = Stage::Loading;
        self.decoder = Some(decoder);
        self.live = header.devices.iter().map(|d| d.live).collect();
        self.pre_copy_ended = vec![false; self.live.len()];
        each(&mut as_refs(&mut self.devs), "enter RESUMING", |d| {
            d.start_resume()
        })
    }

    /// Applies each device's batch, the devices in parallel.
    fn apply(&mut self, batches: &mut [Vec<Item<'_>>], obs: &dyn Observer) -> Result<()> {
        let busy = batches.iter().filter(|b| !b.is_empty()).count();
        if busy == 0 {
            return Ok(());
        }
        let work = self
            .devs
            .iter_mut()
            .zip(self.loaders.iter_mut())
            .zip(batches.iter_mut())
            .filter(|(_, b)| !b.is_empty());
        if busy == 1 {
            for ((dev, loader), batch) in work {
                apply_batch(dev, loader, std::mem::take(batch), obs)?;
            }
            return Ok(());
        }
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let threads: Vec<_> = work
                .map(|((dev, loader), batch)| {
                    let batch = std::mem::take(batch);
                    s.spawn(move || apply_batch(dev, loader, batch, obs))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join().unwrap_or_else(|_| {
                        Err(Error::protocol("load", "a device's load thread panicked"))
                    })
                })
                .collect()
        });
        results.into_iter().collect()
    }
}

impl<D: MigrationDevice> Drop for Destination<D> {
    fn drop(&mut self) {
        if let Some(e) = self.abandon() {
            log::warn!(
                "a migration destination dropped before it ran: {}",
                Report(&e)
            );
        }
    }
}

/// Applies `batch` to `dev`.
fn apply_batch(
    dev: &mut dyn MigrationDevice,
    loader: &mut DeviceLoader<'static>,
    batch: Vec<Item<'_>>,
    obs: &dyn Observer,
) -> Result<()> {
    for item in batch {
        match item {
            Item::Data {
                phase,
                bytes,
                chunk_end,
            } => loader.data_to(obs, dev, phase, bytes, chunk_end)?,
            Item::EndOfPhase(phase) => loader.end_phase_to(obs, phase),
        }
    }
    Ok(())
}

/// Loads a stream from `input` into `devs` (in the source's device order) and runs them: a
/// [`Destination`] for a VMM with no restore steps of its own between loading and running.
/// On failure every device is reset, or (past the first RUNNING) named.
pub fn resume<D: MigrationDevice, R: Read>(
    devs: &mut [D],
    input: R,
    opts: &DestinationOptions,
) -> Result<Vec<LoadReport>> {
    let mut dst = Destination::new(devs.iter_mut().collect(), opts).map_err(Error::from)?;
    dst.read_from(input)?;
    let reports = dst.reports();
    dst.run().map_err(Error::from)?;
    Ok(reports)
}
