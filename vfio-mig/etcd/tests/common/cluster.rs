// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A 3-member etcd cluster on loopback for the tests (also used by the command's tests in
//! vfio-mig/cli/tests/fence_store.rs).
//!
//! The cluster is Debian's `etcd` binary (package etcd-server), started once per test with
//! its own ports and data directories. Without the binary the etcd half of a test is
//! skipped, loudly; with `VFIO_MIG_REQUIRE_ETCD=1` (set by scripts/test-all.sh) it fails.
//!
//! [`EtcdCluster::start`] serves clients over TLS only to holders of a certificate of the
//! test's CA (`--client-cert-auth --trusted-ca-file`), as docs/fencing.md says to run it;
//! [`EtcdCluster::start_plain`] serves plain HTTP. The certificates are minted (vfio-mig-testcerts) in
//! the cluster's directory ([`Pki`]), with a second CA for the certificates the cluster must
//! refuse. Each member also serves plain-HTTP metrics (nothing of the store), which is how
//! [`EtcdCluster::leader`] finds the leader.

#![allow(dead_code)]

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_mig_etcd::{EtcdStore, EtcdTls, Security};
use vfio_mig_fence::FenceStore;
use vfio_mig_testcerts::{Ca, Leaf, Usage};

/// The environment variable that turns a missing etcd into a failure.
pub const REQUIRE_ETCD: &str = "VFIO_MIG_REQUIRE_ETCD";

/// How long a cluster may take to elect a leader and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One member of a test cluster.
struct Member {
    name: String,
    client: String,
    metrics: String,
    child: Option<Child>,
    /// How it was started, so that [`EtcdCluster::restart`] starts it again the same way.
    command: Vec<std::ffi::OsString>,
    log: PathBuf,
}

/// Starts an etcd member: `command` (the binary, then its arguments), stderr appended to `log`.
fn spawn_member(command: &[std::ffi::OsString], log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", command[0]))
}

/// A 3-member etcd cluster on 127.0.0.1, killed (and its data removed) when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    pki: Option<Pki>,
    _data: tempfile::TempDir,
}

/// The test cluster's certificates: its CA, the members' certificate (127.0.0.1), a host's
/// client certificate, and a second CA with a client and a member certificate of its own.
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA of the cluster (the members' `--trusted-ca-file`, the hosts' `--fence-ca`).
    pub ca: PathBuf,
    /// The members' certificate, signed by `ca`.
    pub member: Leaf,
    /// A host's client certificate, signed by `ca`.
    pub host: Leaf,
    /// Another CA, which the cluster does not trust.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca`.
    pub other_host: Leaf,
}

impl Pki {
    /// Makes the certificates in `dir`.
    pub fn new(dir: &Path) -> Self {
        let ca = Ca::new(dir, "fleet-ca").unwrap();
        let other = Ca::new(dir, "other-ca").unwrap();
        // A member serves clients and dials its peers on 127.0.0.1 (and localhost).
        let member_names = ["127.0.0.1", "localhost"];
        Pki {
            member: ca
                .leaf(dir, "member", &member_names, Usage::ServerAndClient)
                .unwrap(),
            host: ca.leaf(dir, "host", &[], Usage::Client).unwrap(),
            other_host: other.leaf(dir, "other-host", &[], Usage::Client).unwrap(),
            ca: ca.pem().to_owned(),
            other_ca: other.pem().to_owned(),
        }
    }

    /// A host of the fleet: the cluster's CA and a certificate it signed.
    pub fn host_tls(&self) -> EtcdTls {
        EtcdTls::new(&self.ca, &self.host.cert, &self.host.key)
    }
}

/// A loopback port free now and never handed out before in this process: the tests of one
/// binary start clusters on parallel threads, and the kernel may offer a port another thread
/// was given (and has not bound yet) again, which made a member fail to bind.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The path of the etcd binary, or why there is none.
fn etcd_binary() -> Result<PathBuf, String> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("etcd");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err("no `etcd` binary in PATH (Debian: apt-get install etcd-server)".into())
}

/// Reports a skip loudly, or fails when [`REQUIRE_ETCD`] is set.
pub fn skip_or_fail(reason: &str) {
    let line = format!("SKIPPED (etcd half of the test): {reason}");
    if std::env::var(REQUIRE_ETCD).as_deref() == Ok("1") {
        panic!("{line} ({REQUIRE_ETCD}=1 requires the etcd tests to run)");
    }
    println!("{line}");
    let _ = writeln!(std::io::stderr(), "{line}");
}

