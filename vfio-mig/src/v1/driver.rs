// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v1 saving and resuming sequences, driven over a [`MigrationRegion`].
//!
//! Saving (pre-copy 011b and stop-and-copy 010b), per the uAPI:
//! 1. read `pending_bytes`: 0 ends the phase; it also consumes the chunk read before;
//! 2. read `data_offset`: the driver stages a chunk;
//! 3. read `data_size`: the chunk's size;
//! 4. read that many bytes at `data_offset` (mmap or pread);
//! 5. back to 1.
//!
//! Resuming (100b), per chunk in the source's order: read `data_offset`, write the chunk
//! there, write `data_size` with the chunk's size (the source's transaction size). A chunk
//! larger than the room the destination's data section has from `data_offset` is split, as
//! QEMU's v1 `vfio_load_buffer` does: what fits is written and committed with its size, then
//! `data_offset` is read again for the rest, in the source's order.

use std::sync::Arc;

use crate::device::DeviceIo;
use crate::error::Report;
use crate::error::{Error, Result};
use crate::migration::{
    Capabilities, MigrationDevice, Pending, Protocol, ReadOutcome, Recovery, RunState, StopCopySize,
};

use super::region::MigrationRegion;
use super::state::{compose, V1State};

/// The chunk being read (saving) or written (resuming).
#[derive(Debug, Clone, Copy)]
struct Chunk {
    /// Region-relative offset of the chunk (`data_offset`).
    offset: u64,
    /// Saving: the chunk's size; resuming: room left in the data section from `offset`.
    size: u64,
    /// Bytes read or written so far.
    done: u64,
}

/// A device speaking the v1 protocol.
#[derive(Debug)]
pub struct V1Device {
    region: MigrationRegion,
    chunk: Option<Chunk>,
    last_pending: u64,
    /// The state a failed save returns the device to: where its saving session began.
    home: RunState,
}

