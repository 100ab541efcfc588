// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Oracle for the VFIO migration protocol v2 finite state machine.
//!
//! Written from the facts in the Linux uAPI text (`include/uapi/linux/vfio.h`,
//! the comment above `enum vfio_device_mig_state`) and from the behaviour of
//! `vfio_mig_get_next_state()` in `drivers/vfio/vfio_main.c`. The encoding
//! here is this module's own: for every current state, [`hop`] names the next
//! state on the way to a target, and [`next_state`] skips over states the
//! device's flags do not support, exactly one step per call, like the kernel.
//!
//! Flag values and state numbers come from `vfio-bindings`. States are raw `u32` values as
//! the ioctl carries them; the mock keeps its state in that form.

use vfio_bindings::bindings::vfio as b;

/// `VFIO_DEVICE_STATE_ERROR` (0): the device failed and must be reset.
pub const ERROR: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR;
/// `VFIO_DEVICE_STATE_STOP` (1).
pub const STOP: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP;
/// `VFIO_DEVICE_STATE_RUNNING` (2), the state after open and after reset.
pub const RUNNING: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING;
/// `VFIO_DEVICE_STATE_STOP_COPY` (3).
pub const STOP_COPY: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY;
/// `VFIO_DEVICE_STATE_RESUMING` (4).
pub const RESUMING: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING;
/// `VFIO_DEVICE_STATE_RUNNING_P2P` (5), needs `VFIO_MIGRATION_P2P`.
pub const RUNNING_P2P: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P;
/// `VFIO_DEVICE_STATE_PRE_COPY` (6), needs `VFIO_MIGRATION_PRE_COPY`.
pub const PRE_COPY: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY;
/// `VFIO_DEVICE_STATE_PRE_COPY_P2P` (7), needs both P2P and PRE_COPY.
pub const PRE_COPY_P2P: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P;
/// Number of defined states (`VFIO_DEVICE_STATE_NR`); values at or above it are unknown.
pub const NUM_STATES: u32 = b::vfio_device_mig_state_VFIO_DEVICE_STATE_NR;

/// `VFIO_MIGRATION_STOP_COPY`: mandatory for any migratable device.
pub const FLAG_STOP_COPY: u64 = b::VFIO_MIGRATION_STOP_COPY as u64;
/// `VFIO_MIGRATION_P2P`: adds RUNNING_P2P (and PRE_COPY_P2P with PRE_COPY).
pub const FLAG_P2P: u64 = b::VFIO_MIGRATION_P2P as u64;
/// `VFIO_MIGRATION_PRE_COPY`: adds PRE_COPY (and PRE_COPY_P2P with P2P).
pub const FLAG_PRE_COPY: u64 = b::VFIO_MIGRATION_PRE_COPY as u64;

/// Every state value, in numeric order, ERROR included.
pub const ALL_STATES: [u32; 8] = [
    ERROR,
    STOP,
    RUNNING,
    STOP_COPY,
    RESUMING,
    RUNNING_P2P,
    PRE_COPY,
    PRE_COPY_P2P,
];

/// The four flag sets a well-formed v2 driver can advertise (STOP_COPY is mandatory).
pub const FLAG_COMBOS: [u64; 4] = [
    FLAG_STOP_COPY,
    FLAG_STOP_COPY | FLAG_P2P,
    FLAG_STOP_COPY | FLAG_PRE_COPY,
    FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY,
];

/// Why a requested transition cannot be performed. Every variant is reported
/// by the kernel as `EINVAL`; the variants only say which check refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcError {
    /// The current state is unknown, ERROR, or not supported by the flags.
    /// (The kernel also emits a WARN here: a driver should never be in such a state.)
    BadCurrent,
    /// The requested state is unknown, ERROR, or not supported by the flags.
    BadTarget,
    /// The combination is forbidden by the uAPI (STOP_COPY -> PRE_COPY / PRE_COPY_P2P).
    Blocked,
}

impl ArcError {
    /// The errno the kernel returns for this refusal (always `EINVAL`, 22).
    pub fn errno(self) -> i32 {
        22
    }
}

