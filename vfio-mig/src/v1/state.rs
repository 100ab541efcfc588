// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! v1 `device_state`: its bits, the named states, validity and the uAPI's transitions.
//!
//! Pure logic, no I/O: the driver and the mock device share it, so both agree on the rules.
//!
//! ```text
//!  bit 2 (RESUMING) | bit 1 (SAVING) | bit 0 (RUNNING)
//!        0          |       0        |       0          STOP
//!        0          |       0        |       1          RUNNING (default)
//!        0          |       1        |       0          STOP-AND-COPY
//!        0          |       1        |       1          PRE-COPY
//!        1          |       0        |       0          RESUMING
//!        1          |       0        |       1          invalid
//!        1          |       1        |       0          ERROR
//!        1          |       1        |       1          invalid
//! ```
//! Bits 3-31 are reserved: a user changes the low three bits by read-modify-write and leaves
//! the others as the device reported them.

use std::fmt;

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_STATE_MASK, VFIO_DEVICE_STATE_V1_RESUMING, VFIO_DEVICE_STATE_V1_RUNNING,
    VFIO_DEVICE_STATE_V1_SAVING,
};

/// Bit 0: the device is running.
pub const RUNNING: u32 = VFIO_DEVICE_STATE_V1_RUNNING;
/// Bit 1: the device is saving its state.
pub const SAVING: u32 = VFIO_DEVICE_STATE_V1_SAVING;
/// Bit 2: the device is resuming from saved state.
pub const RESUMING: u32 = VFIO_DEVICE_STATE_V1_RESUMING;
/// The three state bits; the rest are reserved.
pub const STATE_MASK: u32 = VFIO_DEVICE_STATE_MASK;

/// The meaning of the low three bits of `device_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum V1State {
    /// 000b: stopped.
    Stop,
    /// 001b: running, the default.
    Running,
    /// 011b: running and saving (pre-copy).
    PreCopy,
    /// 010b: stopped and saving (stop-and-copy).
    StopCopy,
    /// 100b: loading saved state.
    Resuming,
    /// 110b: the device failed; only a reset leaves this state.
    Error,
    /// 101b or 111b: not a state.
    Invalid(u32),
}

impl V1State {
    /// Decodes the low three bits of a raw `device_state`.
    pub fn from_raw(raw: u32) -> Self {
        match raw & STATE_MASK {
            0 => V1State::Stop,
            r if r == RUNNING => V1State::Running,
            r if r == RUNNING | SAVING => V1State::PreCopy,
            r if r == SAVING => V1State::StopCopy,
            r if r == RESUMING => V1State::Resuming,
            r if r == SAVING | RESUMING => V1State::Error,
            r => V1State::Invalid(r),
        }
    }

    /// The low three bits of this state.
    pub fn bits(self) -> u32 {
        match self {
            V1State::Stop => 0,
            V1State::Running => RUNNING,
            V1State::PreCopy => RUNNING | SAVING,
            V1State::StopCopy => SAVING,
            V1State::Resuming => RESUMING,
            V1State::Error => SAVING | RESUMING,
            V1State::Invalid(r) => r & STATE_MASK,
        }
    }

    /// Whether a user may ask for this state (not ERROR, not an invalid combination).
    pub fn is_requestable(self) -> bool {
        !matches!(self, V1State::Error | V1State::Invalid(_))
    }

    /// Whether the device is saving (pending_bytes and data_offset are meaningful).
    pub fn is_saving(self) -> bool {
        matches!(self, V1State::PreCopy | V1State::StopCopy)
    }
}

impl fmt::Display for V1State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            V1State::Stop => write!(f, "STOP (000b)"),
            V1State::Running => write!(f, "RUNNING (001b)"),
            V1State::PreCopy => write!(f, "PRE-COPY (011b)"),
            V1State::StopCopy => write!(f, "STOP-AND-COPY (010b)"),
            V1State::Resuming => write!(f, "RESUMING (100b)"),
            V1State::Error => write!(f, "ERROR (110b)"),
            V1State::Invalid(r) => write!(f, "invalid ({:03b}b)", r & STATE_MASK),
        }
    }
}

/// Why a state change is refused before it reaches the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransitionError {
    /// The target is ERROR or an invalid bit combination.
    NotRequestable(V1State),
    /// The device is in ERROR (or an invalid state): only a reset helps.
    DeviceFailed(V1State),
    /// The uAPI defines no such transition.
    NoArc(V1State, V1State),
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionError::NotRequestable(s) => write!(f, "{s} cannot be requested"),
            TransitionError::DeviceFailed(s) => write!(f, "device is in {s}; it needs a reset"),
            TransitionError::NoArc(a, b) => write!(f, "the v1 uAPI has no transition {a} -> {b}"),
        }
    }
}