impl V1Device {
    /// Opens the v1 migration interface of `dev`: finds the migration region by its
    /// type/subtype and maps its data section where the driver allows it.
    pub fn open(dev: Arc<dyn DeviceIo>) -> Result<Self> {
        let identity = dev.identity();
        let region = MigrationRegion::find(dev)?.ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: no v1 migration region (type 3, subtype 1)",
                identity.instance
            ))
        })?;
        Ok(Self::with_region(region))
    }

    /// Where the next piece of resume data goes: `data_offset`, with the room the data
    /// section has from there.
    fn next_resume_chunk(&mut self) -> Result<Chunk> {
        let step = "read data_offset (resuming)";
        let offset = self
            .region
            .data_offset()
            .map_err(|e| Error::device(step, e))?;
        let room = self.region.info().size.saturating_sub(offset);
        self.region
            .check_data_range(offset, room)
            .map_err(|d| Error::protocol(step, d))?;
        if room == 0 {
            return Err(Error::protocol(
                step,
                format!("data_offset {offset:#x} leaves no room in the data section"),
            ));
        }
        Ok(Chunk {
            offset,
            size: room,
            done: 0,
        })
    }

    /// Hands the driver the `size` bytes written at `data_offset` (a `data_size` write).
    fn commit_piece(&mut self, size: u64) -> Result<()> {
        self.chunk = None;
        self.region
            .set_data_size(size)
            .map_err(|e| Error::device(format!("write data_size {size}"), e))
    }

    /// Wraps an already opened migration region.
    pub fn with_region(region: MigrationRegion) -> Self {
        Self {
            region,
            chunk: None,
            last_pending: 0,
            home: RunState::Running,
        }
    }

    /// The migration region.
    pub fn region(&self) -> &MigrationRegion {
        &self.region
    }

    /// Reads `device_state`, raw.
    pub fn raw_state(&self) -> Result<u32> {
        self.region
            .read_state()
            .map_err(|e| Error::device("read device_state", e))
    }

    /// Moves the device to `target` by read-modify-write of `device_state`.
    ///
    /// The transition is checked against the uAPI before anything is written. If the write
    /// fails, `device_state` is read back and reported; a device found in ERROR is reset.
    pub fn set_state(&mut self, target: V1State) -> Result<()> {
        let step = format!("set device_state to {target}");
        let raw = self.raw_state()?;
        let value = compose(raw, target).map_err(|e| Error::protocol(&step, e.to_string()))?;
        if value == raw {
            return Ok(());
        }
        log::debug!("v1 transition {} -> {target}", V1State::from_raw(raw));
        match self.region.write_state(value) {
            Ok(()) => {
                self.chunk = None;
                Ok(())
            }
            Err(source) => {
                self.chunk = None;
                let now = self.region.read_state();
                let now_text = match now {
                    Ok(now_raw) => {
                        let now_state = V1State::from_raw(now_raw);
                        if !now_state.is_requestable() {
                            match self.region.device().reset() {
                                Ok(()) => format!("{now_state}, so it was reset"),
                                Err(e) => format!("{now_state}, and its reset failed: {e}"),
                            }
                        } else {
                            now_state.to_string()
                        }
                    }
                    Err(e) => format!("unknown (read-back failed: {e})"),
                };
                Err(Error::Transition {
                    step,
                    from: V1State::from_raw(raw).to_string(),
                    to: target.to_string(),
                    now: now_text,
                    source,
                })
            }
        }
    }

    fn read_pending(&mut self) -> Result<u64> {
        let pending = self
            .region
            .pending_bytes()
            .map_err(|e| Error::device("read pending_bytes", e))?;
        self.last_pending = pending;
        Ok(pending)
    }

    /// Steps 2-3 of the saving sequence: stage a chunk and learn where it is. `None`: the
    /// driver staged an empty chunk (`data_size` 0 although `pending_bytes` was not 0, as a
    /// driver whose pending count is an estimate does). QEMU's v1 code took that as the end
    /// of the stop-and-copy data (`vfio_save_complete_precopy`) and, in pre-copy, as the end of
    /// the round (`vfio_save_iterate`): so do we.
    fn stage_chunk(&mut self) -> Result<Option<Chunk>> {
        let offset = self
            .region
            .data_offset()
            .map_err(|e| Error::device("read data_offset", e))?;
        let size = self
            .region
            .data_size()
            .map_err(|e| Error::device("read data_size", e))?;
        if size == 0 {
            log::debug!(
                "v1: empty chunk with {} bytes pending: end of this phase's data for now",
                self.last_pending
            );
            return Ok(None);
        }
        self.region
            .check_data_range(offset, size)
            .map_err(|d| Error::protocol("read data_offset", d))?;
        Ok(Some(Chunk {
            offset,
            size,
            done: 0,
        }))
    }

    /// The v1 state of [`Self::home`].
    fn home_state(&self) -> V1State {
        match self.home {
            RunState::Running => V1State::Running,
            RunState::Stopped => V1State::Stop,
        }
    }

    /// [`reset_to_running`](Self::reset_to_running), then back to STOP (000b) when the saving
    /// session began there (a paused VM's device must not run after its recovery).
    fn reset_home(&mut self) -> Recovery {
        let recovery = self.reset_to_running();
        if recovery != Recovery::Reset || self.home == RunState::Running {
            return recovery;
        }
        match self.set_state(V1State::Stop) {
            Ok(()) => recovery,
            Err(e) => Recovery::Failed(format!("reset, but then STOP failed: {}", Report(&e))),
        }
    }

    fn reset_to_running(&mut self) -> Recovery {
        self.chunk = None;
        match self.region.device().reset() {
            Err(e) => Recovery::Failed(format!("VFIO_DEVICE_RESET: {e}")),
            Ok(()) => match self.raw_state().map(V1State::from_raw) {
                Ok(V1State::Running) => Recovery::Reset,
                Ok(other) => Recovery::Failed(format!("device is in {other} after reset")),
                Err(e) => Recovery::Failed(format!("after reset: {e}")),
            },
        }
    }
}

impl MigrationDevice for V1Device {
    fn identity(&self) -> crate::device::DeviceIdentity {
        self.region.device().identity()
    }

    fn protocol(&self) -> Protocol {
        Protocol::V1
    }

    fn capabilities(&self) -> Capabilities {
        // Every v1 device supports pre-copy (RUNNING | SAVING); P2P does not exist in v1.
        Capabilities {
            pre_copy: true,
            p2p: false,
            migration_flags: 0,
        }
    }

    fn state_name(&mut self) -> Result<String> {
        Ok(V1State::from_raw(self.raw_state()?).to_string())
    }

