// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! v2 migration states and the kernel's arcs between them.
//!
//! Pure logic, no I/O: the driver plans its walks with it and the mock device executes
//! transitions with it, so both follow the rules the kernel's `vfio_mig_get_next_state`
//! enforces (drivers/vfio/vfio_main.c):
//!
//! - [`next_step`] is the first single arc the kernel takes from one state towards another,
//!   with arcs through states the device does not support (no `P2P` flag: no `RUNNING_P2P` /
//!   `PRE_COPY_P2P`; no `PRE_COPY` flag: no `PRE_COPY*`) skipped over, as the kernel does;
//! - [`plan`] is the whole walk of single arcs, [`is_arc`] says whether a pair is one arc;
//! - [`returns_data_fd`] says which arcs open a data transfer session (a new `data_fd`).
//!
//! The kernel refuses (EINVAL) a request whose source or target state the device's flags do
//! not support, any request made in ERROR or for ERROR, and STOP_COPY -> PRE_COPY /
//! PRE_COPY_P2P. Every other pair of supported states is reachable.

use std::fmt;
use std::str::FromStr;

use vfio_bindings::bindings::vfio::{
    vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR as RAW_ERROR,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY as RAW_PRE_COPY,
    vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P as RAW_PRE_COPY_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING as RAW_RESUMING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING as RAW_RUNNING,
    vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P as RAW_RUNNING_P2P,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP as RAW_STOP,
    vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY as RAW_STOP_COPY, VFIO_MIGRATION_P2P,
    VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
};

bitflags::bitflags! {
    /// The `flags` of `VFIO_DEVICE_FEATURE_MIGRATION`: which optional states a device supports.
    ///
    /// Unknown bits are kept (`from_bits_retain`), as the kernel may define more.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MigrationFlags: u64 {
        /// STOP, STOP_COPY and RESUMING (mandatory for migration).
        const STOP_COPY = VFIO_MIGRATION_STOP_COPY as u64;
        /// RUNNING_P2P (and PRE_COPY_P2P together with `PRE_COPY`).
        const P2P = VFIO_MIGRATION_P2P as u64;
        /// PRE_COPY (and PRE_COPY_P2P together with `P2P`).
        const PRE_COPY = VFIO_MIGRATION_PRE_COPY as u64;
    }
}

impl fmt::Display for MigrationFlags {
    /// `0x7 (STOP_COPY | P2P | PRE_COPY)`; unknown bits are shown in hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<String> = self.iter_names().map(|(n, _)| n.to_string()).collect();
        let unknown = self.bits() & !Self::all().bits();
        if unknown != 0 {
            names.push(format!("{unknown:#x}"));
        }
        if names.is_empty() {
            names.push("none".into());
        }
        write!(f, "{:#x} ({})", self.bits(), names.join(" | "))
    }
}

/// A v2 device migration state (`enum vfio_device_mig_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigState {
    /// The device failed a transition and could not reach a valid state; only
    /// `VFIO_DEVICE_RESET` leaves it (to RUNNING). Never a valid request.
    Error,
    /// Stopped: no DMA, no interrupts, no internal state change.
    Stop,
    /// Running normally (the state after open and after reset).
    Running,
    /// Stopped, with the device state streaming out of the data fd (end of stream: read 0).
    StopCopy,
    /// Stopped, loading a new state written into the data fd.
    Resuming,
    /// Running, but initiating no peer-to-peer DMA (needs the `P2P` flag).
    RunningP2p,
    /// Running, with initial and dirty state streaming out of the data fd (needs `PRE_COPY`).
    PreCopy,
    /// PRE_COPY without peer-to-peer DMA (needs `PRE_COPY` and `P2P`).
    PreCopyP2p,
}