impl EtcdCluster {
    /// Starts a cluster serving clients over TLS with client certificates, or `None` (after
    /// [`skip_or_fail`]) when etcd is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(true)
    }

    /// Starts a cluster serving clients over plain HTTP.
    pub fn start_plain() -> Option<Self> {
        Self::start_with(false)
    }

    fn start_with(tls: bool) -> Option<Self> {
        let binary = match etcd_binary() {
            Ok(b) => b,
            Err(why) => {
                skip_or_fail(&why);
                return None;
            }
        };
        let data = tempfile::tempdir().expect("a data directory");
        let pki = tls.then(|| Pki::new(data.path()));
        let client_scheme = if tls { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let token = format!("vfio-mig-test-{}-{}", std::process::id(), ports[0].0);
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let name = format!("m{i}");
            let log = data.path().join(format!("{name}.log"));
            let metrics = free_port();
            let mut cmd = Command::new(&binary);
            if let Some(pki) = &pki {
                cmd.arg("--cert-file")
                    .arg(&pki.member.cert)
                    .arg("--key-file")
                    .arg(&pki.member.key)
                    .arg("--client-cert-auth")
                    .arg("--trusted-ca-file")
                    .arg(&pki.ca);
            }
            cmd.args(["--name", &name])
                .arg("--data-dir")
                .arg(data.path().join(&name))
                .args([
                    "--listen-client-urls",
                    &format!("{client_scheme}://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("{client_scheme}://127.0.0.1:{client}"),
                ])
                .args([
                    "--listen-metrics-urls",
                    &format!("http://127.0.0.1:{metrics}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token]);
            // A restart finds its data directory and ignores the --initial-cluster options.
            let command: Vec<std::ffi::OsString> = std::iter::once(cmd.get_program())
                .chain(cmd.get_args())
                .map(ToOwned::to_owned)
                .collect();
            let child = spawn_member(&command, &log);
            members.push(Member {
                name,
                client: format!("127.0.0.1:{client}"),
                metrics: format!("127.0.0.1:{metrics}"),
                child: Some(child),
                command,
                log,
            });
        }
        let cluster = Self {
            members,
            pki,
            _data: data,
        };
        cluster.wait_ready();
        Some(cluster)
    }

    /// Waits until every member answers a linearizable read (the cluster has a leader).
    fn wait_ready(&self) {
        let started = Instant::now();
        for m in &self.members {
            let store = EtcdStore::new(vec![m.client.clone()], &self.security())
                .unwrap()
                .with_operation_timeout(Duration::from_secs(2));
            loop {
                match store.get("vfio-mig-test/ready") {
                    Ok(_) => break,
                    Err(e) if started.elapsed() < START_TIMEOUT => {
                        log::debug!("waiting for {}: {e}", m.name)
                    }
                    Err(e) => panic!(
                        "etcd member {} did not come up in {START_TIMEOUT:?}: {e}; its log: {}",
                        m.name,
                        std::fs::read_to_string(&m.log).unwrap_or_default()
                    ),
                }
            }
        }
    }

    /// The cluster's certificates (a TLS cluster).
    pub fn pki(&self) -> &Pki {
        self.pki.as_ref().expect("a TLS cluster")
    }

    /// How a host of the fleet reaches the cluster: TLS with the host's certificate, or
    /// plain HTTP for a plain cluster.
    pub fn security(&self) -> Security {
        match &self.pki {
            Some(pki) => Security::Tls(pki.host_tls()),
            None => Security::InsecurePlainHttp,
        }
    }

    /// The cluster's URL: `etcds://` (or `etcd://`) and every member.
    pub fn url(&self) -> String {
        format!(
            "{}{}",
            if self.pki.is_some() {
                "etcds://"
            } else {
                "etcd://"
            },
            self.members
                .iter()
                .map(|m| m.client.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// The members' client addresses (`127.0.0.1:PORT`).
    pub fn client_endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A store client of the whole cluster, as a host of the fleet.
    pub fn store(&self) -> EtcdStore {
        EtcdStore::from_url(&self.url(), &self.security()).unwrap()
    }

    /// The index of the member that leads now (from the members' metrics).
    pub fn leader(&self) -> usize {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(mut r) = agent.get(&format!("http://{}/metrics", m.metrics)).call() else {
                continue;
            };
            let text = r.body_mut().read_to_string().unwrap_or_default();
            if text.lines().any(|l| l == "etcd_server_is_leader 1") {
                return i;
            }
        }
        panic!("no member of the test cluster leads");
    }

    /// Kills member `i` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again after [`EtcdCluster::kill`] (on its data directory, so it
    /// rejoins as itself) and waits until every member answers.
    pub fn restart(&mut self, i: usize) {
        let m = &mut self.members[i];
        if m.child.is_none() {
            m.child = Some(spawn_member(&m.command, &m.log));
        }
        self.wait_ready();
    }

    /// Freezes member `i` (SIGSTOP: its sockets accept and nothing answers, as behind a
    /// partition that drops packets) or thaws it (SIGCONT).
    pub fn freeze(&mut self, i: usize, frozen: bool) {
        if let Some(c) = &self.members[i].child {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let status = Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} member {i}");
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
