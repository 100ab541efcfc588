// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A 3-member etcd cluster on loopback for the tests (also used by the command's tests in
//! vfio-mig/cli/tests/fence_store.rs).
//!
//! The cluster is Debian's `etcd` binary (package etcd-server), started once per test with
//! its own ports and data directories. Without the binary the etcd half of a test is
//! skipped, loudly; with `VFIO_MIG_REQUIRE_ETCD=1` (set by scripts/test-all.sh) it fails.

#![allow(dead_code)]

use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_mig::fence::FenceStore;
use vfio_mig_etcd::EtcdStore;

/// The environment variable that turns a missing etcd into a failure.
pub const REQUIRE_ETCD: &str = "VFIO_MIG_REQUIRE_ETCD";

/// How long a cluster may take to elect a leader and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One member of a test cluster.
struct Member {
    name: String,
    client: String,
    child: Option<Child>,
}

/// A 3-member etcd cluster on 127.0.0.1, killed (and its data removed) when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    _data: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
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
    /// Starts a cluster, or `None` (after [`skip_or_fail`]) when etcd is not installed.
    pub fn start() -> Option<Self> {
        let binary = match etcd_binary() {
            Ok(b) => b,
            Err(why) => {
                skip_or_fail(&why);
                return None;
            }
        };
        let data = tempfile::tempdir().expect("a data directory");
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
            let log = std::fs::File::create(data.path().join(format!("{name}.log"))).unwrap();
            let child = Command::new(&binary)
                .args(["--name", &name])
                .arg("--data-dir")
                .arg(data.path().join(&name))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            members.push(Member {
                name,
                client: format!("127.0.0.1:{client}"),
                child: Some(child),
            });
        }
        let cluster = Self {
            members,
            _data: data,
        };
        cluster.wait_ready();
        Some(cluster)
    }

    /// Waits until every member answers a linearizable read (the cluster has a leader).
    fn wait_ready(&self) {
        let started = Instant::now();
        for m in &self.members {
            let store = EtcdStore::new(vec![m.client.clone()])
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
                        std::fs::read_to_string(self._data.path().join(format!("{}.log", m.name)))
                            .unwrap_or_default()
                    ),
                }
            }
        }
    }

    /// The cluster's URL: `etcd://` and every member.
    pub fn url(&self) -> String {
        format!(
            "etcd://{}",
            self.members
                .iter()
                .map(|m| m.client.as_str())
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    /// A store client of the whole cluster.
    pub fn store(&self) -> EtcdStore {
        EtcdStore::from_url(&self.url()).unwrap()
    }

    /// The index of the member that leads now.
    pub fn leader(&self) -> usize {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            let Ok(mut r) = agent
                .post(&format!("http://{}/v3/maintenance/status", m.client))
                .send("{}")
            else {
                continue;
            };
            let v: serde_json::Value =
                serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
            if v["leader"] == v["header"]["member_id"] {
                return self.members.iter().position(|x| x.name == m.name).unwrap();
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