impl MigState {
    /// All eight states, in the order of their raw values.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// Decodes a raw `device_state`; `None` for values the uAPI does not define.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            RAW_ERROR => MigState::Error,
            RAW_STOP => MigState::Stop,
            RAW_RUNNING => MigState::Running,
            RAW_STOP_COPY => MigState::StopCopy,
            RAW_RESUMING => MigState::Resuming,
            RAW_RUNNING_P2P => MigState::RunningP2p,
            RAW_PRE_COPY => MigState::PreCopy,
            RAW_PRE_COPY_P2P => MigState::PreCopyP2p,
            _ => return None,
        })
    }

    /// The raw `device_state` value.
    pub fn raw(self) -> u32 {
        match self {
            MigState::Error => RAW_ERROR,
            MigState::Stop => RAW_STOP,
            MigState::Running => RAW_RUNNING,
            MigState::StopCopy => RAW_STOP_COPY,
            MigState::Resuming => RAW_RESUMING,
            MigState::RunningP2p => RAW_RUNNING_P2P,
            MigState::PreCopy => RAW_PRE_COPY,
            MigState::PreCopyP2p => RAW_PRE_COPY_P2P,
        }
    }

    /// The uAPI name without its prefix, e.g. `STOP_COPY`.
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }

    /// The migration flags a device needs for this state; `None` for ERROR, which no device
    /// "supports" as a request or a starting point.
    pub fn required_flags(self) -> Option<MigrationFlags> {
        Some(match self {
            MigState::Error => return None,
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                MigrationFlags::STOP_COPY
            }
            MigState::RunningP2p => MigrationFlags::STOP_COPY | MigrationFlags::P2P,
            MigState::PreCopy => MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY,
            MigState::PreCopyP2p => {
                MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY
            }
        })
    }

    /// Whether a device with `flags` supports this state (ERROR: never).
    pub fn is_supported(self, flags: MigrationFlags) -> bool {
        self.required_flags()
            .is_some_and(|need| flags.contains(need))
    }

    /// Whether a data transfer session (a data fd) belongs to this state: the saving group
    /// (PRE_COPY, PRE_COPY_P2P, STOP_COPY) and RESUMING.
    pub fn is_streaming(self) -> bool {
        self.is_saving() || self == MigState::Resuming
    }

    /// Whether this state is in the saving group, whose states share one data fd.
    pub fn is_saving(self) -> bool {
        matches!(
            self,
            MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
        )
    }

    /// Whether this is PRE_COPY or PRE_COPY_P2P, where the data fd has a temporary end.
    pub fn is_pre_copy(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p)
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for MigState {
    type Err = String;

    /// Parses a state name (`stop_copy`, `STOP-COPY`, `running_p2p`, ...), case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_uppercase().replace('-', "_");
        MigState::ALL
            .into_iter()
            .find(|st| st.name() == wanted)
            .ok_or_else(|| format!("unknown v2 migration state `{s}`"))
    }
}

/// Whether a transition from `from` to `to` opens a new data session, so that the kernel
/// returns a new data fd: it ends in a streaming state and does not stay inside the saving
/// group. As single arcs these are RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P,
/// STOP -> STOP_COPY and STOP -> RESUMING; moves inside the saving group keep the session.
pub fn returns_data_fd(from: MigState, to: MigState) -> bool {
    from != to && to.is_streaming() && !(from.is_saving() && to.is_saving())
}

/// Why the kernel refuses a state change request (it answers EINVAL to all of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcError {
    /// The device is in ERROR: only a reset leaves it.
    DeviceFailed,
    /// ERROR cannot be requested.
    ErrorRequested,
    /// The state needs migration flags the device lacks.
    Unsupported(MigState, MigrationFlags),
    /// The uAPI blocks this combination (STOP_COPY -> PRE_COPY or PRE_COPY_P2P).
    Blocked(MigState, MigState),
}

impl fmt::Display for ArcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArcError::DeviceFailed => write!(f, "the device is in ERROR; only a reset leaves it"),
            ArcError::ErrorRequested => write!(f, "ERROR cannot be requested"),
            ArcError::Unsupported(s, flags) => write!(
                f,
                "{s} is not supported by a device with migration flags {flags}"
            ),
            ArcError::Blocked(a, b) => write!(f, "the v2 uAPI refuses {a} -> {b}"),
        }
    }
}

impl std::error::Error for ArcError {}