impl std::fmt::Display for ArcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let why = match self {
            ArcError::BadCurrent => "current state not usable with these flags",
            ArcError::BadTarget => "requested state not usable with these flags",
            ArcError::Blocked => "transition forbidden by the uAPI",
        };
        write!(f, "EINVAL: {why}")
    }
}

impl std::error::Error for ArcError {}

/// Printable name of a state value (`"?"` for unknown values).
pub fn name(state: u32) -> &'static str {
    match state {
        ERROR => "ERROR",
        STOP => "STOP",
        RUNNING => "RUNNING",
        STOP_COPY => "STOP_COPY",
        RESUMING => "RESUMING",
        RUNNING_P2P => "RUNNING_P2P",
        PRE_COPY => "PRE_COPY",
        PRE_COPY_P2P => "PRE_COPY_P2P",
        _ => "?",
    }
}

/// Parses a state name (`STOP_COPY`, `stop-copy`, `running_p2p`, ...), case-insensitive.
pub fn from_name(text: &str) -> Option<u32> {
    let wanted = text.trim().to_ascii_uppercase().replace('-', "_");
    ALL_STATES.into_iter().find(|&s| name(s) == wanted)
}

/// True for PRE_COPY and PRE_COPY_P2P, where a data fd has a temporary end.
pub fn is_pre_copy(state: u32) -> bool {
    matches!(state, PRE_COPY | PRE_COPY_P2P)
}

/// True for the states in which the device runs (and may DMA): RUNNING, RUNNING_P2P (no
/// outgoing P2P DMA, but still running), PRE_COPY and PRE_COPY_P2P.
pub fn is_running(state: u32) -> bool {
    matches!(state, RUNNING | RUNNING_P2P | PRE_COPY | PRE_COPY_P2P)
}

/// True for the "saving group" (PRE_COPY, PRE_COPY_P2P, STOP_COPY), whose
/// members share one data transfer session.
pub fn in_saving_group(state: u32) -> bool {
    matches!(state, PRE_COPY | PRE_COPY_P2P | STOP_COPY)
}

/// Whether `state` may be used (as current state or as a SET_STATE target)
/// on a device advertising migration `flags`.
///
/// STOP, RUNNING, STOP_COPY and RESUMING need `VFIO_MIGRATION_STOP_COPY`;
/// RUNNING_P2P additionally needs P2P; PRE_COPY additionally needs PRE_COPY;
/// PRE_COPY_P2P needs all three. ERROR is never usable here: the uAPI says it
/// "cannot be specified as a device state". (The kernel encodes ERROR as
/// needing all 32 flag bits, which no real driver advertises; this oracle
/// does not model that corner.) Unknown state values are never supported.
pub fn supported(flags: u64, state: u32) -> bool {
    let need = match state {
        STOP | RUNNING | STOP_COPY | RESUMING => FLAG_STOP_COPY,
        RUNNING_P2P => FLAG_STOP_COPY | FLAG_P2P,
        PRE_COPY => FLAG_STOP_COPY | FLAG_PRE_COPY,
        PRE_COPY_P2P => FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY,
        _ => return false,
    };
    flags & need == need
}

/// One hop of the full-featured FSM (all optional states present): the next
/// state when travelling from `cur` towards `target`. `cur == target` yields
/// `target`; the forbidden combinations and anything involving ERROR yield
/// ERROR. Callers must pass known states (`< NUM_STATES`).
///
/// The shape: RESUMING and STOP_COPY can only leave through STOP; STOP
/// reaches the running side through RUNNING_P2P; RUNNING and RUNNING_P2P are
/// adjacent; PRE_COPY hangs off RUNNING and PRE_COPY_P2P off RUNNING_P2P;
/// the pre-copy states enter STOP_COPY only through PRE_COPY_P2P. Leaving
/// the saving group always goes back to the non-saving twin of the state.
pub fn hop(cur: u32, target: u32) -> u32 {
    if cur == target {
        return cur;
    }
    if cur == ERROR || target == ERROR {
        return ERROR;
    }
    match cur {
        STOP => match target {
            STOP_COPY | RESUMING => target,
            // RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P
            _ => RUNNING_P2P,
        },
        RUNNING => match target {
            PRE_COPY => PRE_COPY,
            // everything else is on the far side of RUNNING_P2P
            _ => RUNNING_P2P,
        },
        RUNNING_P2P => match target {
            RUNNING | PRE_COPY => RUNNING,
            PRE_COPY_P2P => PRE_COPY_P2P,
            // STOP, STOP_COPY, RESUMING
            _ => STOP,
        },
        PRE_COPY => match target {
            // stay inside the saving group
            PRE_COPY_P2P | STOP_COPY => PRE_COPY_P2P,
            // leave it: back to RUNNING first
            _ => RUNNING,
        },
        PRE_COPY_P2P => match target {
            PRE_COPY | STOP_COPY => target,
            _ => RUNNING_P2P,
        },
        STOP_COPY => match target {
            // a finished stop-copy session cannot go back to pre-copy
            PRE_COPY | PRE_COPY_P2P => ERROR,
            _ => STOP,
        },
        RESUMING => STOP,
        _ => ERROR,
    }
}

