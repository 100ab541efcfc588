// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Oracle for the deprecated VFIO migration protocol v1 `device_state` field
//! of `struct vfio_device_migration_info` (Linux 5.8 .. 5.17 uAPI; removed in
//! 5.18). Written from the uAPI comment of v5.17 `include/uapi/linux/vfio.h`
//! and from the writes QEMU 5.2 .. 7.0 `hw/vfio/migration.c` issues
//! (`vfio_migration_set_state()` callers); this module's own encoding.
//!
//! Bit 0 is `_RUNNING`, bit 1 `_SAVING`, bit 2 `_RESUMING`. Bits 3..31 are
//! reserved: the user must read-modify-write them, so they are preserved and
//! ignored by every rule here.

use vfio_bindings::bindings::vfio as b;

/// `VFIO_DEVICE_STATE_V1_STOP` (000b).
pub const STOP: u32 = b::VFIO_DEVICE_STATE_V1_STOP;
/// `VFIO_DEVICE_STATE_V1_RUNNING` bit (001b), the default state.
pub const RUNNING: u32 = b::VFIO_DEVICE_STATE_V1_RUNNING;
/// `VFIO_DEVICE_STATE_V1_SAVING` bit (010b alone = stop-and-copy).
pub const SAVING: u32 = b::VFIO_DEVICE_STATE_V1_SAVING;
/// `VFIO_DEVICE_STATE_V1_RESUMING` bit (100b).
pub const RESUMING: u32 = b::VFIO_DEVICE_STATE_V1_RESUMING;
/// `VFIO_DEVICE_STATE_MASK` (111b): the three defined bits.
pub const MASK: u32 = b::VFIO_DEVICE_STATE_MASK;

/// 011b: running and saving, the pre-copy state.
pub const PRE_COPY: u32 = RUNNING | SAVING;
/// 010b: stopped and saving, the stop-and-copy state.
pub const STOP_COPY: u32 = SAVING;
/// 110b: the error state (only a driver may report it; reset leaves it).
pub const ERROR: u32 = SAVING | RESUMING;

/// Whether the low three bits name a state a user may request: any value
/// whose RESUMING bit is clear, or exactly RESUMING (100b). 101b and 111b are
/// "Invalid state"; 110b is the error state, which is not a valid request
/// either (this matches the v5.17 `VFIO_DEVICE_STATE_VALID()` macro, which is
/// also false for 110b). Bits 3..31 are ignored.
pub fn is_valid(state: u32) -> bool {
    let s = state & MASK;
    s & RESUMING == 0 || s == RESUMING
}

/// Whether the low three bits are pre-copy (011b) or stop-and-copy (010b), where
/// `pending_bytes` and `data_offset` are meaningful.
pub fn is_saving(state: u32) -> bool {
    matches!(state & MASK, PRE_COPY | STOP_COPY)
}

/// The uAPI's name of the low three bits, with the bits, e.g. `STOP-AND-COPY (010b)`.
pub fn name(state: u32) -> String {
    let s = state & MASK;
    let what = match s {
        STOP => "STOP",
        RUNNING => "RUNNING",
        PRE_COPY => "PRE-COPY",
        STOP_COPY => "STOP-AND-COPY",
        RESUMING => "RESUMING",
        ERROR => "ERROR",
        _ => "invalid",
    };
    format!("{what} ({s:03b}b)")
}

/// Whether the low three bits are the error state 110b
/// (`VFIO_DEVICE_STATE_IS_ERROR()`).
pub fn is_error(state: u32) -> bool {
    state & MASK == ERROR
}

/// The value a user writes to move the low bits to `new_low` while keeping
/// the reserved bits 3..31 of `old` (the read-modify-write the uAPI asks for).
pub fn with_low_bits(old: u32, new_low: u32) -> u32 {
    (old & !MASK) | (new_low & MASK)
}

/// The `device_state` a successful `VFIO_DEVICE_RESET` leaves: `_RUNNING`
/// (the only exit from the error state), reserved bits kept.
pub fn after_reset(old: u32) -> u32 {
    with_low_bits(old, RUNNING)
}

