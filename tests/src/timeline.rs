// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The timeline of a whole migration: every state change of every source and destination
//! mock device, in order, and the invariants checked after every step of it.
//!
//! Each device of both sides is wrapped in a [`Recorder`](crate::recorder::Recorder) whose
//! probe is [`Timeline::probe`]: after every call that may change the device's state the
//! mock's own status (its state, its verified-resume flag, its reset count) is appended. The
//! status comes from the mock, not from the code under test; a device's probe runs on the
//! thread that made the call, before that thread sends anything on, so the order of the
//! steps respects the protocol's causality.
//!
//! The invariants, from the kernel uAPI and QEMU's order of events:
//! - **no state live on both sides**: once any destination device entered RUNNING with the
//!   migrated state (the mock's verified-resume flag, in RUNNING), no source device is live (RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P)
//!   unless it was reset since the migration began (it then runs its reset state);
//! - **the destination barrier**: when the first destination device runs, every destination
//!   device of the unit has verified its state (left RESUMING for STOP, RUNNING_P2P or
//!   RUNNING with it);
//! - **the end**: every device ends in its start state (RUNNING with its own state), the
//!   handed-off state (sources stopped, destinations running the migrated state), or reset
//!   with the error saying so.

use std::sync::{Arc, Mutex};

use vfio_mig::MigrationDevice;
use vfio_mig_mock::{MockHandle, MockStatus};

use crate::recorder::StateProbe;

/// The recorded timeline of one migration of a unit of `sources` pairs.
#[derive(Debug)]
pub struct Timeline {
    handles: Vec<MockHandle>,
    sources: usize,
    initial: Vec<MockStatus>,
    steps: Mutex<Vec<(usize, MockStatus)>>,
}

/// What the steps showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    /// Some destination device ran the migrated state.
    pub ran: bool,
    /// Steps recorded.
    pub steps: usize,
}

/// v1 `device_state` bits (the uAPI's `VFIO_DEVICE_STATE_V1_*`).
const V1_RUNNING: u32 = 0b001;
const V1_MASK: u32 = 0b111;

/// The device runs (and may initiate DMA or answer peers): v2 RUNNING, RUNNING_P2P,
/// PRE_COPY, PRE_COPY_P2P; v1 any state with the RUNNING bit (001b, 011b).
fn live(st: &MockStatus) -> bool {
    match st.v2_state {
        Some(_) => matches!(
            st.state_name().as_str(),
            "RUNNING" | "RUNNING_P2P" | "PRE_COPY" | "PRE_COPY_P2P"
        ),
        None => st.state_raw & V1_RUNNING != 0 && st.state_raw & V1_MASK != 0b111,
    }
}

/// The device is stopped, not saving or resuming: v2 STOP, v1 000b.
fn stopped(st: &MockStatus) -> bool {
    match st.v2_state {
        Some(_) => st.state_name() == "STOP",
        None => st.state_raw & V1_MASK == 0,
    }
}

