// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The soak under faults (issue 21): seeded random runs of `send` and `recv` processes (two
//! simulated hosts) over every transport (unix, TCP `--insecure`, TLS, `file:`, `save -o`) and
//! fencing store (none, `dir:`, the 3-member etcd cluster), each with one random fault: a
//! side killed (SIGKILL) or signalled (SIGTERM, SIGINT, SIGHUP) at a random moment, an etcd member
//! killed (and restarted after), a full disk under the store or the output (a small tmpfs,
//! as root), a device fault on either side, a network partition (a relay between the sides
//! stops forwarding both ways, closing nothing, for up to 7 s or for good). After each run the exit statuses, the `--json`
//! outcomes, the store's record and the devices' fates must agree (judge.rs).
//!
//! `VFIO_MIG_SOAK_SEED=N` replays a seed (printed at the start; random by default),
//! `VFIO_MIG_SOAK_RUNS=N` sets the number of runs, `VFIO_MIG_SOAK_ONLY=I` runs only run I of
//! the seed. A replay draws the same plans; when a timed fault lands depends on the machine.

#[path = "../../../etcd/tests/common/cluster.rs"]
mod cluster;
#[path = "../common/mod.rs"]
mod common;
mod judge;
mod plan;
mod proc;
mod relay;
mod run;
mod tmpfs;

use std::collections::BTreeMap;

use plan::{Means, Plan};
use run::World;

/// Replays a seed.
const SEED: &str = "VFIO_MIG_SOAK_SEED";
/// The number of runs.
const RUNS: &str = "VFIO_MIG_SOAK_RUNS";
/// Runs only this run of the seed.
const ONLY: &str = "VFIO_MIG_SOAK_ONLY";
/// Includes partitions that never heal.
const LASTING_PARTITIONS: &str = "VFIO_MIG_SOAK_LASTING_PARTITIONS";
/// Runs by default: 40 to 70 s on a loaded 2-core machine.
const DEFAULT_RUNS: usize = 60;

fn env_number(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    Some(
        text.parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
    )
}

#[test]
fn sessions_agree_after_a_random_single_fault() {
    let seed = env_number(SEED).unwrap_or_else(|| fastrand::u64(..));
    let runs = env_number(RUNS).map_or(DEFAULT_RUNS, |n| n as usize);
    let only = env_number(ONLY).map(|n| n as usize);
    eprintln!("soak: seed {seed}, {runs} runs (replay: {SEED}={seed} {RUNS}={runs})");
    let tmpfs = tmpfs::available();
    if !tmpfs {
        let line = "SKIPPED (the soak's full-disk faults): mounting a tmpfs needs root";
        assert!(
            std::env::var(tmpfs::REQUIRE_TMPFS).as_deref() != Ok("1"),
            "{line} ({}=1 requires them)",
            tmpfs::REQUIRE_TMPFS
        );
        println!("{line}");
        eprintln!("{line}");
    }
    // Without etcd: skipped loudly, or a failure under VFIO_MIG_REQUIRE_ETCD=1.
    let etcd = cluster::EtcdCluster::start();
    let lasting_partitions = std::env::var(LASTING_PARTITIONS).as_deref() == Ok("1");
    if !lasting_partitions {
        // A known finding, not yet fixed: under a partition that never heals, with a shared
        // store, a source was seen still waiting on its connection after 30 s.
        let line = format!(
            "LEFT OUT (the soak's partitions that never heal: a source under one with a \
             shared store outlived the 30 s bound; {LASTING_PARTITIONS}=1 includes them)"
        );
        println!("{line}");
        eprintln!("{line}");
    }
    let means = Means {
        etcd: etcd.is_some(),
        tmpfs,
        lasting_partitions,
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::new(dir.path());
    let mut world = World { dir, pki, etcd };
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut failures = Vec::new();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for index in 0..runs {
        // Every plan is drawn, so that run I is the same with or without ONLY.
        let plan = Plan::draw(&mut rng, index, means);
        if only.is_some_and(|o| o != index) {
            continue;
        }
        eprintln!("soak: {plan}");
        let dir = world.dir.path().join(format!("run{index}"));
        let report = match world.run(&plan, &dir) {
            Err(hung) => Some(format!(
                "{:?} did not end within its bound\n--- its stderr:\n{}\n--- its stdout:\n{}",
                hung.side, hung.ended.stderr, hung.ended.stdout
            )),
            Ok(outcome) => {
                *tally.entry(summary(&outcome)).or_default() += 1;
                let wrong = judge::run(&plan, &outcome);
                (!wrong.is_empty()).then(|| describe(&wrong, &outcome))
            }
        };
        if let Some(report) = report {
            eprintln!("soak: DISAGREEMENT in {plan} (seed {seed})\n{report}");
            failures.push(format!("{plan}\n{report}"));
        }
    }
    eprintln!("soak: outcomes (source exit, destination exit): {tally:?}");
    assert!(
        failures.is_empty(),
        "the soak with seed {seed} ({SEED}={seed} {RUNS}={runs}) found {} disagreement(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// `SOURCE / DESTINATION` exit statuses (or `killed`), and those of the retry in doubt.
fn summary(outcome: &run::Outcome) -> String {
    let status = |e: &proc::Ended| {
        if e.killed() {
            "killed".to_owned()
        } else {
            e.code().to_string()
        }
    };
    let first = match &outcome.destination {
        Some(d) => format!("{} / {}", status(&outcome.source), status(d)),
        None => format!("{} / file", status(&outcome.source)),
    };
    match &outcome.resolution {
        Some((s, d)) => format!("{first}, retried: {} / {}", status(s), status(d)),
        None => first,
    }
}

/// The disagreements, both sides' output and the store's record.
fn describe(wrong: &[String], outcome: &run::Outcome) -> String {
    let mut text = wrong.join("\n");
    let side = |name: &str, e: &proc::Ended| {
        format!(
            "\n--- {name}: {} (signals sent {:?})\n{}\n{}",
            e.status, e.sent, e.stderr, e.stdout
        )
    };
    text.push_str(&side("source", &outcome.source));
    if let Some(d) = &outcome.destination {
        text.push_str(&side("destination", d));
    }
    text.push_str(&format!("\n--- record: {:?}", outcome.record));
    text
}