/// Whether writing `to` while the device is in `from` is a transition the v1
/// uAPI text describes or QEMU's v1 code issues. Only bits 0..2 of both
/// values are compared. Writing the current state again is allowed (QEMU does
/// it). Nothing leaves the error state except reset ([`after_reset`]), and
/// nothing may request the error state or an invalid state.
///
/// This is the strict, direct-arc reading. The uAPI also lets the user
/// "attempt to transition the device to any valid state reachable from the
/// current state"; see [`reachable`] for that looser reading.
pub fn transition_allowed(from: u32, to: u32) -> bool {
    let (f, t) = (from & MASK, to & MASK);
    if !is_valid(f) || !is_valid(t) {
        // 110b (error), 101b, 111b: no direct transitions in either direction.
        return false;
    }
    if f == t {
        // QEMU vfio_save_complete_precopy() sets "clear RUNNING, set SAVING"
        // even when the VM stop already left the device in 010b.
        return true;
    }
    matches!(
        (f, t),
        // uAPI item 1, normal shutdown: running to stopped. Also QEMU
        // vfio_vmstate_change() clearing RUNNING when the VM stops.
        (RUNNING, STOP)
        // uAPI item 2, save/suspend: running straight to stop-and-copy.
        | (RUNNING, STOP_COPY)
        // uAPI items 2 and 3 end in _STOP: stop-and-copy to stopped once all
        // data is read. QEMU vfio_save_complete_precopy() clears SAVING.
        | (STOP_COPY, STOP)
        // uAPI item 3, live migration: running to pre-copy. QEMU
        // vfio_save_setup() ORs SAVING into a running device.
        | (RUNNING, PRE_COPY)
        // uAPI item 3: pre-copy to stop-and-copy "regardless of the number of
        // pending bytes". QEMU: VM stop clears RUNNING, or
        // vfio_save_complete_precopy() clears RUNNING and sets SAVING.
        | (PRE_COPY, STOP_COPY)
        // uAPI item 4: running to resuming. QEMU vfio_load_setup() replaces the
        // low bits with RESUMING.
        | (RUNNING, RESUMING)
        // QEMU vfio_load_setup() replaces the low bits with RESUMING whatever
        // they were, so a stopped destination device also goes to resuming.
        | (STOP, RESUMING)
        // uAPI item 5: resuming to running after the data is written. QEMU
        // vfio_vmstate_change() on VM start clears all bits and sets RUNNING.
        | (RESUMING, RUNNING)
        // QEMU vfio_save_setup() on an already stopped VM (savevm/snapshot):
        // SAVING ORed into 000b gives stop-and-copy.
        | (STOP, STOP_COPY)
        // QEMU vfio_vmstate_change() when a stopped VM starts again.
        | (STOP, RUNNING)
        // QEMU: after a failed migration the VM restarts (vfio_vmstate_change)
        // or vfio_migration_state_notifier() on FAILED/CANCELLED clears SAVING
        // and RESUMING and sets RUNNING; the uAPI text for v1 has no arc for
        // this but QEMU relies on it to continue on the source.
        | (STOP_COPY, RUNNING)
        | (PRE_COPY, RUNNING)
        // uAPI: the user "can attempt to transition the device to any valid
        // state reachable from the current state"; 000b is reachable from
        // pre-copy (through 010b), and a VMM that stops a VM whose migration
        // was cancelled during pre-copy writes it directly. The driver
        // abandons the save and the device stays stopped.
        | (PRE_COPY, STOP)
    )
}