    fn details(&mut self) -> Result<Vec<(String, String)>> {
        let info = self.region.info().clone();
        let raw = self.raw_state()?;
        let mut out = vec![
            ("migration region".to_string(), info.index.to_string()),
            ("region size".to_string(), format!("{:#x}", info.size)),
            ("region offset".to_string(), format!("{:#x}", info.offset)),
            ("region flags".to_string(), format!("{:#x}", info.flags)),
            (
                "device_state".to_string(),
                format!("{raw:#010x} = {}", V1State::from_raw(raw)),
            ),
        ];
        let areas = info.sparse_areas().unwrap_or_default();
        out.push((
            "data section".to_string(),
            if areas.is_empty() {
                "trapped (pread/pwrite)".to_string()
            } else {
                let list: Vec<String> = areas
                    .iter()
                    .map(|a| {
                        let how = if self.region.is_mapped(a.offset, a.size) {
                            "mmapped"
                        } else {
                            "not mapped"
                        };
                        format!("{:#x}+{:#x} {how}", a.offset, a.size)
                    })
                    .collect();
                format!("sparse mmap {}", list.join(", "))
            },
        ));
        Ok(out)
    }

    fn is_saving(&mut self) -> Result<bool> {
        Ok(V1State::from_raw(self.raw_state()?).is_saving())
    }

    fn run_state(&mut self) -> Result<RunState> {
        match V1State::from_raw(self.raw_state()?) {
            V1State::Running => Ok(RunState::Running),
            V1State::Stop => Ok(RunState::Stopped),
            other => Err(Error::protocol(
                "read the device's run state",
                format!("the device is in {other}, inside a migration"),
            )),
        }
    }

    fn quiesce(&mut self) -> Result<()> {
        // v1 has no quiescent peer-to-peer state.
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        // A pause in pre-copy clears RUNNING only (QEMU's v1 vfio_vmstate_change): 011b ->
        // 010b, the save going on stopped.
        if V1State::from_raw(self.raw_state()?) == V1State::PreCopy {
            return self.set_state(V1State::StopCopy);
        }
        self.set_state(V1State::Stop)
    }

    fn run(&mut self) -> Result<()> {
        self.set_state(V1State::Running)
    }

    fn start_pre_copy(&mut self) -> Result<()> {
        // Only from RUNNING: 000b -> 011b would run a paused VM's device.
        let now = V1State::from_raw(self.raw_state()?);
        if now != V1State::Running {
            return Err(Error::protocol(
                "enter pre-copy",
                format!("pre-copy starts only from RUNNING; the device is in {now}"),
            ));
        }
        self.home = RunState::Running;
        self.set_state(V1State::PreCopy)
    }

    fn start_stop_copy(&mut self) -> Result<()> {
        // A chunk read to its end but not yet consumed stays staged across the switch: the
        // next pending_bytes read (in stop-and-copy) consumes it, as the uAPI allows.
        if self.chunk.is_some_and(|c| c.done < c.size) {
            return Err(Error::protocol(
                "enter stop-and-copy",
                "a chunk is only partly read",
            ));
        }
        let mut raw = self.raw_state()?;
        // A save that begins here begins where the device is: from STOP (a paused VM, a
        // snapshot) a failure must return it to STOP, never run it.
        match V1State::from_raw(raw) {
            V1State::Running => self.home = RunState::Running,
            V1State::Stop => self.home = RunState::Stopped,
            _ => {}
        }
        if V1State::from_raw(raw) == V1State::Running {
            // QEMU 5.2-7.2 never write 001b -> 010b: the VM stops first (RUNNING cleared by
            // vfio_vmstate_change), then vfio_save_setup ORs SAVING in; v1-era drivers were
            // written against that sequence.
            self.set_state(V1State::Stop)?;
            raw = self.raw_state()?;
        }
        let value = compose(raw, V1State::StopCopy)
            .map_err(|e| Error::protocol("enter stop-and-copy", e.to_string()))?;
        self.region.write_state(value).map_err(|source| {
            let now = self
                .region
                .read_state()
                .map(|r| V1State::from_raw(r).to_string())
                .unwrap_or_else(|e| format!("unknown ({e})"));
            Error::Transition {
                step: "enter stop-and-copy".into(),
                from: V1State::from_raw(raw).to_string(),
                to: V1State::StopCopy.to_string(),
                now,
                source,
            }
        })
    }

