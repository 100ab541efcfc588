// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What one soak run does, drawn from the run's seed: the transport, the fencing store, the
//! devices, and the one fault injected into it.

use std::fmt;
use std::time::Duration;

/// How the state travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `unix:PATH`.
    Unix,
    /// `tcp:127.0.0.1:PORT --insecure`.
    TcpInsecure,
    /// `tcp:127.0.0.1:PORT` with TLS (the test PKI of tests/common).
    Tls,
    /// `send --to file:PATH` (no destination process).
    File,
    /// `save -o PATH` (no destination process).
    Save,
}

/// Where the handoff is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// No `--fence`: the destination's own record in its state directory.
    Local,
    /// `--fence dir:PATH`, shared by both hosts.
    Dir,
    /// `--fence etcds://...`: the soak's 3-member cluster.
    Etcd,
}

/// One of the two processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `send`.
    Source,
    /// `recv`.
    Destination,
}

/// The one fault of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL to one side.
    Kill { side: Side, at: Moment },
    /// SIGTERM, SIGINT or SIGHUP to one side.
    Signal { side: Side, signal: i32, at: Moment },
    /// SIGKILL to an etcd member (the leader, or another); restarted once the run ended.
    EtcdMember { leader: bool, at: Moment },
    /// The fencing store's directory (`dir:`), or without `--fence` the destination's state
    /// directory, on a tmpfs of `pages` pages.
    StateDiskFull { pages: u64 },
    /// `send --to file:` or `save -o` onto a tmpfs of `pages` pages.
    OutputDiskFull { pages: u64 },
    /// A `fail-at=RULE` of one side's mock: the `member`-th device of its unit.
    Device {
        side: Side,
        member: usize,
        rule: String,
    },
    /// A relay between the sides stops forwarding in both directions, closing nothing: for
    /// `heal_after`, then it forwards again, or for good.
    Partition {
        at: Moment,
        heal_after: Option<Duration>,
    },
}

/// When a timed fault strikes: `after` the source started, or `after` the destination
/// printed its session line (so that more faults land near the end of the session, around
/// COMMIT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Counted from the destination's session line, not the source's start.
    pub from_session: bool,
    /// The delay.
    pub after: Duration,
}

/// Everything a run does.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The run's number in the soak.
    pub index: usize,
    /// How the state travels.
    pub transport: Transport,
    /// Where the handoff is recorded.
    pub store: Store,
    /// `v1` or `v2`.
    pub protocol: &'static str,
    /// The mocks' state size, MiB.
    pub size_mib: u64,
    /// The mocks' content seed.
    pub seed: u64,
    /// `--live`.
    pub live: bool,
    /// Devices a side: 1, or a unit of 2 (one stream, one handoff, all or nothing).
    pub unit: usize,
    /// `send --channels`: 1, or 2 (the destination takes at most one per device).
    pub channels: u16,
    /// The fault.
    pub fault: Fault,
}

/// What the machine offers the soak.
#[derive(Debug, Clone, Copy)]
pub struct Means {
    /// The etcd cluster runs.
    pub etcd: bool,
    /// Small tmpfs mounts can be made (root).
    pub tmpfs: bool,
    /// How many more partitions may last for good.
    pub lasting_partitions: usize,
    /// Only this kind of fault is drawn (`VFIO_MIG_SOAK_FAULT`: a sweep of one kind).
    pub only_fault: Option<&'static str>,
}

/// The kinds of fault, as [`Means::only_fault`] names them.
pub const FAULT_KINDS: [&str; 7] = [
    "kill",
    "signal",
    "device",
    "partition",
    "etcd",
    "state-disk",
    "output-disk",
];

/// Latest moment of a timed fault from the source's start: a run on a 4-16 MiB mock takes
/// about this long on a loaded machine, so faults land before, during and after the session.
const LATEST_FAULT_MS: u64 = 150;
/// Longest partition that heals: beyond the sides' 5 s idle timeouts.
const LATEST_HEAL_MS: u64 = 7000;
/// Latest moment of a timed fault from the destination's session line.
const LATEST_IN_SESSION_MS: u64 = 80;

