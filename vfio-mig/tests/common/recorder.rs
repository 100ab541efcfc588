// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A device for the front door's tests: it reads out given chunks (a source) and keeps every
//! write (a destination), with the address of the bytes it was handed either way.

use std::sync::{Arc, Mutex};

use vfio_mig::backend::DeviceIdentity;
use vfio_mig::error::{Error, Result};
use vfio_mig::{Capabilities, MigrationDevice, Pending};
use vfio_mig::{Protocol, ReadOutcome, Recovery, RunState};

/// The model every recorder reports.
pub const MODEL: &str = "test:recorder";

/// What the recorder saw.
#[derive(Debug, Default)]
pub struct Log {
    /// What a source reads out, a chunk per read, in order.
    pub to_read: std::collections::VecDeque<Vec<u8>>,
    /// Each write: its bytes, `chunk_end`, and the address of its first byte.
    pub writes: Vec<(Vec<u8>, bool, usize)>,
    /// The address of the buffer of each read that returned data, in order.
    pub read_at: Vec<usize>,
    /// Called before each read with its index (from 0), outside the log's lock: it may
    /// block, and its error fails the read.
    pub before_read: Option<ReadHook>,
    /// Reads so far.
    pub reads: usize,
    /// In RESUMING.
    pub resuming: bool,
    /// Loaded (left RESUMING).
    pub loaded: bool,
    /// Reset (the destination gave up).
    pub reset: bool,
}

/// What a test does before a recorder's read.
pub struct ReadHook(pub Box<dyn FnMut(usize) -> Result<()> + Send>);

impl std::fmt::Debug for ReadHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadHook")
    }
}

/// The device, its log shared with the test.
pub struct Recorder(pub Arc<Mutex<Log>>);

impl Recorder {
    /// The log, also after a failed assertion poisoned it (the destination's drop resets the
    /// device while a test unwinds).
    pub fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MigrationDevice for Recorder {
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            model: MODEL.into(),
            instance: "recorder".into(),
        }
    }
    fn protocol(&self) -> Protocol {
        Protocol::V2
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pre_copy: false,
            p2p: true,
            migration_flags: 1,
        }
    }
    fn state_name(&mut self) -> Result<String> {
        Ok("RESUMING".into())
    }
    fn details(&mut self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
    fn run_state(&mut self) -> Result<RunState> {
        Ok(RunState::Stopped)
    }
    fn quiesce(&mut self) -> Result<()> {
        Ok(())
    }
    fn stop(&mut self) -> Result<()> {
        Ok(())
    }
    fn run(&mut self) -> Result<()> {
        Ok(())
    }
    fn start_pre_copy(&mut self) -> Result<()> {
        Err(Error::Unsupported("no pre-copy".into()))
    }
    fn start_stop_copy(&mut self) -> Result<()> {
        Ok(())
    }
    fn pending(&mut self) -> Result<Pending> {
        Ok(Pending::default())
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        let (hook, index) = {
            let mut log = self.log();
            log.reads += 1;
            (log.before_read.take(), log.reads - 1)
        };
        if let Some(mut hook) = hook {
            let before = (hook.0)(index);
            self.log().before_read = Some(hook);
            before?;
        }
        let Some(chunk) = self.log().to_read.pop_front() else {
            return Ok(ReadOutcome::PhaseEnd);
        };
        buf[..chunk.len()].copy_from_slice(&chunk);
        self.log().read_at.push(buf.as_ptr() as usize);
        Ok(ReadOutcome::Data {
            len: chunk.len(),
            chunk_end: true,
        })
    }
    fn finish_save(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish_handoff(&mut self) -> Result<()> {
        Ok(())
    }
    fn start_resume(&mut self) -> Result<()> {
        self.log().resuming = true;
        Ok(())
    }
    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
        let mut log = self.log();
        assert!(log.resuming && !log.reset, "a write outside RESUMING");
        log.writes
            .push((data.to_vec(), chunk_end, data.as_ptr() as usize));
        Ok(())
    }
    fn load_state(&mut self) -> Result<()> {
        self.log().loaded = true;
        Ok(())
    }
    fn prepare_run(&mut self) -> Result<()> {
        Ok(())
    }
    fn finish_resume(&mut self) -> Result<()> {
        Ok(())
    }
    fn recover(&mut self) -> Recovery {
        Recovery::AlreadyStopped
    }
    fn abort_resume(&mut self) -> Recovery {
        self.log().reset = true;
        Recovery::Reset
    }
}