/// The transitions of the uAPI's table, plus the writes QEMU 5.2-7.2 makes.
///
/// From the table: normal shutdown RUNNING -> STOP; save/suspend RUNNING -> STOP-AND-COPY
/// -> STOP; live migration RUNNING -> PRE-COPY -> STOP-AND-COPY -> STOP; resuming
/// RUNNING -> RESUMING; resumed RESUMING -> RUNNING. The uAPI lets the user "transition the
/// device to any valid state reachable from the current state", and QEMU writes more:
/// STOP -> STOP-AND-COPY (`vfio_save_setup` ORs SAVING into a paused device's bits),
/// STOP -> RESUMING, the returns to RUNNING of a cancelled save or a resumed VM (from any
/// saving state, or STOP), and PRE-COPY -> STOP (reachable through STOP-AND-COPY; a pause
/// that abandons the save in one write).
pub fn is_arc(from: V1State, to: V1State) -> bool {
    use V1State::*;
    if from == to {
        return from.is_requestable();
    }
    matches!(
        (from, to),
        (Running, Stop)
            | (Running, StopCopy)
            | (Running, PreCopy)
            | (Running, Resuming)
            | (PreCopy, StopCopy)
            | (PreCopy, Stop)
            | (PreCopy, Running)
            | (StopCopy, Stop)
            | (StopCopy, Running)
            | (Stop, Running)
            | (Stop, StopCopy)
            | (Stop, Resuming)
            | (Resuming, Running)
    )
}

/// Checks a transition and computes the raw value to write: the target's three bits over the
/// current value's reserved bits 3-31 (read-modify-write).
pub fn compose(current_raw: u32, target: V1State) -> Result<u32, TransitionError> {
    let from = V1State::from_raw(current_raw);
    if !target.is_requestable() {
        return Err(TransitionError::NotRequestable(target));
    }
    if !from.is_requestable() {
        return Err(TransitionError::DeviceFailed(from));
    }
    if !is_arc(from, target) {
        return Err(TransitionError::NoArc(from, target));
    }
    Ok((current_raw & !STATE_MASK) | target.bits())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [V1State; 8] = [
        V1State::Stop,
        V1State::Running,
        V1State::PreCopy,
        V1State::StopCopy,
        V1State::Resuming,
        V1State::Error,
        V1State::Invalid(5),
        V1State::Invalid(7),
    ];

    #[test]
    fn decoding_covers_all_eight_values() {
        for raw in 0..8u32 {
            let s = V1State::from_raw(raw);
            assert_eq!(s.bits(), raw, "{s}");
        }
        assert_eq!(V1State::from_raw(0b110), V1State::Error);
        assert_eq!(V1State::from_raw(0b101), V1State::Invalid(5));
        assert_eq!(V1State::from_raw(0b111), V1State::Invalid(7));
    }

    #[test]
    fn the_five_uapi_sequences_are_arcs() {
        use V1State::*;
        let sequences: [&[V1State]; 5] = [
            &[Running, Stop],
            &[Running, StopCopy, Stop],
            &[Running, PreCopy, StopCopy, Stop],
            &[Running, Resuming],
            &[Resuming, Running],
        ];
        for seq in sequences {
            for pair in seq.windows(2) {
                assert!(is_arc(pair[0], pair[1]), "{} -> {}", pair[0], pair[1]);
            }
        }
    }

    #[test]
    fn error_and_invalid_states_are_refused() {
        assert_eq!(
            compose(RUNNING, V1State::Error),
            Err(TransitionError::NotRequestable(V1State::Error))
        );
        assert_eq!(
            compose(RUNNING, V1State::Invalid(5)),
            Err(TransitionError::NotRequestable(V1State::Invalid(5)))
        );
        assert_eq!(
            compose(SAVING | RESUMING, V1State::Running),
            Err(TransitionError::DeviceFailed(V1State::Error))
        );
        assert_eq!(
            compose(RESUMING, V1State::StopCopy),
            Err(TransitionError::NoArc(V1State::Resuming, V1State::StopCopy))
        );
    }

    proptest! {
        #[test]
        fn compose_preserves_reserved_bits(reserved in any::<u32>(), from in 0usize..8, to in 0usize..8) {
            let current = (reserved & !STATE_MASK) | ALL[from].bits();
            match compose(current, ALL[to]) {
                Ok(raw) => {
                    prop_assert_eq!(raw & !STATE_MASK, reserved & !STATE_MASK);
                    prop_assert_eq!(V1State::from_raw(raw), ALL[to]);
                    prop_assert!(is_arc(ALL[from], ALL[to]));
                }
                Err(_) => prop_assert!(!is_arc(ALL[from], ALL[to]) || !ALL[to].is_requestable() || !ALL[from].is_requestable()),
            }
        }

        #[test]
        fn no_arc_leaves_or_enters_a_failed_state(from in 0usize..8, to in 0usize..8) {
            if !ALL[from].is_requestable() || !ALL[to].is_requestable() {
                prop_assert!(!is_arc(ALL[from], ALL[to]));
            }
        }
    }
}