/// The next single arc the kernel asks the driver to perform when the user
/// requests `new` while the device is in `cur`, for a device advertising
/// `flags` (a `u64` as in `struct vfio_device_feature_migration`).
///
/// Mirrors `vfio_mig_get_next_state()`: both ends must be supported
/// ([`supported`]); states the flags do not support are skipped by hopping
/// again from them toward `new`; a result of ERROR means EINVAL.
/// `next_state(f, s, s)` returns `Ok(s)` for any supported `s`.
///
/// One deliberate difference from a literal reading of the kernel loop: if
/// the hop lands on ERROR (STOP_COPY -> PRE_COPY(_P2P)) the kernel's skip
/// loop tests ERROR's flag requirement (all bits), finds it unsupported and
/// hops ERROR -> ERROR again, which never terminates for a driver that does
/// not advertise all 32 flag bits. The uAPI says these arcs "return error",
/// so this oracle returns [`ArcError::Blocked`].
pub fn next_state(flags: u64, cur: u32, new: u32) -> Result<u32, ArcError> {
    if !supported(flags, cur) {
        return Err(ArcError::BadCurrent);
    }
    if !supported(flags, new) {
        return Err(ArcError::BadTarget);
    }
    let mut next = hop(cur, new);
    // Bounded: every hop chain reaches `new` or ERROR within NUM_STATES steps.
    for _ in 0..NUM_STATES {
        if next == ERROR {
            return Err(ArcError::Blocked);
        }
        if supported(flags, next) {
            return Ok(next);
        }
        next = hop(next, new);
    }
    Err(ArcError::Blocked)
}

/// The whole sequence of states the kernel walks from `cur` to `new`,
/// starting with `cur` and ending with `new` (just `[cur]` when equal).
/// Each adjacent pair is one driver arc. Errors as for [`next_state`]; an
/// error at any step fails the whole path (the kernel would leave the device
/// in the last state reached, which this function does not report).
pub fn path(flags: u64, cur: u32, new: u32) -> Result<Vec<u32>, ArcError> {
    let mut out = vec![cur];
    let mut at = cur;
    // A path never needs more than NUM_STATES arcs; guard against loops anyway.
    for _ in 0..NUM_STATES {
        if at == new {
            if !supported(flags, at) {
                return Err(ArcError::BadCurrent);
            }
            return Ok(out);
        }
        at = next_state(flags, at, new)?;
        out.push(at);
    }
    Err(ArcError::Blocked)
}

