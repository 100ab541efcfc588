// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Carrying out one planned run: two simulated hosts (`host-a` sends, `host-b` receives) with
//! their own lock and state directories, the fault injected, both processes awaited, and the
//! store's record read afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_mig_fence::{DeviceKey, DirStore, FenceRecord, HandoffRecord, SharedFencing, StateFence};

use crate::cluster::EtcdCluster;
use crate::common::{Pki, BIN};
use crate::plan::{
    Fault, Moment, Plan, Side, Store, Transport, FENCE_TIMEOUT_S, SESSION_TIMEOUT_S,
};
use crate::proc::{Ended, Proc};
use crate::relay::Relay;
use crate::tmpfs::Tmpfs;

/// The fencing variables of the caller's environment, which no run inherits.
const INHERITED: [&str; 9] = [
    "RUST_LOG",
    "VFIO_MIG_FENCE",
    "VFIO_MIG_FENCE_CA",
    "VFIO_MIG_FENCE_CERT",
    "VFIO_MIG_FENCE_CERT_KEY",
    "VFIO_MIG_FENCE_INSECURE",
    "VFIO_MIG_TLS_CERT",
    "VFIO_MIG_TLS_KEY",
    "VFIO_MIG_TLS_CA",
];

/// What a process may take beyond its bound after the peer went silent
/// ([`Plan::source_bound`]) before the soak calls it hung: the session's own work (the
/// destination's bound is the source's answer wait, which this covers too).
const WORK: Duration = Duration::from_secs(10);

/// What every run shares: its directory, the TLS identities, the etcd cluster.
pub struct World {
    /// The soak's directory.
    pub dir: tempfile::TempDir,
    /// The TLS identities of the hosts.
    pub pki: Pki,
    /// The 3-member cluster, when etcd is installed.
    pub etcd: Option<EtcdCluster>,
}

/// What the store says of the run's device state after the run.
#[derive(Debug)]
pub enum Record {
    /// The destination's own record (no `--fence`).
    Local(FenceRecord),
    /// The shared store's record (none: the handoff never reached it).
    Shared(Option<HandoffRecord>),
    /// No record is kept (`send --to file:`).
    None,
}

/// How a run ended.
#[derive(Debug)]
pub struct Outcome {
    /// `send`.
    pub source: Ended,
    /// `recv` (none for `file:`).
    pub destination: Option<Ended>,
    /// The soak had to stop an idle `recv` that never got a session (SIGTERM).
    pub stopped_idle_destination: bool,
    /// The store's record of each device state of the unit, in order.
    pub records: Vec<Record>,
    /// How long after a partition cut the link the source ended (none: no partition, or the
    /// source ended before it).
    pub after_cut: Option<Duration>,
    /// After an outcome in doubt: how `send --session` and a new `recv` ended.
    pub resolution: Option<(Ended, Ended)>,
    /// The run's directory, where `file:` output went.
    pub dir: PathBuf,
    /// The full disk of the run, mounted until the run is judged.
    pub _full_disk: Option<Tmpfs>,
}

/// A side that did not end within its limit ([`Plan::source_bound`] and [`WORK`]).
#[derive(Debug)]
pub struct Hung {
    /// Which.
    pub side: Side,
    /// What it printed before it was killed.
    pub ended: Ended,
}

/// What `recv` says when it refused a session before touching a device and listens again.
const LISTENING_AGAIN: &str = "; waiting for a source on ";

/// The owner names of the two hosts in the store.
pub const SOURCE_HOST: &str = "host-a";
/// See [`SOURCE_HOST`].
pub const DESTINATION_HOST: &str = "host-b";