/// The looser reading of the uAPI sentence "transition the device to any
/// valid state reachable from the current state": `to` can be reached from
/// `from` through a chain of [`transition_allowed`] arcs. For example
/// 011b -> 000b is reachable (via 010b) although no direct arc is described.
pub fn reachable(from: u32, to: u32) -> bool {
    let (f, t) = (from & MASK, to & MASK);
    if !is_valid(f) || !is_valid(t) {
        return false;
    }
    let mut seen = [false; 8];
    let mut stack = vec![f];
    while let Some(s) = stack.pop() {
        if s == t {
            return true;
        }
        if seen[s as usize] {
            continue;
        }
        seen[s as usize] = true;
        for n in 0..8u32 {
            if !seen[n as usize] && transition_allowed(s, n) {
                stack.push(n);
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_of_each_encoding() {
        let valid: Vec<u32> = (0..8).filter(|&s| is_valid(s)).collect();
        assert_eq!(valid, vec![0b000, 0b001, 0b010, 0b011, 0b100]);
        assert!(is_error(0b110));
        assert!(!is_error(0b111));
        assert!(!is_valid(0b101) && !is_valid(0b111) && !is_valid(0b110));
    }

    #[test]
    fn reserved_bits_are_ignored_and_preserved() {
        assert!(is_valid(0xffff_fff8 | 0b011));
        assert!(!is_valid(0x8000_0000 | 0b101));
        assert!(is_error(0x10 | 0b110));
        assert_eq!(
            with_low_bits(0xdead_bee8 | 0b011, 0b010),
            0xdead_bee8 | 0b010
        );
        assert_eq!(after_reset(0xa0 | 0b110), 0xa0 | 0b001);
        assert!(transition_allowed(0xf0 | 0b001, 0x08 | 0b011));
    }

    #[test]
    fn uapi_diagram_arcs() {
        assert!(transition_allowed(0b001, 0b000)); // 1. shutdown
        assert!(transition_allowed(0b001, 0b010)); // 2. save
        assert!(transition_allowed(0b010, 0b000));
        assert!(transition_allowed(0b001, 0b011)); // 3. live migration
        assert!(transition_allowed(0b011, 0b010));
        assert!(transition_allowed(0b001, 0b100)); // 4. resuming
        assert!(transition_allowed(0b100, 0b001)); // 5. resumed
    }

    #[test]
    fn qemu_only_arcs() {
        assert!(transition_allowed(0b000, 0b010));
        assert!(transition_allowed(0b000, 0b001));
        assert!(transition_allowed(0b000, 0b100));
        assert!(transition_allowed(0b010, 0b001));
        assert!(transition_allowed(0b011, 0b001));
        assert!(transition_allowed(0b010, 0b010));
        // Pre-copy straight to STOP: reachable, and written by a VMM stopping a VM whose
        // migration was cancelled.
        assert!(transition_allowed(0b011, 0b000));
    }

    #[test]
    fn undescribed_direct_arcs_are_refused() {
        assert!(!transition_allowed(0b010, 0b011));
        assert!(!transition_allowed(0b000, 0b011));
        assert!(!transition_allowed(0b100, 0b000));
        assert!(!transition_allowed(0b100, 0b010));
        assert!(!transition_allowed(0b011, 0b100));
        assert!(!transition_allowed(0b010, 0b100));
    }

    #[test]
    fn error_and_invalid_states_have_no_arcs() {
        for s in 0..8 {
            assert!(!transition_allowed(0b110, s));
            assert!(!transition_allowed(s, 0b110));
            assert!(!transition_allowed(s, 0b101));
            assert!(!transition_allowed(s, 0b111));
            assert!(!transition_allowed(0b101, s));
        }
    }

    #[test]
    fn names_and_saving() {
        assert_eq!(name(0x8000_0102), "STOP-AND-COPY (010b)");
        assert_eq!(name(0b101), "invalid (101b)");
        assert!(is_saving(0xf0 | 0b011) && is_saving(0b010));
        assert!(!is_saving(0b001) && !is_saving(0b110));
    }

    #[test]
    fn loose_reachability() {
        assert!(reachable(0b011, 0b000));
        assert!(reachable(0b100, 0b011));
        assert!(!reachable(0b110, 0b001));
        for a in [0, 1, 2, 3, 4] {
            for c in [0, 1, 2, 3, 4] {
                assert!(reachable(a, c), "{a:03b} -> {c:03b}");
            }
        }
    }

    #[test]
    fn arc_count() {
        let n = (0..8)
            .flat_map(|f| (0..8).map(move |t| (f, t)))
            .filter(|&(f, t)| f != t && transition_allowed(f, t))
            .count();
        assert_eq!(n, 13);
    }
}