/// The single arcs a v2 driver with these `flags` must implement, per the
/// list in the kernel's comment on `vfio_mig_get_next_state()` and the arc
/// descriptions in the uAPI. Returns `(from, to)` pairs, deduplicated.
/// Empty when `flags` lacks STOP_COPY (no state is usable).
pub fn required_arcs(flags: u64) -> Vec<(u32, u32)> {
    if flags & FLAG_STOP_COPY == 0 {
        return Vec::new();
    }
    let p2p = flags & FLAG_P2P != 0;
    let pre = flags & FLAG_PRE_COPY != 0;
    // Always: the STOP hub with the two data sessions.
    let mut arcs = vec![
        (RESUMING, STOP),
        (STOP, RESUMING),
        (STOP, STOP_COPY),
        (STOP_COPY, STOP),
    ];
    if p2p {
        arcs.extend([
            (RUNNING, RUNNING_P2P),
            (RUNNING_P2P, RUNNING),
            (RUNNING_P2P, STOP),
            (STOP, RUNNING_P2P),
        ]);
    } else {
        arcs.extend([(RUNNING, STOP), (STOP, RUNNING)]);
    }
    if pre {
        arcs.extend([(RUNNING, PRE_COPY), (PRE_COPY, RUNNING)]);
        if p2p {
            arcs.extend([
                (PRE_COPY, PRE_COPY_P2P),
                (PRE_COPY_P2P, PRE_COPY),
                (PRE_COPY_P2P, RUNNING_P2P),
                (PRE_COPY_P2P, STOP_COPY),
                (RUNNING_P2P, PRE_COPY_P2P),
            ]);
        } else {
            arcs.push((PRE_COPY, STOP_COPY));
        }
    }
    arcs
}

/// Whether a generic v2 driver advertising `flags` implements the single arc
/// `cur -> new` (membership in [`required_arcs`]).
pub fn driver_accepts_arc(flags: u64, cur: u32, new: u32) -> bool {
    required_arcs(flags).contains(&(cur, new))
}

/// The migration flags the mtty sample driver advertises
/// (`mtty_init_dev`: STOP_COPY | P2P | PRE_COPY).
pub const MTTY_FLAGS: u64 = FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY;

/// Whether `samples/vfio-mdev/mtty.c` `mtty_step_state()` accepts the single
/// arc `cur -> new` without hitting its final "unexpected arc" WARN/EINVAL.
///
/// mtty handles 15 arcs: six no-ops (the P2P toggles and STOP <->
/// RUNNING_P2P), four that close migration files (RESUMING -> STOP after
/// loading state, PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P,
/// STOP_COPY -> STOP), and five that open or extend a session
/// (RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY,
/// PRE_COPY_P2P -> STOP_COPY, STOP -> RESUMING). It has no RUNNING <-> STOP
/// and no PRE_COPY -> STOP_COPY, which its flags never make the core request.
pub fn mtty_accepts_arc(cur: u32, new: u32) -> bool {
    matches!(
        (cur, new),
        (RUNNING, RUNNING_P2P)
            | (RUNNING_P2P, RUNNING)
            | (RUNNING_P2P, STOP)
            | (PRE_COPY, PRE_COPY_P2P)
            | (PRE_COPY_P2P, PRE_COPY)
            | (STOP, RUNNING_P2P)
            | (RESUMING, STOP)
            | (PRE_COPY, RUNNING)
            | (PRE_COPY_P2P, RUNNING_P2P)
            | (STOP_COPY, STOP)
            | (RUNNING, PRE_COPY)
            | (RUNNING_P2P, PRE_COPY_P2P)
            | (STOP, STOP_COPY)
            | (PRE_COPY_P2P, STOP_COPY)
            | (STOP, RESUMING)
    )
}

/// Whether the arc `cur -> new` returns a new `data_fd` to the user: it
/// enters the saving group from outside it, or enters RESUMING.
pub fn arc_opens_data_fd(cur: u32, new: u32) -> bool {
    (in_saving_group(new) && !in_saving_group(cur)) || (new == RESUMING && cur != RESUMING)
}

