// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The destination of a migration: bytes pushed as they arrive, every device loaded, then
//! run in a call of its own, after the VMM's restore steps.

use std::io::Read;
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use crate::engine::loader::{check_compatible, DeviceLoader, LoadReport};
use crate::engine::multi::check_unit;
use crate::engine::parallel::each;
use crate::engine::run::run_unit;
use crate::engine::{NoObserver, Observer};
use crate::error::{Error, Report, Result};
use crate::migration::MigrationDevice;
use crate::stream::format::{header_frame_len, record_frame_len, RECORD_HEADER_LEN};
use crate::stream::{FrameDecoder, Phase, Record, StreamAuth, StreamHeader};

use super::channels::{channel_header, check_count, devices_of, in_channel};
use super::handback::{as_refs, fold, Handback};
use super::inbox::Inbox;
use super::options::DestinationOptions;

/// Record payloads batched per push before they are applied to the devices (in parallel
/// when several devices have records in the batch).
const BATCH_BYTES: usize = 8 << 20;

/// The size of each read of [`Destination::read_from`] and [`Destination::read_channels`].
const READ_BUFFER: usize = 256 << 10;

/// What a channel's reading thread hands the loading thread.
enum Chunk {
    /// `len` bytes read from channel `ch` into `buf` (0: the channel ended).
    Read { ch: usize, buf: Vec<u8>, len: usize },
    /// The read of channel `ch` failed.
    Failed { ch: usize, error: std::io::Error },
}

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
/// (the pushed bytes, or a channel's inbox for a record split across pushes).
enum Item<'a> {
    Data {
        phase: Phase,
        bytes: &'a [u8],
        chunk_end: bool,
    },
    EndOfPhase(Phase),
}

/// One channel's part of the stream: its sub-stream, as its bytes arrive.
#[derive(Default)]
struct Inbound {
    /// The start of a header or record that earlier pushes brought only part of.
    inbox: Inbox,
    /// The sub-stream's decoder, once its header was read.
    decoder: Option<FrameDecoder>,
    /// The unit index of each of the channel's devices.
    units: Vec<usize>,
    /// The channel's trailer was read.
    ended: bool,
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
/// The devices may arrive over several channels ([`set_channels`](Self::set_channels)): each
/// channel's bytes are pushed to it ([`push_channel`](Self::push_channel)), or all channels
/// are read at once ([`read_channels`](Self::read_channels)); the unit stays one (loaded
/// when every channel's trailer verified, reset as a whole when any channel fails).
///
/// Any failure before `run`, and dropping the destination before `run`, resets every device
/// it touched: none ever runs partial or unchecked state.
pub struct Destination<D: MigrationDevice> {
    devs: Vec<D>,
    stage: Stage,
    /// One per channel, in channel order.
    inbound: Vec<Inbound>,
    /// The unit's header the sub-streams must make up, when the caller knows it
    /// ([`expect_header`](Self::expect_header)).
    expected: Option<StreamHeader>,
    /// The session id and epoch of the first sub-stream header: every other must share them.
    session: Option<([u8; 16], u64)>,
    /// Per device: whether it entered RESUMING (its channel's header matched it).
    resuming: Vec<bool>,
    loaders: Vec<DeviceLoader>,
    /// Per device: whether the header says it comes with pre-copy data.
    live: Vec<bool>,
    /// Per device: whether its END_OF_PHASE(PRE_COPY) was applied.
    pre_copy_ended: Vec<bool>,
    /// END_OF_PHASE(PRE_COPY) records of devices whose pre-copy had already ended (a device
    /// that re-initialised its pre-copy data, REINIT), not yet taken by the session layer.
    reloaded: usize,
    /// The key every sub-stream's tags are checked with ([`DestinationOptions::key`]).
    key: Option<Arc<dyn StreamAuth>>,
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
            .map(|i| DeviceLoader::new(i as u16))
            .collect();
        let n = devs.len();
        Ok(Self {
            devs,
            stage: Stage::Waiting,
            inbound: vec![Inbound {
                units: (0..n).collect(),
                ..Inbound::default()
            }],
            expected: None,
            session: None,
            resuming: vec![false; n],
            loaders,
            live: vec![false; n],
            pre_copy_ended: vec![false; n],
            reloaded: 0,
            key: opts.key.clone(),
        })
    }

