// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests for the v2 path finder and the v1 table.

use proptest::prelude::*;
use std::collections::VecDeque;
use vfio_mig_mock::rules::v1_table;
use vfio_mig_mock::rules::v2_arcs::*;

/// Shortest path length over the driver's required arcs obeying the uAPI
/// selection rule: saving-group states may be interior only when both ends
/// are in the saving group, and non-saving states may not be interior then.
fn bfs_len(flags: u64, cur: u32, new: u32) -> Option<usize> {
    let both_saving = in_saving_group(cur) && in_saving_group(new);
    let arcs = required_arcs(flags);
    let mut dist = [usize::MAX; 8];
    dist[cur as usize] = 0;
    let mut q = VecDeque::from([cur]);
    while let Some(s) = q.pop_front() {
        if s == new {
            return Some(dist[s as usize]);
        }
        if s != cur && in_saving_group(s) != both_saving {
            continue; // may not continue through this interior state
        }
        for &(a, b) in &arcs {
            if a == s && dist[b as usize] == usize::MAX {
                dist[b as usize] = dist[s as usize] + 1;
                q.push_back(b);
            }
        }
    }
    None
}

fn flags_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(FLAG_COMBOS.to_vec()),
        0u64..16,
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn paths_use_only_required_arcs(flags in flags_strategy(), cur in 0u32..10, new in 0u32..10) {
        if let Ok(p) = path(flags, cur, new) {
            prop_assert_eq!(p[0], cur);
            prop_assert_eq!(*p.last().unwrap(), new);
            prop_assert!(p.len() <= 5);
            for w in p.windows(2) {
                prop_assert!(driver_accepts_arc(flags, w[0], w[1]),
                    "{} -> {} not required for flags {:#x}", name(w[0]), name(w[1]), flags);
                prop_assert!(supported(flags, w[1]));
            }
            if flags & MTTY_FLAGS == MTTY_FLAGS {
                for w in p.windows(2) {
                    prop_assert!(mtty_accepts_arc(w[0], w[1]));
                }
            }
        } else {
            // Errors only for unsupported ends or the blocked pair.
            let blocked = cur == STOP_COPY && (new == PRE_COPY || new == PRE_COPY_P2P);
            prop_assert!(!supported(flags, cur) || !supported(flags, new) || blocked);
        }
    }

    #[test]
    fn next_state_is_first_step_of_path(flags in flags_strategy(), cur in 0u32..10, new in 0u32..10) {
        match (next_state(flags, cur, new), path(flags, cur, new)) {
            (Ok(n), Ok(p)) => prop_assert_eq!(n, *p.get(1).unwrap_or(&cur)),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "next_state {:?} vs path {:?}", a, b),
        }
    }

    #[test]
    fn paths_are_shortest_under_uapi_rule(fi in 0usize..4, cur in 0u32..8, new in 0u32..8) {
        let flags = FLAG_COMBOS[fi];
        let blocked = cur == STOP_COPY && (new == PRE_COPY || new == PRE_COPY_P2P);
        if supported(flags, cur) && supported(flags, new) && !blocked {
            let p = path(flags, cur, new).unwrap();
            prop_assert_eq!(Some(p.len() - 1), bfs_len(flags, cur, new));
            // no interior saving-group state unless both ends are saving
            let both = in_saving_group(cur) && in_saving_group(new);
            for &s in p.iter().skip(1).take(p.len().saturating_sub(2)) {
                prop_assert_eq!(in_saving_group(s), both);
            }
        }
    }

    #[test]
    fn reserved_flag_bits_do_not_matter(fi in 0usize..4, extra in any::<u64>(), cur in 0u32..8, new in 0u32..8) {
        let flags = FLAG_COMBOS[fi];
        let noisy = flags | (extra & !(FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY));
        prop_assert_eq!(path(flags, cur, new), path(noisy, cur, new));
    }

    #[test]
    fn v1_reserved_bits_ignored(from in any::<u32>(), to in any::<u32>()) {
        let hi = !v1_table::MASK;
        prop_assert_eq!(v1_table::transition_allowed(from, to),
            v1_table::transition_allowed(from & !hi, to & !hi));
        prop_assert_eq!(v1_table::is_valid(from), v1_table::is_valid(from & 7));
        if v1_table::transition_allowed(from, to) {
            prop_assert!(v1_table::is_valid(from) && v1_table::is_valid(to));
            prop_assert!(v1_table::reachable(from, to));
        }
    }
}