/// Both sides' `--timeout` and `--handshake-timeout`, seconds.
pub const SESSION_TIMEOUT_S: u64 = 5;
/// Both sides' `--fence-timeout` with a shared store, seconds.
pub const FENCE_TIMEOUT_S: u64 = 2;
/// What docs/cli.md's bound leaves out: starting and ending a process, rolling the mocks
/// back, a loaded machine's scheduling.
const BOUND_SLACK: Duration = Duration::from_secs(2);

impl Plan {
    /// Draws run `index` from `rng`, using only what `means` offers.
    pub fn draw(rng: &mut fastrand::Rng, index: usize, means: Means) -> Plan {
        let protocol = if rng.bool() { "v2" } else { "v1" };
        let size_mib = rng.u64(4..=16);
        let from_session = rng.bool();
        let latest = if from_session {
            LATEST_IN_SESSION_MS
        } else {
            LATEST_FAULT_MS
        };
        let at = Moment {
            from_session,
            after: Duration::from_millis(rng.u64(0..=latest)),
        };
        let side = if rng.bool() {
            Side::Source
        } else {
            Side::Destination
        };
        let socket = [Transport::Unix, Transport::TcpInsecure, Transport::Tls];
        let mut transport = socket[rng.usize(..socket.len())];
        let stores: &[Store] = if means.etcd {
            &[Store::Local, Store::Dir, Store::Etcd]
        } else {
            &[Store::Local, Store::Dir]
        };
        let mut store = stores[rng.usize(..stores.len())];
        let mut kinds = vec![
            "kill",
            "kill",
            "signal",
            "signal",
            "device",
            "device",
            "partition",
            "partition",
        ];
        if means.etcd {
            kinds.push("etcd");
        }
        if means.tmpfs {
            kinds.extend(["state-disk", "output-disk"]);
        }
        if let Some(only) = means.only_fault {
            kinds.retain(|k| *k == only);
            assert!(!kinds.is_empty(), "this machine cannot make {only} faults");
        }
        let mut fault = match kinds[rng.usize(..kinds.len())] {
            "kill" => Fault::Kill { side, at },
            "signal" => Fault::Signal {
                side,
                signal: [libc::SIGTERM, libc::SIGINT, libc::SIGHUP][rng.usize(..3)],
                at,
            },
            "etcd" => {
                store = Store::Etcd;
                Fault::EtcdMember {
                    leader: rng.bool(),
                    at,
                }
            }
            "partition" => {
                // Healed before or after the sides' 5 s timeouts, or never.
                let heal = Duration::from_millis(rng.u64(0..=LATEST_HEAL_MS));
                let lasting = rng.bool() && means.lasting_partitions > 0;
                Fault::Partition {
                    at,
                    heal_after: (!lasting).then_some(heal),
                }
            }
            "state-disk" => {
                store = if rng.bool() { Store::Dir } else { Store::Local };
                Fault::StateDiskFull {
                    pages: rng.u64(1..=3),
                }
            }
            "output-disk" => {
                transport = if rng.bool() {
                    Transport::File
                } else {
                    Transport::Save
                };
                store = Store::Local;
                Fault::OutputDiskFull {
                    // Up to a quarter more than the state: some saves fit.
                    pages: rng.u64(1..=size_mib * 320),
                }
            }
            _ => Fault::Device {
                side,
                member: 0,
                rule: device_rule(rng, protocol, side),
            },
        };
        let seed = rng.u64(0..1000);
        let live = rng.bool();
        // Drawn last, so that the earlier fields of a seed's runs stay as they were.
        let socket = !matches!(transport, Transport::File | Transport::Save);
        let unit = if rng.bool() && socket { 2 } else { 1 };
        let channels = if rng.bool() && socket { 2 } else { 1 };
        let faulty = rng.usize(..unit);
        if let Fault::Device { member, .. } = &mut fault {
            *member = faulty;
        }
        Plan {
            index,
            transport,
            store,
            protocol,
            size_mib,
            seed,
            live,
            unit,
            channels,
            fault,
        }
    }