/// The kernel's full-featured table: the next state on the way from `from` to `to` when every
/// optional state is supported. ERROR marks a refused combination.
fn table(from: MigState, to: MigState) -> MigState {
    use MigState::*;
    if from == to {
        return from;
    }
    match from {
        Stop => match to {
            StopCopy | Resuming | Error => to,
            Running | PreCopy | PreCopyP2p | RunningP2p => RunningP2p,
            Stop => Stop,
        },
        Running => match to {
            PreCopy | Error => to,
            Stop | PreCopyP2p | StopCopy | Resuming | RunningP2p => RunningP2p,
            Running => Running,
        },
        PreCopy => match to {
            PreCopyP2p | StopCopy => PreCopyP2p,
            Stop | Running | Resuming | RunningP2p => Running,
            Error | PreCopy => to,
        },
        PreCopyP2p => match to {
            PreCopy | StopCopy | Error => to,
            Stop | Running | Resuming | RunningP2p => RunningP2p,
            PreCopyP2p => to,
        },
        StopCopy => match to {
            PreCopy | PreCopyP2p | Error => Error,
            Stop | Running | Resuming | RunningP2p => Stop,
            StopCopy => to,
        },
        Resuming => match to {
            Error => Error,
            _ => Stop,
        },
        RunningP2p => match to {
            Stop | StopCopy | Resuming => Stop,
            Running | PreCopy => Running,
            PreCopyP2p | Error => to,
            RunningP2p => to,
        },
        Error => Error,
    }
}

/// The first single arc the kernel takes from `from` towards `to` for a device with `flags`:
/// the table above with steps through unsupported states skipped, as the kernel does. Returns
/// `to` itself when `from == to` (a no-op request) or when `from -> to` is one arc.
pub fn next_step(
    from: MigState,
    to: MigState,
    flags: MigrationFlags,
) -> Result<MigState, ArcError> {
    if from == MigState::Error {
        return Err(ArcError::DeviceFailed);
    }
    if to == MigState::Error {
        return Err(ArcError::ErrorRequested);
    }
    for s in [from, to] {
        if !s.is_supported(flags) {
            return Err(ArcError::Unsupported(s, flags));
        }
    }
    let mut next = table(from, to);
    // Each skip moves strictly closer to `to` in the full table, whose walks are at most four
    // arcs long; the bound only guards against a broken table.
    for _ in 0..MigState::ALL.len() {
        if next == MigState::Error {
            return Err(ArcError::Blocked(from, to));
        }
        if next.is_supported(flags) {
            return Ok(next);
        }
        next = table(next, to);
    }
    Err(ArcError::Blocked(from, to))
}

/// Whether `from -> to` is one arc the kernel accepts for a device with `flags`
/// (`from != to`; a request for the current state is a no-op, not an arc).
pub fn is_arc(from: MigState, to: MigState, flags: MigrationFlags) -> bool {
    from != to && next_step(from, to, flags) == Ok(to)
}

/// The whole walk from `from` to `to`: the states after `from`, one per arc, ending with `to`
/// (empty when `from == to`).
pub fn plan(
    from: MigState,
    to: MigState,
    flags: MigrationFlags,
) -> Result<Vec<MigState>, ArcError> {
    plan_inline(from, to, flags).map(|p| p.as_slice().to_vec())
}

/// A path of [`plan`] held inline (no allocation: the driver plans every transition).
#[derive(Debug, Clone, Copy)]
pub(crate) struct InlinePath {
    arcs: [MigState; MigState::ALL.len()],
    len: usize,
}

impl InlinePath {
    pub(crate) fn as_slice(&self) -> &[MigState] {
        &self.arcs[..self.len]
    }
}