    fn pending(&mut self) -> Result<Pending> {
        // Between chunks, reading pending_bytes is the protocol's own step; inside a chunk it
        // would consume the chunk early, so report the last value instead.
        let bytes = match self.chunk {
            Some(c) if c.done < c.size => self.last_pending,
            _ => {
                self.chunk = None;
                self.read_pending()?
            }
        };
        Ok(Pending {
            bytes,
            initial_bytes: None,
            stop_copy_bytes: StopCopySize::InPending,
            reinit: false,
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        let mut chunk = match self.chunk {
            Some(c) if c.done < c.size => c,
            _ => {
                // Step 1 (and step f of the previous iteration): consumes the last chunk.
                self.chunk = None;
                if self.read_pending()? == 0 {
                    return Ok(ReadOutcome::PhaseEnd);
                }
                match self.stage_chunk()? {
                    Some(chunk) => chunk,
                    None => return Ok(ReadOutcome::PhaseEnd),
                }
            }
        };
        let len = buf.len().min((chunk.size - chunk.done) as usize);
        if len == 0 {
            return Err(Error::protocol("read migration data", "empty read buffer"));
        }
        self.region
            .read_data(chunk.offset + chunk.done, &mut buf[..len])
            .map_err(|e| {
                Error::device(
                    format!(
                        "read {len} bytes of migration data at region offset {:#x}",
                        chunk.offset + chunk.done
                    ),
                    e,
                )
            })?;
        chunk.done += len as u64;
        let chunk_end = chunk.done == chunk.size;
        self.chunk = Some(chunk);
        Ok(ReadOutcome::Data { len, chunk_end })
    }

    fn finish_save(&mut self) -> Result<()> {
        self.set_state(V1State::Stop)
    }

    fn finish_handoff(&mut self) -> Result<()> {
        // Never the cancel arc back to RUNNING: the destination runs this state.
        self.set_state(V1State::Stop).map_err(|e| {
            let recovery = self.reset_to_running();
            Error::RolledBack {
                source: Box::new(e),
                device: self.identity().instance,
                recovery,
            }
        })
    }

    fn start_resume(&mut self) -> Result<()> {
        self.set_state(V1State::Resuming)
    }

    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
        let mut rest = data;
        loop {
            let mut chunk = match self.chunk.take() {
                Some(c) => c,
                None => self.next_resume_chunk()?,
            };
            if chunk.done == chunk.size && !rest.is_empty() {
                // The section is full and the source's chunk goes on: commit this piece, the
                // rest goes where `data_offset` says next (QEMU's v1 `vfio_load_buffer`).
                self.commit_piece(chunk.done)?;
                continue;
            }
            let take = rest.len().min((chunk.size - chunk.done) as usize);
            let (piece, after) = rest.split_at(take);
            self.region
                .write_data(chunk.offset + chunk.done, piece)
                .map_err(|e| {
                    Error::device(
                        format!(
                            "write {take} bytes of migration data at region offset {:#x}",
                            chunk.offset + chunk.done
                        ),
                        e,
                    )
                })?;
            chunk.done += take as u64;
            rest = after;
            if rest.is_empty() {
                if chunk_end {
                    self.commit_piece(chunk.done)?;
                } else {
                    self.chunk = Some(chunk);
                }
                return Ok(());
            }
            self.chunk = Some(chunk);
        }
    }

    fn load_state(&mut self) -> Result<()> {
        // v1 has no stopped state after RESUMING (100b -> 001b only): the driver takes the
        // state with each data_size write and on the RUNNING write.
        match self.chunk {
            Some(_) => Err(Error::protocol(
                "resume device",
                "the stream ended inside a chunk",
            )),
            None => Ok(()),
        }
    }

    fn prepare_run(&mut self) -> Result<()> {
        // No quiescent state in v1.
        Ok(())
    }

    fn finish_resume(&mut self) -> Result<()> {
        if self.chunk.is_some() {
            return Err(Error::protocol(
                "resume device",
                "the stream ended inside a chunk",
            ));
        }
        self.set_state(V1State::Running)
    }

    fn recover(&mut self) -> Recovery {
        self.chunk = None;
        let home = self.home_state();
        let (already, returned) = match self.home {
            RunState::Running => (Recovery::AlreadyRunning, Recovery::Resumed),
            RunState::Stopped => (Recovery::AlreadyStopped, Recovery::Stopped),
        };
        match self.raw_state().map(V1State::from_raw) {
            Ok(state) if state == home => already,
            Ok(state) if state.is_requestable() && state != V1State::Resuming => {
                match self.set_state(home) {
                    Ok(()) => returned,
                    Err(e) => {
                        log::warn!("recovery transition failed: {}", Report(&e));
                        self.reset_home()
                    }
                }
            }
            // ERROR, an invalid state, RESUMING (partial state) or an unreadable register.
            _ => self.reset_home(),
        }
    }

    fn abort_resume(&mut self) -> Recovery {
        self.reset_to_running()
    }
}
