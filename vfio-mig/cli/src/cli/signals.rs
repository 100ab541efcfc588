// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! SIGINT, SIGTERM and SIGHUP: the first one cancels the command so that it fails the way
//! any failure does (the engine rolls the source back to RUNNING and resets the
//! destination, the peer is told, sockets and partial files are removed); a second one ends
//! the process at once.
//!
//! A signal thread (signal-hook) records the signal and runs the command's cancel hooks:
//! they shut connections down, so that a wait for the peer returns, and wake a waiting
//! `recv`. Every device a command drives is wrapped in [`Cancellable`], whose data calls
//! fail once a signal arrived, so the engine's own failure path does the rollback.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};

use nix::sys::signal::{SigSet, Signal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use vfio_mig::backend::DeviceIdentity;
use vfio_mig::error::{Error, Result};
use vfio_mig::MigrationDevice;
use vfio_mig::{Capabilities, Pending, Protocol, ReadOutcome, Recovery};

/// A hook run (once) when the first signal arrives.
type Hook = Box<dyn FnOnce() + Send>;

/// The command's cancellation state: the process has one command, so this is process-wide.
struct State {
    signal: AtomicI32,
    hooks: Mutex<Vec<(u64, Hook)>>,
    next: Mutex<u64>,
    /// Files to remove if a second signal ends the process at once.
    paths: Mutex<Vec<PathBuf>>,
}

fn state() -> &'static State {
    static STATE: OnceLock<State> = OnceLock::new();
    STATE.get_or_init(|| State {
        signal: AtomicI32::new(0),
        hooks: Mutex::new(Vec::new()),
        next: Mutex::new(0),
        paths: Mutex::new(Vec::new()),
    })
}

/// The name of a signal for messages.
pub fn name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}

/// Installs the handlers and starts the signal thread. Call once, first thing in `main`: no
/// device is opened before. A signal the process started with blocked and pending (a
/// parent's mask is inherited across exec) is unblocked here and recorded before this
/// returns, so the command is cancelled before it touches anything rather than the signal
/// being lost; one that came before the handlers existed ended the process with its default
/// action, before any device was opened.
pub fn install() {
    let mut signals = match Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot handle signals ({e}): a signal ends vfio-mig without rollback");
            return;
        }
    };
    let mut ours = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        ours.add(signal);
    }
    if let Err(e) = ours.thread_unblock() {
        log::warn!("cannot unblock the signals it handles ({e})");
    }
    // What was pending reached the handlers on the unblock above.
    for signal in signals.pending() {
        received_signal(signal);
    }
    std::thread::spawn(move || {
        for signal in signals.forever() {
            received_signal(signal);
        }
    });
}

/// Records `signal`: the first cancels the command (its hooks run), a second ends the
/// process at once.
fn received_signal(signal: i32) {
    let s = state();
    if s.signal.swap(signal, Ordering::SeqCst) != 0 {
        // A second signal: end now, removing what is known to be partial.
        for p in s.paths.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = std::fs::remove_file(p);
        }
        std::process::exit(i32::from(super::outcome::abandon(signal)));
    }
    log::info!("{}: cancelling", name(signal));
    let hooks = std::mem::take(&mut *s.hooks.lock().unwrap_or_else(|e| e.into_inner()));
    for (_, hook) in hooks {
        hook();
    }
}

/// The signal that cancelled the command, if one did.
pub fn received() -> Option<i32> {
    match state().signal.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The exit status for a command that `signal` cancelled and that rolled back: 128 + its
/// number (130 SIGINT, 143 SIGTERM, 129 SIGHUP), as shells report a process killed by it.
pub fn exit_status(signal: i32) -> i32 {
    128 + signal
}

/// Fails with a clear error once a signal arrived.
pub fn check(step: &str) -> Result<()> {
    match received() {
        None => Ok(()),
        Some(s) => Err(Error::device(
            step,
            std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                format!("interrupted by {}", name(s)),
            ),
        )),
    }
}