impl World {
    /// `vfio-mig COMMAND...` as `host` of run `plan` (its directories, the store, short
    /// timeouts; the store's options follow the command, which owns them).
    fn cmd(&self, plan: &Plan, run: &Path, host: &str, command: &[String]) -> Command {
        let mut c = Command::new(BIN);
        c.args(command);
        for v in INHERITED {
            c.env_remove(v);
        }
        // An empty configuration: a host's own /etc/vfio-mig/config.toml never leaks in.
        c.env("VFIO_MIG_CONFIG", "/dev/null")
            .env("VFIO_MIG_LOCK_DIR", run.join(host).join("lock"))
            .env("VFIO_MIG_STATE_DIR", run.join(host).join("state"));
        match plan.store {
            Store::Local => {}
            Store::Dir => {
                c.arg("--fence")
                    .arg(format!("dir:{}", run.join("store").display()));
            }
            Store::Etcd => {
                let etcd = self.etcd.as_ref().expect("planned only with etcd");
                let pki = etcd.pki();
                c.args(["--fence", &etcd.url()])
                    .arg("--fence-ca")
                    .arg(&pki.ca)
                    .arg("--fence-cert")
                    .arg(&pki.host.cert)
                    .arg("--fence-cert-key")
                    .arg(&pki.host.key);
            }
        }
        if plan.store != Store::Local {
            c.args(["--fence-owner", host])
                .arg("--fence-timeout")
                .arg(FENCE_TIMEOUT_S.to_string());
            for key in plan.fence_keys() {
                c.args(["--fence-key", &key]);
            }
        }
        c
    }

    /// The arguments both sides of a socket session take: TLS or `--insecure`, timeouts, a
    /// unit of devices without the P2P states (v1) allowed.
    fn session_args(&self, plan: &Plan, side: Side) -> Vec<String> {
        let timeout = SESSION_TIMEOUT_S.to_string();
        let mut a: Vec<String> = [
            "--json",
            "--timeout",
            &timeout,
            "--handshake-timeout",
            &timeout,
        ]
        .map(String::from)
        .to_vec();
        if plan.unit > 1 && plan.protocol == "v1" {
            a.push("--allow-non-p2p-unit".into());
        }
        match (plan.transport, side) {
            (Transport::TcpInsecure, _) => a.push("--insecure".into()),
            (Transport::Tls, Side::Source) => {
                a.extend(self.pki.src.args());
                a.extend(["--tls-server-name".into(), "dst.example".into()]);
            }
            (Transport::Tls, Side::Destination) => {
                a.extend(self.pki.dst.args());
                a.extend(["--allow".into(), "dns:src.example".into()]);
            }
            _ => {}
        }
        a
    }

    /// Carries out `plan` in `run` (a fresh directory).
    pub fn run(&mut self, plan: &Plan, run: &Path) -> Result<Outcome, Hung> {
        std::fs::create_dir_all(run).unwrap();
        let full_disk = match plan.fault {
            Fault::StateDiskFull { pages } => Some(Tmpfs::mount(
                &match plan.store {
                    Store::Dir => run.join("store"),
                    _ => run.join(DESTINATION_HOST).join("state"),
                },
                pages,
            )),
            Fault::OutputDiskFull { pages } => Some(Tmpfs::mount(&run.join("out"), pages)),
            _ => None,
        };
        if matches!(plan.transport, Transport::File | Transport::Save) {
            return self.run_file(plan, run, full_disk);
        }
        let devices = [plan.devices(Side::Source), plan.devices(Side::Destination)];
        let (source, destination, stopped_idle_destination, cut_at) =
            self.session(plan, run, &devices, &[], Some(&plan.fault))?;
        let after_cut = cut_at.and_then(|cut| source.ended_at.checked_duration_since(cut));
        let records = self.records(plan, run);
        // An outcome in doubt is resolved as docs/cli.md says: the same send again with its
        // session id, to a recv on the destination (devices without their faults).
        let resolution = match source.printed_session() {
            Some(session) if source.code() == 3 => {
                let healthy = [
                    plan.healthy_devices(Side::Source),
                    plan.healthy_devices(Side::Destination),
                ];
                let retry = ["--session".to_owned(), session];
                let (s, d, _, _) = self.session(plan, run, &healthy, &retry, None)?;
                Some((s, d))
            }
            _ => None,
        };
        Ok(Outcome {
            source,
            destination: Some(destination),
            stopped_idle_destination,
            records,
            after_cut,
            resolution,
            dir: run.to_owned(),
            _full_disk: full_disk,
        })
    }