/// [`plan`], into an [`InlinePath`].
pub(crate) fn plan_inline(
    from: MigState,
    to: MigState,
    flags: MigrationFlags,
) -> Result<InlinePath, ArcError> {
    let mut path = InlinePath {
        arcs: [from; MigState::ALL.len()],
        len: 0,
    };
    let mut cur = from;
    while cur != to {
        let next = next_step(cur, to, flags)?;
        if path.len == path.arcs.len() {
            // Longer than there are states: cannot happen with the kernel's table (checked by
            // the tests).
            return Err(ArcError::Blocked(from, to));
        }
        path.arcs[path.len] = next;
        path.len += 1;
        cur = next;
    }
    if path.len == 0 {
        // A no-op request is still refused for states the kernel refuses.
        next_step(from, to, flags)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use MigState::*;

    const FULL: MigrationFlags = MigrationFlags::all();

    fn flags(bits: u64) -> MigrationFlags {
        MigrationFlags::from_bits_retain(bits)
    }

    #[test]
    fn raw_values_round_trip_and_match_the_uapi() {
        for (i, s) in MigState::ALL.iter().enumerate() {
            assert_eq!(s.raw(), i as u32);
            assert_eq!(MigState::from_raw(i as u32), Some(*s));
            assert_eq!(s.name().parse::<MigState>(), Ok(*s));
        }
        assert_eq!(MigState::from_raw(8), None);
        assert_eq!("pre-copy_p2p".parse::<MigState>(), Ok(PreCopyP2p));
        assert!("SAVING".parse::<MigState>().is_err());
        assert_eq!(StopCopy.to_string(), "STOP_COPY");
    }

    #[test]
    fn flags_display() {
        assert_eq!(FULL.to_string(), "0x7 (STOP_COPY | P2P | PRE_COPY)");
        assert_eq!(flags(0x11).to_string(), "0x11 (STOP_COPY | 0x10)");
        assert_eq!(flags(0).to_string(), "0x0 (none)");
    }

    #[test]
    fn kernel_combination_paths_with_every_feature() {
        // The combination transitions the kernel's comment lists for a full-featured device.
        let expect: &[&[MigState]] = &[
            &[PreCopy, PreCopyP2p, StopCopy],
            &[PreCopy, Running, RunningP2p],
            &[PreCopy, Running, RunningP2p, Stop],
            &[PreCopy, Running, RunningP2p, Stop, Resuming],
            &[PreCopyP2p, RunningP2p, Running],
            &[PreCopyP2p, RunningP2p, Stop],
            &[PreCopyP2p, RunningP2p, Stop, Resuming],
            &[Resuming, Stop, RunningP2p],
            &[Resuming, Stop, RunningP2p, PreCopyP2p],
            &[Resuming, Stop, RunningP2p, Running],
            &[Resuming, Stop, RunningP2p, Running, PreCopy],
            &[Resuming, Stop, StopCopy],
            &[Running, RunningP2p, PreCopyP2p],
            &[Running, RunningP2p, Stop],
            &[Running, RunningP2p, Stop, Resuming],
            &[Running, RunningP2p, Stop, StopCopy],
            &[RunningP2p, Running, PreCopy],
            &[RunningP2p, Stop, Resuming],
            &[RunningP2p, Stop, StopCopy],
            &[Stop, RunningP2p, PreCopyP2p],
            &[Stop, RunningP2p, Running],
            &[Stop, RunningP2p, Running, PreCopy],
            &[StopCopy, Stop, Resuming],
            &[StopCopy, Stop, RunningP2p],
            &[StopCopy, Stop, RunningP2p, Running],
        ];
        for path in expect {
            let (from, to) = (path[0], *path.last().unwrap());
            assert_eq!(
                plan(from, to, FULL).unwrap(),
                path[1..].to_vec(),
                "{from} -> {to}"
            );
        }
    }

    #[test]
    fn unsupported_states_are_skipped() {
        let basic = MigrationFlags::STOP_COPY;
        let pre = MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY;
        let p2p = MigrationFlags::STOP_COPY | MigrationFlags::P2P;
        assert_eq!(plan(Running, Stop, basic).unwrap(), vec![Stop]);
        assert_eq!(
            plan(Running, StopCopy, basic).unwrap(),
            vec![Stop, StopCopy]
        );
        assert_eq!(plan(Stop, Running, basic).unwrap(), vec![Running]);
        assert_eq!(plan(PreCopy, StopCopy, pre).unwrap(), vec![StopCopy]);
        assert_eq!(plan(PreCopy, Stop, pre).unwrap(), vec![Running, Stop]);
        assert_eq!(plan(Stop, PreCopy, pre).unwrap(), vec![Running, PreCopy]);
        assert_eq!(
            plan(Resuming, Running, p2p).unwrap(),
            vec![Stop, RunningP2p, Running]
        );
        assert!(is_arc(PreCopy, StopCopy, pre));
        assert!(!is_arc(PreCopy, StopCopy, FULL));
        assert!(is_arc(Running, Stop, basic));
        assert!(!is_arc(Running, Stop, p2p));
    }

    #[test]
    fn refusals() {
        let pre = MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY;
        assert_eq!(next_step(Error, Running, FULL), Err(ArcError::DeviceFailed));
        assert_eq!(
            next_step(Running, Error, FULL),
            Err(ArcError::ErrorRequested)
        );
        assert_eq!(
            next_step(Running, RunningP2p, pre),
            Err(ArcError::Unsupported(RunningP2p, pre))
        );
        assert_eq!(
            next_step(PreCopy, Running, MigrationFlags::STOP_COPY),
            Err(ArcError::Unsupported(PreCopy, MigrationFlags::STOP_COPY))
        );
        assert_eq!(
            plan(StopCopy, PreCopy, FULL),
            Err(ArcError::Blocked(StopCopy, PreCopy))
        );
        assert_eq!(
            plan(StopCopy, PreCopyP2p, FULL),
            Err(ArcError::Blocked(StopCopy, PreCopyP2p))
        );
        assert_eq!(plan(Stop, Stop, FULL), Ok(vec![]));
        assert_eq!(plan(Error, Error, FULL), Err(ArcError::DeviceFailed));
        // Without STOP_COPY a device supports nothing at all.
        assert!(plan(Running, Stop, flags(MigrationFlags::PRE_COPY.bits())).is_err());
    }

    #[test]
    fn data_fd_arcs() {
        let fd_arcs: Vec<(MigState, MigState)> = MigState::ALL
            .iter()
            .flat_map(|&a| MigState::ALL.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| is_arc(a, b, FULL) && returns_data_fd(a, b))
            .collect();
        assert_eq!(
            fd_arcs,
            vec![
                (Stop, StopCopy),
                (Stop, Resuming),
                (Running, PreCopy),
                (RunningP2p, PreCopyP2p),
            ]
        );
        assert!(!returns_data_fd(PreCopyP2p, StopCopy));
        assert!(!returns_data_fd(PreCopy, StopCopy));
        assert!(Resuming.is_streaming() && !RunningP2p.is_streaming());
    }

    proptest! {
        #[test]
        fn every_supported_pair_has_a_plan_of_arcs(bits in 0u64..16, a in 0usize..8, b in 0usize..8) {
            let f = flags(bits);
            let (from, to) = (MigState::ALL[a], MigState::ALL[b]);
            let supported = from.is_supported(f) && to.is_supported(f);
            let blocked = from == StopCopy && to.is_pre_copy();
            match plan(from, to, f) {
                Ok(path) => {
                    prop_assert!(supported && !blocked);
                    prop_assert_eq!(path.last().copied().unwrap_or(from), to);
                    prop_assert!(path.len() <= 5);
                    let mut cur = from;
                    for (i, &next) in path.iter().enumerate() {
                        prop_assert!(is_arc(cur, next, f), "{} -> {} is not an arc", cur, next);
                        prop_assert!(next.is_supported(f), "{} unsupported", next);
                        prop_assert_ne!(next, Error);
                        // Only the last arc of a walk may open a data session.
                        if returns_data_fd(cur, next) {
                            prop_assert_eq!(i, path.len() - 1);
                        }
                        cur = next;
                    }
                }
                Err(e) => {
                    prop_assert!(!supported || blocked, "{} -> {} refused: {}", from, to, e);
                }
            }
        }

        #[test]
        fn error_is_never_a_target_and_never_left(bits in 0u64..16, a in 0usize..8) {
            let f = flags(bits);
            let s = MigState::ALL[a];
            prop_assert!(next_step(s, Error, f).is_err());
            prop_assert!(next_step(Error, s, f).is_err());
            prop_assert!(!is_arc(s, Error, f));
            prop_assert!(!is_arc(Error, s, f));
        }

        #[test]
        fn unknown_flag_bits_change_nothing(extra in 1u64..(u64::MAX >> 3), a in 0usize..8, b in 0usize..8) {
            let (from, to) = (MigState::ALL[a], MigState::ALL[b]);
            let wide = flags(7 | (extra << 3));
            prop_assert_eq!(plan(from, to, FULL).ok(), plan(from, to, wide).ok());
        }
    }
}