/// A cancel hook, removed when dropped (the connection it shuts down is gone).
pub struct HookGuard(u64);

impl Drop for HookGuard {
    fn drop(&mut self) {
        state()
            .hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(id, _)| *id != self.0);
    }
}

/// Runs `hook` when the first signal arrives (at once, if one already did).
pub fn on_cancel(hook: impl FnOnce() + Send + 'static) -> HookGuard {
    let s = state();
    let mut next = s.next.lock().unwrap_or_else(|e| e.into_inner());
    *next += 1;
    let id = *next;
    if received().is_some() {
        hook();
    } else {
        s.hooks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, Box::new(hook)));
    }
    HookGuard(id)
}

/// Remembers a partial file or a socket, removed if a second signal ends the process.
pub fn remove_on_exit(path: PathBuf) {
    state()
        .paths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path);
}

/// Forgets a path given to [`remove_on_exit`] (it became the finished output).
pub fn keep(path: &std::path::Path) {
    state()
        .paths
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| p != path);
}

/// A device whose data calls fail once a signal arrived, so that a cancelled command takes
/// the engine's failure path (rollback) instead of ending with the device half-migrated.
/// Recovery calls always go through.
pub struct Cancellable(pub Box<dyn MigrationDevice>);

impl MigrationDevice for Cancellable {
    fn identity(&self) -> DeviceIdentity {
        self.0.identity()
    }
    fn protocol(&self) -> Protocol {
        self.0.protocol()
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
    fn state_name(&mut self) -> Result<String> {
        self.0.state_name()
    }
    fn details(&mut self) -> Result<Vec<(String, String)>> {
        self.0.details()
    }
    fn run_state(&mut self) -> Result<vfio_mig::RunState> {
        self.0.run_state()
    }
    fn quiesce(&mut self) -> Result<()> {
        check("quiesce the device")?;
        self.0.quiesce()
    }
    fn stop(&mut self) -> Result<()> {
        self.0.stop()
    }
    fn run(&mut self) -> Result<()> {
        self.0.run()
    }
    fn start_pre_copy(&mut self) -> Result<()> {
        check("start pre-copy")?;
        self.0.start_pre_copy()
    }
    fn start_stop_copy(&mut self) -> Result<()> {
        check("start stop-and-copy")?;
        self.0.start_stop_copy()
    }
    fn pending(&mut self) -> Result<Pending> {
        self.0.pending()
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome> {
        check("read the device state")?;
        self.0.read(buf)
    }
    fn finish_save(&mut self) -> Result<()> {
        self.0.finish_save()
    }
    // After the handoff the state has left: STOP (or the reset of a failed STOP) must run
    // even after a signal, never be refused into a rollback.
    fn finish_handoff(&mut self) -> Result<()> {
        self.0.finish_handoff()
    }
    fn load_state(&mut self) -> Result<()> {
        check("load the device state")?;
        self.0.load_state()
    }
    fn prepare_run(&mut self) -> Result<()> {
        check("quiesce the loaded device")?;
        self.0.prepare_run()
    }
    fn data_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.data_fd()
    }
    fn stop_copy_estimate(&mut self) -> Result<Option<u64>> {
        self.0.stop_copy_estimate()
    }

    fn is_saving(&mut self) -> Result<bool> {
        self.0.is_saving()
    }
    fn start_resume(&mut self) -> Result<()> {
        check("start resuming")?;
        self.0.start_resume()
    }
    fn write(&mut self, data: &[u8], chunk_end: bool) -> Result<()> {
        check("write the device state")?;
        self.0.write(data, chunk_end)
    }
    fn finish_resume(&mut self) -> Result<()> {
        check("resume the device")?;
        self.0.finish_resume()
    }
    fn recover(&mut self) -> Recovery {
        self.0.recover()
    }
    fn abort_resume(&mut self) -> Recovery {
        self.0.abort_resume()
    }
}