/// The steps as `slot:STATE` (with `(ran)` and reset counts), for a violation's message.
fn history(steps: &[(usize, MockStatus)]) -> String {
    steps
        .iter()
        .map(|(slot, st)| {
            format!(
                "{slot}:{}{}/r{}",
                st.state_name(),
                if st.resumed_ok { "(ran)" } else { "" },
                st.resets
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Timeline {
    /// A timeline over the mocks of a unit: `handles[..sources]` the sources,
    /// `handles[sources..]` the destinations (slot `i` is `handles[i]`). Their statuses now
    /// are the start.
    pub fn new(handles: Vec<MockHandle>, sources: usize) -> Arc<Self> {
        let initial = handles.iter().map(MockHandle::status).collect();
        Arc::new(Self {
            handles,
            sources,
            initial,
            steps: Mutex::new(Vec::new()),
        })
    }

    /// The probe of a [`Recorder`](crate::recorder::Recorder) of slot `slot`: records the
    /// mock's status as the next step and names its state.
    pub fn probe(self: &Arc<Self>) -> StateProbe {
        let me = self.clone();
        Arc::new(move |_: &mut dyn MigrationDevice, slot: usize| {
            let mut steps = me.steps.lock().unwrap_or_else(|p| p.into_inner());
            let st = me.handles[slot].status();
            let name = st.state_name();
            steps.push((slot, st));
            name
        })
    }

    fn is_source(&self, slot: usize) -> bool {
        slot < self.sources
    }

    /// A source that ran again with its own state, not a reset one.
    fn live_with_state(&self, slot: usize, st: &MockStatus) -> bool {
        live(st) && st.resets == self.initial[slot].resets
    }

    /// Replays the steps and checks the step invariants after every one; `Err` describes the
    /// first violation with the unit's states then.
    pub fn replay(&self) -> Result<Replay, String> {
        let steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = self.initial.clone();
        let mut ran = false;
        for (i, (slot, st)) in steps.iter().enumerate() {
            now[*slot] = st.clone();
            let states = || {
                now.iter()
                    .enumerate()
                    .map(|(s, st)| {
                        let side = if self.is_source(s) { "src" } else { "dst" };
                        let idx = s % self.sources;
                        format!(
                            "{side}{idx}={}{}",
                            st.state_name(),
                            if st.resumed_ok { "(ran)" } else { "" }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            // The mock takes the loaded state (resumed_ok) on its way out of STOP, at
            // RUNNING_P2P already; the state runs once the device enters RUNNING.
            if !self.is_source(*slot) && st.resumed_ok && st.is_running() && !ran {
                ran = true;
                let unloaded = now[self.sources..]
                    .iter()
                    .find(|d| !(d.resumed_ok || stopped(d) || d.state_name() == "RUNNING_P2P"));
                if unloaded.is_some() {
                    return Err(format!(
                        "step {i}: a destination runs before every device of the unit verified \
                         its state: {}; history: {}",
                        states(),
                        history(&steps[..=i])
                    ));
                }
            }
            if ran {
                if let Some(s) = (0..self.sources).find(|&s| self.live_with_state(s, &now[s])) {
                    return Err(format!(
                        "step {i}: source {s} is live with its state while a destination runs \
                         it: {}; history: {}",
                        states(),
                        history(&steps[..=i])
                    ));
                }
            }
        }
        Ok(Replay {
            ran,
            steps: steps.len(),
        })
    }

    /// Checks how the migration ended: `error` is its error text (`None` on success), `ran`
    /// what [`Timeline::replay`] found. `Err` names the device and what is wrong.
    pub fn check_end(&self, error: Option<&str>, ran: bool) -> Result<(), String> {
        let end: Vec<MockStatus> = self.handles.iter().map(MockHandle::status).collect();
        let reset = |slot: usize| end[slot].resets > self.initial[slot].resets;
        let touched: Vec<bool> = {
            let steps = self.steps.lock().unwrap_or_else(|p| p.into_inner());
            (0..end.len())
                .map(|slot| steps.iter().any(|(s, st)| *s == slot && !st.is_running()))
                .collect()
        };
        if let Some(text) = error {
            if text.contains('\n') {
                return Err(format!("the error is not one line: {text}"));
            }
            // A source reset lost the VM's device state; a destination reset after it ran
            // lost the migrated one: the error must say so. (A destination reset before it
            // ran is the documented outcome of every failure.)
            let lost = (0..end.len()).find(|&s| reset(s) && (self.is_source(s) || ran));
            if let (Some(slot), false) = (lost, text.contains("reset")) {
                return Err(format!(
                    "device slot {slot} was reset and the error does not say so: {text}"
                ));
            }
            if ran && !text.contains("point of no return") {
                return Err(format!(
                    "a destination ran, yet the error does not say the point of no return \
                     was passed: {text}"
                ));
            }
        }
        for (slot, st) in end.iter().enumerate() {
            let who = if self.is_source(slot) {
                format!("source {slot}")
            } else {
                format!("destination {}", slot - self.sources)
            };
            let fine = match (self.is_source(slot), error, ran) {
                // Handed off: the source stopped (or reset if its STOP failed).
                (true, None, _) | (true, Some(_), true) => {
                    stopped(st) || (reset(slot) && st.is_running())
                }
                // Not handed off: back in its start state, with its state or reset.
                (true, Some(_), false) => st.is_running(),
                (false, None, _) => st.resumed_ok && st.is_running(),
                (false, Some(_), true) => {
                    (st.resumed_ok && st.is_running())
                        || (reset(slot) && st.is_running() && !st.resumed_ok)
                }
                (false, Some(_), false) => {
                    !st.resumed_ok && st.is_running() && (reset(slot) || !touched[slot])
                }
            };
            if !fine {
                return Err(format!(
                    "{who} ends in {} (resumed_ok={}, resets {} -> {}), error: {error:?}",
                    st.state_name(),
                    st.resumed_ok,
                    self.initial[slot].resets,
                    st.resets
                ));
            }
        }
        Ok(())
    }
}