    /// The longest the source may take once its peer went silent, by docs/cli.md
    /// ("Timeouts"): one wait for the destination (its answer wait: `--timeout`, or with a
    /// shared store `--fence-timeout` × (devices + 2) + 5 s if longer), the wait for a
    /// failed channel's reason (2 s, with more than one channel), and the store's calls that
    /// end the handoff (two reads a device, a transaction, the lease's revocation, each
    /// within `--fence-timeout`); plus the soak's slack.
    pub fn source_bound(&self) -> Duration {
        let session = Duration::from_secs(SESSION_TIMEOUT_S);
        let fence = Duration::from_secs(FENCE_TIMEOUT_S);
        let shared = self.store != Store::Local;
        let mut bound = if shared {
            let unit = u32::try_from(self.unit).unwrap();
            let answer_wait = session.max(fence * (unit + 2) + Duration::from_secs(5));
            answer_wait + fence * (2 * unit + 2)
        } else {
            session
        };
        if self.channels > 1 {
            bound += Duration::from_secs(2);
        }
        bound + BOUND_SLACK
    }

    /// The source's or destination's mocks (the unit's members in order), each named `id=`
    /// by its side, the run and its place in the unit ([`Plan::mock_id`]).
    pub fn devices(&self, side: Side) -> Vec<String> {
        (0..self.unit)
            .map(|member| {
                let mut spec = format!(
                    "mock:{},size={}M,seed={},dirty-rate=4M,id={}",
                    self.protocol,
                    self.size_mib,
                    self.seed + member as u64,
                    self.mock_id(side, member)
                );
                if let Fault::Device {
                    side: s,
                    member: m,
                    rule,
                } = &self.fault
                {
                    if (*s, *m) == (side, member) {
                        spec.push_str(",fail-at=");
                        spec.push_str(rule);
                    }
                }
                spec
            })
            .collect()
    }

    /// The same mocks without their fault: the devices of a retry.
    pub fn healthy_devices(&self, side: Side) -> Vec<String> {
        self.devices(side)
            .into_iter()
            .map(|spec| match spec.find(",fail-at=") {
                Some(at) => spec[..at].to_owned(),
                None => spec,
            })
            .collect()
    }

    /// The `id=` of `side`'s `member`-th mock.
    pub fn mock_id(&self, side: Side, member: usize) -> String {
        let role = match side {
            Side::Source => "src",
            Side::Destination => "dst",
        };
        match member {
            0 => format!("{role}{}", self.index),
            m => format!("{role}{}-{m}", self.index),
        }
    }

    /// The identities of the unit's device states in the fencing store, in order.
    pub fn fence_keys(&self) -> Vec<String> {
        (0..self.unit)
            .map(|member| match member {
                0 => format!("soak/run{}", self.index),
                m => format!("soak/run{}-{m}", self.index),
            })
            .collect()
    }
}

/// A device fault of `side` for `protocol` (docs/cli.md, "Fault injection"): a data transfer
/// failing part-way, or a state transition refused (the destination's RUNNING arc is the one
/// after the source's COMMIT); sometimes also dropping the device into ERROR.
fn device_rule(rng: &mut fastrand::Rng, protocol: &str, side: Side) -> String {
    let n = rng.u64(1..=8);
    let rules: Vec<String> = match (protocol, side) {
        ("v2", Side::Source) => vec![
            format!("data-read@{n}"),
            "set-state:STOP_COPY@1".into(),
            format!("precopy-info@{n}"),
        ],
        ("v2", Side::Destination) => vec![
            format!("data-write@{n}"),
            "set-state:RESUMING@1".into(),
            "set-state:RUNNING@1".into(),
        ],
        (_, Side::Source) => vec![
            format!("pending@{n}"),
            format!("data-size-read@{n}"),
            format!("state-write@{}", rng.u64(1..=2)),
        ],
        (_, Side::Destination) => vec![
            format!("data-size-write@{n}"),
            format!("data-offset@{n}"),
            format!("state-write@{}", rng.u64(1..=2)),
        ],
    };
    let mut rule = rules[rng.usize(..rules.len())].clone();
    if rng.u8(..3) == 0 {
        rule.push_str(":error");
    }
    rule
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run {}: over {:?}, store {:?}, {} {} MiB seed {}{}, {} device(s), {} channel(s), \
             fault {:?}",
            self.index,
            self.transport,
            self.store,
            self.protocol,
            self.size_mib,
            self.seed,
            if self.live { " --live" } else { "" },
            self.unit,
            self.channels,
            self.fault
        )
    }
}