    /// One session: `recv --once` of `devices[1]`, `send` of `devices[0]` with `extra`
    /// arguments, `fault` injected; both awaited. Returns how each ended, whether the soak
    /// had to stop an idle `recv`, and when a partition cut the link.
    fn session(
        &mut self,
        plan: &Plan,
        run: &Path,
        devices: &[Vec<String>; 2],
        extra: &[String],
        fault: Option<&Fault>,
    ) -> Result<(Ended, Ended, bool, Option<Instant>), Hung> {
        let limit = plan.source_bound() + WORK;
        let listen = match plan.transport {
            Transport::Unix => format!("unix:{}", run.join("s").display()),
            _ => "tcp:127.0.0.1:0".into(),
        };
        let mut recv_command = vec!["recv".to_owned()];
        recv_command.extend(devices[1].iter().cloned());
        recv_command.extend(["--listen".to_owned(), listen]);
        let mut recv = self.cmd(plan, run, DESTINATION_HOST, &recv_command);
        recv.arg("--once")
            .args(self.session_args(plan, Side::Destination));
        let mut recv = Proc::spawn(recv);
        let Some(addr) = recv.wait_line("vfio-mig: recv: listening on ", limit) else {
            let ended = recv.wait(limit);
            return Err(Hung {
                side: Side::Destination,
                ended: ended.unwrap_or_else(|e| e),
            });
        };
        // A partition needs a link to cut: a relay in between.
        let relay = match fault {
            Some(Fault::Partition { .. }) => Some(Relay::start(&addr, run)),
            _ => None,
        };
        let to = relay.as_ref().map_or(addr.as_str(), |r| r.addr.as_str());
        let mut send_command = vec!["send".to_owned()];
        send_command.extend(devices[0].iter().cloned());
        send_command.extend(["--to".to_owned(), to.to_owned()]);
        let mut send = self.cmd(plan, run, SOURCE_HOST, &send_command);
        send.args(plan.live.then_some("--live"))
            .args(["--channels".to_owned(), plan.channels.to_string()])
            .args(self.session_args(plan, Side::Source))
            .args(extra);
        let mut send = Proc::spawn(send);
        let mut killed_member = None;
        let mut cut_at = None;
        match fault {
            Some(Fault::Kill { side, at }) | Some(Fault::Signal { side, at, .. }) => {
                strike_at(*at, &recv, &send);
                let signal = match fault {
                    Some(Fault::Signal { signal, .. }) => *signal,
                    _ => libc::SIGKILL,
                };
                match side {
                    Side::Source => send.signal(signal),
                    Side::Destination => recv.signal(signal),
                }
            }
            Some(Fault::EtcdMember { leader, at }) => {
                let etcd = self.etcd.as_mut().expect("planned only with etcd");
                let member = if *leader {
                    etcd.leader()
                } else {
                    (etcd.leader() + 1) % 3
                };
                strike_at(*at, &recv, &send);
                etcd.kill(member);
                killed_member = Some(member);
            }
            Some(Fault::Partition { at, heal_after }) => {
                strike_at(*at, &recv, &send);
                relay.as_ref().expect("started above").cut(*heal_after);
                cut_at = Some(Instant::now());
            }
            _ => {}
        }
        let source = send.wait(limit);
        // A recv whose source never opened a session keeps listening, as it should, and so
        // does one that refused its session before touching a device (docs/cli.md): the soak
        // stops it as an operator would. One that began loading must end on its own.
        let mut stopped_idle_destination = false;
        if !recv.exited() {
            let source_gone = source.as_ref().map_or(true, |s| s.code() != 0);
            // A session refused before its devices were touched may be refused late: a
            // multi-channel session after its 10 s bind limit. A session still to come would
            // have arrived within the source's handshake timeout.
            let idle = source_gone
                && if recv.printed("recv: session ") {
                    recv.wait_text(LISTENING_AGAIN, limit)
                } else {
                    let handshake = Duration::from_secs(SESSION_TIMEOUT_S + 1);
                    recv.wait_line("vfio-mig: recv: session ", handshake)
                        .is_none()
                };
            if idle && !recv.exited() {
                recv.signal(libc::SIGTERM);
                stopped_idle_destination = true;
            }
        }
        let destination = recv.wait(limit);
        drop(relay);
        if let Some(member) = killed_member {
            self.etcd.as_mut().unwrap().restart(member);
        }
        let source = source.map_err(|ended| Hung {
            side: Side::Source,
            ended,
        })?;
        let destination = destination.map_err(|ended| Hung {
            side: Side::Destination,
            ended,
        })?;
        Ok((source, destination, stopped_idle_destination, cut_at))
    }