    /// Receives the devices over `count` channels instead of one: device `i` arrives on
    /// channel `i mod count`, in that channel's sub-stream (as [`crate::Source::set_channels`]
    /// sends them). Only before the first byte arrived; 1 to one channel per device.
    pub fn set_channels(&mut self, count: usize) -> Result<()> {
        if self.stage != Stage::Waiting || self.inbound.iter().any(|c| !c.inbox.is_empty()) {
            return Err(Error::InvalidInput(
                "set the channels: the stream has begun".into(),
            ));
        }
        check_count(count, self.devs.len())?;
        self.inbound = (0..count)
            .map(|ch| Inbound {
                units: devices_of(self.devs.len(), ch, count),
                ..Inbound::default()
            })
            .collect();
        Ok(())
    }

    /// Requires the stream to carry `unit` (a session layer received the unit's header in
    /// its handshake and checked it): each channel's sub-stream header must be that unit's
    /// part for the channel, or the load fails before that channel's devices are touched.
    /// Only before the first byte arrived.
    pub fn expect_header(&mut self, unit: StreamHeader) -> Result<()> {
        if self.stage != Stage::Waiting {
            return Err(Error::InvalidInput(
                "expect a header: the stream has begun".into(),
            ));
        }
        self.expected = Some(unit);
        Ok(())
    }