/// Whether the arc `cur -> new` ends the current data transfer session:
/// it leaves the saving group, or leaves RESUMING.
pub fn arc_closes_data_fd(cur: u32, new: u32) -> bool {
    (in_saving_group(cur) && !in_saving_group(new)) || (cur == RESUMING && new != RESUMING)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u64 = FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY;
    const SC: u64 = FLAG_STOP_COPY;
    const SC_P2P: u64 = FLAG_STOP_COPY | FLAG_P2P;
    const SC_PRE: u64 = FLAG_STOP_COPY | FLAG_PRE_COPY;

    fn ok(flags: u64, cur: u32, new: u32, want: &[u32]) {
        assert_eq!(
            path(flags, cur, new),
            Ok(want.to_vec()),
            "flags {flags:#x}: {} -> {}",
            name(cur),
            name(new)
        );
    }

    // --- Combination paths listed in the kernel comment (all features on). ---

    #[test]
    fn full_pre_copy_to_stop_copy_stays_in_saving_group() {
        ok(
            FULL,
            PRE_COPY,
            STOP_COPY,
            &[PRE_COPY, PRE_COPY_P2P, STOP_COPY],
        );
    }

    #[test]
    fn full_pre_copy_to_running_p2p_goes_through_running() {
        ok(
            FULL,
            PRE_COPY,
            RUNNING_P2P,
            &[PRE_COPY, RUNNING, RUNNING_P2P],
        );
    }

    #[test]
    fn full_pre_copy_to_stop_does_not_pass_stop_copy() {
        ok(
            FULL,
            PRE_COPY,
            STOP,
            &[PRE_COPY, RUNNING, RUNNING_P2P, STOP],
        );
    }

    #[test]
    fn full_pre_copy_to_resuming() {
        ok(
            FULL,
            PRE_COPY,
            RESUMING,
            &[PRE_COPY, RUNNING, RUNNING_P2P, STOP, RESUMING],
        );
    }

    #[test]
    fn full_pre_copy_p2p_to_running_and_stop() {
        ok(
            FULL,
            PRE_COPY_P2P,
            RUNNING,
            &[PRE_COPY_P2P, RUNNING_P2P, RUNNING],
        );
        ok(FULL, PRE_COPY_P2P, STOP, &[PRE_COPY_P2P, RUNNING_P2P, STOP]);
        ok(
            FULL,
            PRE_COPY_P2P,
            RESUMING,
            &[PRE_COPY_P2P, RUNNING_P2P, STOP, RESUMING],
        );
    }

    #[test]
    fn full_resuming_to_running_and_pre_copy() {
        ok(FULL, RESUMING, RUNNING_P2P, &[RESUMING, STOP, RUNNING_P2P]);
        ok(
            FULL,
            RESUMING,
            RUNNING,
            &[RESUMING, STOP, RUNNING_P2P, RUNNING],
        );
        ok(
            FULL,
            RESUMING,
            PRE_COPY_P2P,
            &[RESUMING, STOP, RUNNING_P2P, PRE_COPY_P2P],
        );
        ok(
            FULL,
            RESUMING,
            PRE_COPY,
            &[RESUMING, STOP, RUNNING_P2P, RUNNING, PRE_COPY],
        );
        ok(FULL, RESUMING, STOP_COPY, &[RESUMING, STOP, STOP_COPY]);
    }

    #[test]
    fn full_running_to_stop_copy_goes_via_p2p_and_stop() {
        ok(
            FULL,
            RUNNING,
            STOP_COPY,
            &[RUNNING, RUNNING_P2P, STOP, STOP_COPY],
        );
        ok(FULL, RUNNING, STOP, &[RUNNING, RUNNING_P2P, STOP]);
        ok(
            FULL,
            RUNNING,
            RESUMING,
            &[RUNNING, RUNNING_P2P, STOP, RESUMING],
        );
        ok(
            FULL,
            RUNNING,
            PRE_COPY_P2P,
            &[RUNNING, RUNNING_P2P, PRE_COPY_P2P],
        );
    }

    #[test]
    fn full_running_p2p_and_stop_combinations() {
        ok(
            FULL,
            RUNNING_P2P,
            PRE_COPY,
            &[RUNNING_P2P, RUNNING, PRE_COPY],
        );
        ok(FULL, RUNNING_P2P, RESUMING, &[RUNNING_P2P, STOP, RESUMING]);
        ok(
            FULL,
            RUNNING_P2P,
            STOP_COPY,
            &[RUNNING_P2P, STOP, STOP_COPY],
        );
        ok(FULL, STOP, PRE_COPY_P2P, &[STOP, RUNNING_P2P, PRE_COPY_P2P]);
        ok(FULL, STOP, RUNNING, &[STOP, RUNNING_P2P, RUNNING]);
        ok(
            FULL,
            STOP,
            PRE_COPY,
            &[STOP, RUNNING_P2P, RUNNING, PRE_COPY],
        );
    }

    #[test]
    fn full_stop_copy_exits_through_stop() {
        ok(FULL, STOP_COPY, RESUMING, &[STOP_COPY, STOP, RESUMING]);
        ok(
            FULL,
            STOP_COPY,
            RUNNING_P2P,
            &[STOP_COPY, STOP, RUNNING_P2P],
        );
        ok(
            FULL,
            STOP_COPY,
            RUNNING,
            &[STOP_COPY, STOP, RUNNING_P2P, RUNNING],
        );
    }

    #[test]
    fn stop_copy_back_to_pre_copy_is_blocked() {
        for f in [FULL, SC_PRE] {
            assert_eq!(next_state(f, STOP_COPY, PRE_COPY), Err(ArcError::Blocked));
            assert_eq!(path(f, STOP_COPY, PRE_COPY), Err(ArcError::Blocked));
        }
        assert_eq!(
            next_state(FULL, STOP_COPY, PRE_COPY_P2P),
            Err(ArcError::Blocked)
        );
        assert_eq!(ArcError::Blocked.errno(), 22);
    }

    // --- Reduced feature sets: unsupported states are skipped. ---

    #[test]
    fn no_p2p_running_stop_direct() {
        ok(SC, RUNNING, STOP_COPY, &[RUNNING, STOP, STOP_COPY]);
        ok(SC, RUNNING, STOP, &[RUNNING, STOP]);
        ok(SC, STOP, RUNNING, &[STOP, RUNNING]);
        ok(SC, RESUMING, RUNNING, &[RESUMING, STOP, RUNNING]);
        ok(SC, STOP_COPY, RUNNING, &[STOP_COPY, STOP, RUNNING]);
    }

    #[test]
    fn p2p_only() {
        ok(SC_P2P, RUNNING, STOP, &[RUNNING, RUNNING_P2P, STOP]);
        ok(
            SC_P2P,
            RESUMING,
            RUNNING,
            &[RESUMING, STOP, RUNNING_P2P, RUNNING],
        );
        assert_eq!(
            next_state(SC_P2P, RUNNING, PRE_COPY),
            Err(ArcError::BadTarget)
        );
    }

    #[test]
    fn pre_copy_without_p2p() {
        ok(SC_PRE, PRE_COPY, STOP_COPY, &[PRE_COPY, STOP_COPY]);
        ok(SC_PRE, PRE_COPY, STOP, &[PRE_COPY, RUNNING, STOP]);
        ok(
            SC_PRE,
            RESUMING,
            PRE_COPY,
            &[RESUMING, STOP, RUNNING, PRE_COPY],
        );
        ok(SC_PRE, STOP, PRE_COPY, &[STOP, RUNNING, PRE_COPY]);
    }

    #[test]
    fn unsupported_states_are_einval() {
        assert_eq!(
            next_state(SC, RUNNING, RUNNING_P2P),
            Err(ArcError::BadTarget)
        );
        assert_eq!(
            next_state(SC, RUNNING_P2P, RUNNING),
            Err(ArcError::BadCurrent)
        );
        assert_eq!(
            next_state(SC, RUNNING, PRE_COPY_P2P),
            Err(ArcError::BadTarget)
        );
        assert_eq!(
            next_state(SC_PRE, RUNNING, PRE_COPY_P2P),
            Err(ArcError::BadTarget)
        );
        // flags without STOP_COPY support nothing at all
        assert_eq!(
            next_state(FLAG_P2P | FLAG_PRE_COPY, RUNNING, STOP),
            Err(ArcError::BadCurrent)
        );
        assert_eq!(next_state(0, RUNNING, RUNNING), Err(ArcError::BadCurrent));
    }

    #[test]
    fn error_is_never_a_source_or_target() {
        for f in FLAG_COMBOS {
            assert_eq!(next_state(f, RUNNING, ERROR), Err(ArcError::BadTarget));
            assert_eq!(next_state(f, ERROR, RUNNING), Err(ArcError::BadCurrent));
            assert_eq!(next_state(f, ERROR, ERROR), Err(ArcError::BadCurrent));
        }
    }

    #[test]
    fn unknown_state_values() {
        assert_eq!(next_state(FULL, RUNNING, 8), Err(ArcError::BadTarget));
        assert_eq!(next_state(FULL, 8, RUNNING), Err(ArcError::BadCurrent));
        assert_eq!(next_state(FULL, u32::MAX, STOP), Err(ArcError::BadCurrent));
        assert!(!supported(u64::MAX, 8));
    }

    #[test]
    fn identity_is_a_no_op() {
        for f in FLAG_COMBOS {
            for s in ALL_STATES {
                if supported(f, s) {
                    assert_eq!(next_state(f, s, s), Ok(s));
                    assert_eq!(path(f, s, s), Ok(vec![s]));
                }
            }
        }
    }

    #[test]
    fn single_arcs_taken_equal_required_list() {
        // The set of arcs next_state() ever emits equals the kernel comment's list.
        for f in FLAG_COMBOS {
            let mut emitted = std::collections::BTreeSet::new();
            for c in ALL_STATES {
                for n in ALL_STATES {
                    if let Ok(x) = next_state(f, c, n) {
                        if x != c {
                            emitted.insert((c, x));
                        }
                    }
                }
            }
            let required: std::collections::BTreeSet<_> = required_arcs(f).into_iter().collect();
            assert_eq!(emitted, required, "flags {f:#x}");
        }
    }

    #[test]
    fn mtty_covers_full_feature_arcs() {
        let req: std::collections::BTreeSet<_> = required_arcs(MTTY_FLAGS).into_iter().collect();
        let mut mtty = std::collections::BTreeSet::new();
        for c in ALL_STATES {
            for n in ALL_STATES {
                if mtty_accepts_arc(c, n) {
                    mtty.insert((c, n));
                }
            }
        }
        // mtty implements exactly the arcs the core asks for with its flags.
        assert_eq!(mtty, req);
    }

    #[test]
    fn vendor_step_functions_match_required_sets() {
        use std::collections::BTreeSet;
        // hisi_acc_vf_set_device_state (STOP_COPY | PRE_COPY, no P2P)
        let hisi: BTreeSet<_> = [
            (RUNNING, PRE_COPY),
            (PRE_COPY, STOP_COPY),
            (PRE_COPY, RUNNING),
            (RUNNING, STOP),
            (STOP, RUNNING),
            (STOP, STOP_COPY),
            (STOP_COPY, STOP),
            (STOP, RESUMING),
            (RESUMING, STOP),
        ]
        .into_iter()
        .collect();
        assert_eq!(hisi, required_arcs(SC_PRE).into_iter().collect());
        // pds_vfio_step_device_state_locked (STOP_COPY | P2P)
        let pds: BTreeSet<_> = [
            (STOP, STOP_COPY),
            (STOP_COPY, STOP),
            (STOP, RESUMING),
            (RESUMING, STOP),
            (RUNNING, RUNNING_P2P),
            (RUNNING_P2P, RUNNING),
            (STOP, RUNNING_P2P),
            (RUNNING_P2P, STOP),
        ]
        .into_iter()
        .collect();
        assert_eq!(pds, required_arcs(SC_P2P).into_iter().collect());
    }

    #[test]
    fn names_parse_back() {
        for s in ALL_STATES {
            assert_eq!(from_name(name(s)), Some(s));
            assert_eq!(
                from_name(&name(s).to_ascii_lowercase().replace('_', "-")),
                Some(s)
            );
        }
        assert_eq!(from_name("SAVING"), None);
        assert_eq!(name(8), "?");
        assert!(is_pre_copy(PRE_COPY_P2P) && !is_pre_copy(STOP_COPY));
        assert!(is_running(RUNNING_P2P) && !is_running(STOP) && !is_running(STOP_COPY));
    }

    #[test]
    fn data_fd_open_close() {
        assert!(arc_opens_data_fd(RUNNING, PRE_COPY));
        assert!(arc_opens_data_fd(STOP, STOP_COPY));
        assert!(arc_opens_data_fd(STOP, RESUMING));
        assert!(!arc_opens_data_fd(PRE_COPY_P2P, STOP_COPY));
        assert!(arc_closes_data_fd(STOP_COPY, STOP));
        assert!(arc_closes_data_fd(RESUMING, STOP));
        assert!(!arc_closes_data_fd(PRE_COPY, PRE_COPY_P2P));
    }
}