    /// `send --to file:` or `save -o` into the run's `out` directory.
    fn run_file(&self, plan: &Plan, run: &Path, full_disk: Option<Tmpfs>) -> Result<Outcome, Hung> {
        let file = run.join("out").join("state.vfiomig");
        let [source] = &plan.devices(Side::Source)[..] else {
            panic!("a file holds one device; the plan drew a unit")
        };
        let source = source.clone();
        let command = match plan.transport {
            Transport::Save => [
                "save".into(),
                source,
                "-o".into(),
                file.display().to_string(),
            ],
            _ => [
                "send".into(),
                source,
                "--to".into(),
                format!("file:{}", file.display()),
            ],
        };
        let mut send = self.cmd(plan, run, SOURCE_HOST, &command);
        send.args(plan.live.then_some("--live")).arg("--json");
        let source = Proc::spawn(send)
            .wait(plan.source_bound() + WORK)
            .map_err(|ended| Hung {
                side: Side::Source,
                ended,
            })?;
        Ok(Outcome {
            source,
            destination: None,
            stopped_idle_destination: false,
            records: vec![Record::None],
            after_cut: None,
            resolution: None,
            dir: run.to_owned(),
            _full_disk: full_disk,
        })
    }

    /// The records of the run's device states in its store, one per member of the unit.
    fn records(&self, plan: &Plan, run: &Path) -> Vec<Record> {
        let shared = |store: Arc<dyn vfio_mig_fence::FenceStore>| {
            let fencing = SharedFencing::new(store, "soak-judge").unwrap();
            plan.fence_keys()
                .iter()
                .map(|key| {
                    Record::Shared(
                        fencing
                            .record(key)
                            .unwrap_or_else(|e| panic!("read the store's record of {key}: {e}")),
                    )
                })
                .collect()
        };
        match plan.store {
            Store::Local => (0..plan.unit)
                .map(|member| {
                    let id = plan.mock_id(Side::Destination, member);
                    let key = DeviceKey::from_text(format!("mock:{id}"));
                    let state = StateFence::new(&run.join(DESTINATION_HOST).join("state"), &key);
                    Record::Local(
                        state
                            .load()
                            .unwrap_or_else(|e| panic!("read the record of {id}: {e}")),
                    )
                })
                .collect(),
            Store::Dir => shared(Arc::new(DirStore::new(run.join("store")))),
            Store::Etcd => shared(Arc::new(self.etcd.as_ref().unwrap().store())),
        }
    }
}

/// Waits for a timed fault's moment: its delay, counted from now (the source's start) or
/// from the destination's session line (or either process's end, if no session comes).
fn strike_at(at: Moment, recv: &Proc, send: &Proc) {
    if at.from_session {
        while !send.exited() && !recv.exited() {
            let poll = Duration::from_millis(50);
            if recv.wait_line("vfio-mig: recv: session ", poll).is_some() {
                break;
            }
        }
    }
    std::thread::sleep(at.after);
}