    /// Takes the next bytes of the stream, split anywhere. Applies every whole record to its
    /// device (the devices of a unit in parallel); [`Status::Loaded`] once the trailer
    /// verified and every device took its state. On failure every device is reset (the error
    /// says so) and the destination is over. Over several channels this is channel 0's
    /// stream ([`push_channel`](Self::push_channel)).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Status> {
        self.push_channel(0, bytes, &NoObserver)
    }

    /// [`push`](Self::push), reporting each device's phases and progress to `obs` as its
    /// records are applied.
    pub fn push_observed(&mut self, bytes: &[u8], obs: &dyn Observer) -> Result<Status> {
        self.push_channel(0, bytes, obs)
    }

    /// [`push_observed`](Self::push_observed) of channel `ch`'s bytes: [`Status::Loaded`] once
    /// every channel's trailer verified and every device took its state.
    pub fn push_channel(&mut self, ch: usize, bytes: &[u8], obs: &dyn Observer) -> Result<Status> {
        self.take_pieces(&[(ch, bytes)], obs)
    }

    /// Takes pieces of several channels at once, their records applied together (the
    /// devices of every channel in parallel).
    fn take_pieces(&mut self, pieces: &[(usize, &[u8])], obs: &dyn Observer) -> Result<Status> {
        let bytes: usize = pieces.iter().map(|(_, b)| b.len()).sum();
        if let Some(&(ch, _)) = pieces.iter().find(|(ch, _)| *ch >= self.inbound.len()) {
            return Err(Error::InvalidInput(format!(
                "push to channel {ch} of a destination of {} channels",
                self.inbound.len()
            )));
        }
        match self.stage {
            Stage::Waiting | Stage::Loading => {}
            Stage::Loaded if bytes == 0 => return Ok(Status::Loaded),
            Stage::Loaded => {
                return Err(self.fail(Error::stream(
                    "stream end",
                    format!("{bytes} bytes after the trailer"),
                )))
            }
            Stage::Ended => {
                return Err(Error::InvalidInput(
                    "push: the destination is over (ran, failed or abandoned)".into(),
                ))
            }
        }
        let r = self.take(pieces, obs);
        r.map_err(|e| self.fail(e))
    }

    /// Reads the stream from `input` until it is loaded ([`push`](Self::push) for a
    /// transport the VMM does not frame itself). The end of `input` before the trailer is an
    /// error (and every device is reset). One channel only ([`read_channels`] for several).
    ///
    /// [`read_channels`]: Self::read_channels
    pub fn read_from<R: Read>(&mut self, mut input: R) -> Result<()> {
        if self.inbound.len() != 1 {
            let e = Error::InvalidInput("read_from: the stream comes over several channels".into());
            return Err(self.cancel_with(e));
        }
        let mut buf = vec![0u8; READ_BUFFER];
        while self.read_some(&mut input, &mut buf, &NoObserver)? != Status::Loaded {}
        Ok(())
    }

    /// One read from `input`, pushed (to channel 0): for a caller that acts between reads (a
    /// session acknowledging the pre-copy data), each device's phases and progress reported
    /// to `obs`. The end of `input` before the trailer is an error (and every device is
    /// reset).
    ///
    /// The stream header is read into `buf`; past it, each record is read straight into the
    /// channel's own buffer, up to its end and no further, and decoded there: no byte is
    /// copied in user space, and nothing after the trailer is consumed.
    pub fn read_some<R: Read + ?Sized>(
        &mut self,
        input: &mut R,
        buf: &mut [u8],
        obs: &dyn Observer,
    ) -> Result<Status> {
        let c = &self.inbound[0];
        let want = match (&c.decoder, self.stage) {
            (Some(d), Stage::Loading) if !c.ended => Some(
                record_frame_len(&c.inbox, d.is_authenticated())
                    .unwrap_or(RECORD_HEADER_LEN)
                    .saturating_sub(c.inbox.len()),
            ),
            _ => None,
        };
        loop {
            let read = match want {
                // A length beyond any record's: the decoder refuses the frame as it is.
                Some(0) => return self.push_observed(&[], obs),
                Some(want) => {
                    let c = &mut self.inbound[0];
                    let read = c.inbox.read_from(input, want);
                    if let (Ok(_), Some(d)) = (&read, &c.decoder) {
                        c.inbox.note_arrived(d.session_id());
                    }
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

    /// Reads every channel's sub-stream at once (channel `c` from `inputs[c]`, one thread
    /// each) until the unit is loaded: the records of the channels that arrived together are
    /// applied together, so devices on different channels load in parallel. `between` is
    /// called after every read (a session acknowledging the pre-copy data); its error fails
    /// the load. Each channel's reads stop at its trailer: nothing after it is read (a
    /// session's COMMIT on channel 0 stays in its input).
    ///
    /// On failure every device is reset (the error says so and names the channel), and
    /// `stop` is called: it must make every pending read of `inputs` return (for sockets,
    /// shut them down for reading), since the reading threads end before this returns.
    pub fn read_channels<R: Read + Send>(
        &mut self,
        inputs: &mut [R],
        stop: &(dyn Fn() + Sync),
        obs: &dyn Observer,
        between: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if inputs.len() != self.inbound.len() {
            let e = Error::InvalidInput(format!(
                "read_channels: {} inputs for a stream over {} channels",
                inputs.len(),
                self.inbound.len()
            ));
            return Err(self.cancel_with(e));
        }
        std::thread::scope(|s| {
            let (tx, rx) = channel::<Chunk>();
            let mut replies = Vec::with_capacity(inputs.len());
            for (ch, input) in inputs.iter_mut().enumerate() {
                // The buffer comes back once its bytes were pushed; none after the trailer.
                let (reply, next) = sync_channel::<Vec<u8>>(1);
                replies.push(Some(reply));
                let tx = tx.clone();
                s.spawn(move || {
                    let mut buf = vec![0u8; READ_BUFFER];
                    loop {
                        let chunk = match input.read(&mut buf) {
                            Ok(len) => Chunk::Read { ch, buf, len },
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(error) => Chunk::Failed { ch, error },
                        };
                        if tx.send(chunk).is_err() {
                            return;
                        }
                        match next.recv() {
                            Ok(b) => buf = b,
                            Err(_) => return,
                        }
                    }
                });
            }
            drop(tx);
            let r = self.load_chunks(&rx, &mut replies, obs, between);
            if r.is_err() {
                stop();
            }
            // A reader waiting for its buffer ends now.
            drop(replies);
            r
        })
    }

    /// The loading side of [`read_channels`](Self::read_channels).
    fn load_chunks(
        &mut self,
        chunks: &Receiver<Chunk>,
        replies: &mut [Option<SyncSender<Vec<u8>>>],
        obs: &dyn Observer,
        between: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let count = replies.len();
        while self.stage != Stage::Loaded {
            between(self).map_err(|e| self.cancel_with(e))?;
            let Ok(first) = chunks.recv() else {
                let e = Error::protocol("read the channels", "every channel's reader ended");
                return Err(self.cancel_with(e));
            };
            let mut read = Vec::new();
            for chunk in std::iter::once(first).chain(chunks.try_iter()) {
                match chunk {
                    Chunk::Read { ch, len: 0, .. } => {
                        let e = Error::stream(
                            "read the migration stream",
                            "truncated stream: it ended before its trailer",
                        );
                        return Err(self.cancel_with(in_channel(ch, count, e)));
                    }
                    Chunk::Read { ch, buf, len } => read.push((ch, buf, len)),
                    Chunk::Failed { ch, error } => {
                        let e = Error::transport("read the migration stream", error);
                        return Err(self.cancel_with(in_channel(ch, count, e)));
                    }
                }
            }
            let pieces: Vec<(usize, &[u8])> = read
                .iter()
                .map(|(ch, buf, len)| (*ch, &buf[..*len]))
                .collect();
            self.take_pieces(&pieces, obs)?;
            for (ch, buf, _) in read {
                if self.inbound[ch].ended {
                    replies[ch] = None;
                } else if let Some(reply) = &replies[ch] {
                    // The reader is gone only after an error of its own, which comes next.
                    let _ = reply.send(buf);
                }
            }
        }
        Ok(())
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
            && self.inbound.iter().all(|c| c.decoder.is_some() || c.ended)
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
        for c in &mut self.inbound {
            c.decoder = None;
        }
        if !touched {
            return e;
        }
        let outcomes = self
            .devs
            .iter_mut()
            .zip(&self.resuming)
            .filter(|(_, &resuming)| resuming)
            .map(|(d, _)| (d.identity().instance, d.abort_resume()))
            .collect();
        fold(e, outcomes)
    }

    /// Decodes the frames of each piece (after what is left of earlier pushes to its
    /// channel) where they lie and applies the records: a frame split across pushes is copied
    /// into its channel's inbox once, a frame that arrived whole is not copied at all. Checks
    /// whether every channel ended.
    fn take(&mut self, pieces: &[(usize, &[u8])], obs: &dyn Observer) -> Result<Status> {
        // The records borrow the inboxes while they are applied: out of `self` meanwhile.
        let mut held: Vec<Inbox> = (self.inbound.iter_mut())
            .map(|c| std::mem::take(&mut c.inbox))
            .collect();
        let taken = self.take_held(pieces, &mut held, obs);
        for (c, inbox) in self.inbound.iter_mut().zip(held) {
            c.inbox = inbox;
        }
        taken?;
        let count = self.inbound.len();
        for (ch, c) in self.inbound.iter().enumerate() {
            if c.ended && !c.inbox.is_empty() {
                let e = Error::stream(
                    "stream end",
                    format!("{} bytes after the trailer", c.inbox.len()),
                );
                return Err(in_channel(ch, count, e));
            }
        }
        if !self.inbound.iter().all(|c| c.ended) {
            return Ok(Status::NeedMore);
        }
        each(&mut as_refs(&mut self.devs), "load the unit's state", |d| {
            d.load_state()
        })?;
        self.stage = Stage::Loaded;
        Ok(Status::Loaded)
    }

    /// [`take`](Self::take) with the channels' inboxes in `held`; leaves in each what its
    /// channel's pieces did not complete. A channel's pieces after its first are taken in a
    /// later round (a frame split between them is completed in the inbox).
    fn take_held(
        &mut self,
        pieces: &[(usize, &[u8])],
        held: &mut [Inbox],
        obs: &dyn Observer,
    ) -> Result<()> {
        let again = (1..pieces.len()).find(|&i| pieces[..i].iter().any(|p| p.0 == pieces[i].0));
        let (now, later) = pieces.split_at(again.unwrap_or(pieces.len()));
        let count = self.inbound.len();
        // Complete the frame an earlier push began, from the first bytes of the piece.
        let mut rests: Vec<&[u8]> = Vec::with_capacity(now.len());
        for &(ch, bytes) in now {
            let inbox = &mut held[ch];
            let mut rest = bytes;
            while !inbox.is_empty() && !rest.is_empty() {
                let add = match self.frame_len(ch, inbox) {
                    Some(need) => need.saturating_sub(inbox.len()).min(rest.len()),
                    None => 1, // not yet long enough to tell: a few bytes of a header
                };
                inbox.extend_from_slice(&rest[..add]);
                rest = &rest[add..];
                if self.frame_len(ch, inbox) == Some(inbox.len()) {
                    break;
                }
            }
            rests.push(rest);
        }
        let whole: Vec<bool> = (0..count)
            .map(|ch| !held[ch].is_empty() && self.frame_len(ch, &held[ch]) == Some(held[ch].len()))
            .collect();
        let mut batches: Vec<Vec<Item<'_>>> = (0..self.devs.len()).map(|_| Vec::new()).collect();
        let mut batched = 0;
        for (&(ch, _), rest) in now.iter().zip(rests.iter_mut()) {
            let mut next = whole[ch].then(|| (&held[ch][..], held[ch].arrived_crc()));
            let decoded = (|| -> Result<()> {
                loop {
                    let (frame, arrived_crc) = match next.take() {
                        Some(held) => held,
                        None => match self
                            .frame_len(ch, rest)
                            .filter(|&n| n > 0 && n <= rest.len())
                        {
                            Some(n)
                                if !self.inbound[ch].ended
                                    && (held[ch].is_empty() || whole[ch]) =>
                            {
                                let (frame, after) = rest.split_at(n);
                                *rest = after;
                                (frame, None)
                            }
                            _ => return Ok(()),
                        },
                    };
                    batched += self.decode(ch, frame, arrived_crc, &mut batches)?;
                    if batched >= BATCH_BYTES {
                        self.apply(&mut batches, obs)?;
                        batched = 0;
                    }
                }
            })();
            decoded.map_err(|e| in_channel(ch, count, e))?;
        }
        self.apply(&mut batches, obs)?;
        drop(batches);
        // Keep the start of a frame the pieces did not complete: the held frame still
        // incomplete (then its piece went into it whole), or the rest of the piece (the
        // inbox's allocation is reused).
        for (&(ch, _), rest) in now.iter().zip(rests) {
            if whole[ch] {
                held[ch].clear();
            }
            held[ch].extend_from_slice(rest);
        }
        if later.is_empty() {
            return Ok(());
        }
        self.take_held(later, held, obs)
    }

    /// The length of the frame `bytes` begins with in channel `ch` (the header's before it
    /// was read, else a record's), or `None` while `bytes` is too short to tell.
    fn frame_len(&self, ch: usize, bytes: &[u8]) -> Option<usize> {
        match &self.inbound[ch].decoder {
            None => header_frame_len(bytes),
            Some(d) => record_frame_len(bytes, d.is_authenticated()),
        }
    }

    /// Decodes one whole `frame` of channel `ch`: opens the sub-stream on its header, or
    /// adds the record to its device's batch (where it lies). `arrived_crc`: the record's
    /// CRC as its bytes arrived, if the inbox computed it. Returns the DATA bytes added.
    fn decode<'a>(
        &mut self,
        ch: usize,
        frame: &'a [u8],
        arrived_crc: Option<u32>,
        batches: &mut [Vec<Item<'a>>],
    ) -> Result<usize> {
        let c = &mut self.inbound[ch];
        let Some(decoder) = c.decoder.as_mut() else {
            self.open(ch, frame)?;
            return Ok(0);
        };
        let unit = |local: u16| {
            c.units
                .get(usize::from(local))
                .copied()
                .ok_or_else(|| no_device(local))
        };
        match decoder.record(frame, arrived_crc)? {
            Record::Data {
                device,
                phase,
                bytes,
                chunk_end,
            } => {
                batches[unit(device)?].push(Item::Data {
                    phase,
                    bytes,
                    chunk_end,
                });
                return Ok(bytes.len());
            }
            Record::EndOfPhase { device, phase } => {
                let device = unit(device)?;
                if phase == Phase::PreCopy {
                    // Applied, with the records before it, before this push returns.
                    let ended = &mut self.pre_copy_ended[device];
                    if *ended {
                        self.reloaded += 1;
                    }
                    *ended = true;
                }
                batches[device].push(Item::EndOfPhase(phase))
            }
            Record::End(_) => c.ended = true,
        }
        Ok(0)
    }

    /// Opens channel `ch`'s sub-stream on its header: checks it (the expected unit's part,
    /// the session of the other channels, the channel's devices) before touching any of the
    /// channel's devices, then has them all enter RESUMING.
    fn open(&mut self, ch: usize, frame: &[u8]) -> Result<()> {
        let (decoder, header) = FrameDecoder::open(frame, self.key.clone())?;
        let count = self.inbound.len();
        let units = self.inbound[ch].units.clone();
        if let Some(unit) = &self.expected {
            if unit.devices.len() != self.devs.len() || header != channel_header(unit, ch, count) {
                return Err(Error::stream(
                    "check the stream header",
                    format!(
                        "the stream header (session {:02x?}, epoch {}, {} devices) is not the \
                         one the unit's header announced",
                        header.session_id,
                        header.epoch,
                        header.devices.len()
                    ),
                ));
            }
        }
        let session = (header.session_id, header.epoch);
        if *self.session.get_or_insert(session) != session {
            return Err(Error::stream(
                "check the stream header",
                "its session or epoch differs from another channel's",
            ));
        }
        if header.devices.len() != units.len() {
            return Err(Error::stream(
                "check stream compatibility",
                format!(
                    "the stream carries {} devices, {} destination devices were given",
                    header.devices.len(),
                    units.len()
                ),
            ));
        }
        for (&i, desc) in units.iter().zip(&header.devices) {
            check_compatible(&self.devs[i], desc)?;
        }
        self.stage = Stage::Loading;
        self.inbound[ch].decoder = Some(decoder);
        for (&i, desc) in units.iter().zip(&header.devices) {
            self.live[i] = desc.live;
            self.resuming[i] = true;
        }
        let mut mine: Vec<&mut dyn MigrationDevice> = self
            .devs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| units.contains(i))
            .map(|(_, d)| d as &mut dyn MigrationDevice)
            .collect();
        each(&mut mine, "enter RESUMING", |d| d.start_resume())
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

/// A record naming a device its sub-stream does not carry.
fn no_device(local: u16) -> Error {
    Error::stream(
        "read a record",
        format!("device {local} is not in the stream"),
    )
}

/// Applies `batch` to `dev`.
fn apply_batch(
    dev: &mut dyn MigrationDevice,
    loader: &mut DeviceLoader,
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
