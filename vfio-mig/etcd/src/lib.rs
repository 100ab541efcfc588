// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! etcd v3 as the fencing store of vfio-mig ([`vfio_mig_fence::FenceStore`]): the claims and
//! epochs of device states live where every host of a fleet sees them.
//!
//! The store speaks etcd's v3 JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`; keys and values in base64,
//! 64-bit numbers as strings) over HTTP/1.1 with a small blocking client (`ureq`). The
//! gateway is served by every etcd since 3.4 under `/v3/` (3.4 also keeps `/v3beta/`,
//! which 3.5 dropped), so one client covers Debian bookworm's 3.4 and current releases. The
//! gRPC client (`etcd-client`) would bring tokio and tonic into a VMM's migration path for
//! five unary calls; this costs `ureq`, `base64` and `serde_json`, and for TLS the rustls
//! the library's `tls` feature already has.
//!
//! Whoever can write the store decides who owns a device state, so a store is reached over
//! TLS ([`Security::Tls`], URL `etcds://`): every member's certificate must chain to the
//! given CA (not the system's roots) and name the member's host, and this host presents its
//! client certificate, which an etcd run with `--client-cert-auth --trusted-ca-file` checks
//! before it serves anything. Plain HTTP (`etcd://`) is [`Security::InsecurePlainHttp`], by
//! name. A member that refuses this host's certificate, or whose certificate does not
//! verify, refuses the operation at once (it is configuration, not an outage).
//!
//! Requests go to one member at a time; a member that cannot be reached, or answers that it
//! has no leader or timed out, is skipped for the next one, until the operation's deadline.
//! Every read is linearizable (etcd's default for a range without `serializable`), so a
//! member cut off from the quorum never answers from a stale copy. A transaction whose
//! answer was lost may be sent again to another member: the handoff protocol conditions
//! every write on revisions, so a second copy fails its conditions and the protocol reads
//! what the first one did.

mod endpoint;
mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use vfio_mig_fence::{
    store_error, store_in_doubt, Condition, Entry, FenceStore, LeaseId, Revision, Write,
};
use vfio_mig_fence::{Error, Result};

pub use endpoint::{parse_url, Scheme, PLAIN_SCHEME, TLS_SCHEME};
pub use tls::{ClientIdentity, EtcdTls};

/// How long one operation may take, over all members, before the store counts as
/// unreachable.
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one HTTP request to one member may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// The pause after every member failed once, before the next round.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// How a store reaches its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// TLS with these files (URL `etcds://`).
    Tls(EtcdTls),
    /// Plain HTTP (URL `etcd://`): anyone who reaches a member's client port can read and
    /// rewrite every owner and epoch. Only on a network where nothing else can.
    InsecurePlainHttp,
}

/// An etcd v3 cluster as a fencing store.
pub struct EtcdStore {
    endpoints: Vec<String>,
    scheme: Scheme,
    /// The TLS configuration again, for [`tls::diagnose`].
    probe: Option<Arc<rustls::ClientConfig>>,
    agent: ureq::Agent,
    /// The member that answered last (tried first).
    preferred: AtomicUsize,
    operation_timeout: Duration,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// One member's failure, kept for the "unreachable" message.
enum Failure {
    /// Worth trying another member (not reachable, no leader, timed out). `maybe_applied`:
    /// the request went out and no answer says it was not applied (a lost answer, a timed
    /// out proposal), so a write may have been.
    Transient { why: String, maybe_applied: bool },
    /// TLS failed (a certificate refused either way): another member may be configured
    /// differently, but when every member refuses, no later try will do better.
    Tls(String),
    /// The cluster refused the request itself (the same everywhere).
    Final(String),
}

impl EtcdStore {
    /// The cluster whose members' client addresses are `endpoints` (`HOST:PORT`), reached
    /// as `security` says. The TLS files are read and checked here.
    pub fn new(endpoints: Vec<String>, security: &Security) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::invalid_input("etcd: no endpoint"));
        }
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(Duration::from_secs(1)));
        let (config, scheme, probe) = match security {
            Security::Tls(files) => {
                let (ureq_config, rustls_config) = files.configs()?;
                (
                    config.tls_config(ureq_config),
                    Scheme::Tls,
                    Some(rustls_config),
                )
            }
            Security::InsecurePlainHttp => (config, Scheme::Plain, None),
        };
        Ok(Self {
            endpoints,
            scheme,
            probe,
            agent: config.build().into(),
            preferred: AtomicUsize::new(0),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
        })
    }

    /// The cluster of an `etcds://HOST:PORT[,HOST:PORT...]` URL with [`Security::Tls`], or
    /// of an `etcd://...` URL with [`Security::InsecurePlainHttp`]; any other pairing is an
    /// error (a URL never silently drops or adds TLS).
    pub fn from_url(url: &str, security: &Security) -> Result<Self> {
        let (scheme, endpoints) = parse_url(url)?;
        match (scheme, security) {
            (Scheme::Tls, Security::Tls(_)) | (Scheme::Plain, Security::InsecurePlainHttp) => {
                Self::new(endpoints, security)
            }
            (Scheme::Tls, Security::InsecurePlainHttp) => Err(Error::invalid_input(format!(
                "--fence {url}: an etcds:// store needs a CA, a client certificate and its key"
            ))),
            (Scheme::Plain, Security::Tls(_)) => Err(Error::invalid_input(format!(
                "--fence {url}: etcd:// is plain HTTP, but TLS files were given: use etcds://"
            ))),
        }
    }

    /// The same with operations giving up after `timeout` over all members.
    pub fn with_operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// The members' client addresses.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn post_once(
        &self,
        endpoint: &str,
        path: &str,
        body: &str,
        timeout: Duration,
    ) -> std::result::Result<Value, Failure> {
        let url = match self.scheme {
            Scheme::Tls => format!("https://{endpoint}{path}"),
            Scheme::Plain => format!("http://{endpoint}{path}"),
        };
        // TLS 1.3 checks the client's certificate after the client's side of the handshake
        // is done: a refusal may arrive while the answer is read.
        let failed = |what: &str, e: ureq::Error| {
            let refused = tls::tls_failure(&e).or_else(|| {
                let probe = self
                    .probe
                    .as_ref()
                    .filter(|_| tls::closed_under_request(&e))?;
                tls::diagnose(probe, endpoint)
            });
            match refused {
                Some(t) => Failure::Tls(format!("{endpoint}: {t}")),
                None => Failure::Transient {
                    maybe_applied: !never_sent(&e),
                    why: format!("{endpoint}: {what}{e}"),
                },
            }
        };
        let mut response = self
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .header("content-type", "application/json")
            .send(body)
            .map_err(|e| failed("", e))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| failed("read the answer: ", e))?;
        let value: Value =
            serde_json::from_str(text.lines().next().unwrap_or("")).map_err(|e| {
                Failure::Final(format!(
                    "{endpoint}: {path} answered {status} with {text:?} ({e})"
                ))
            })?;
        // A streaming call (keepalive) wraps its answer in "result"; errors carry "error" or
        // "code" with a gRPC status code.
        let value = match value.get("result") {
            Some(r) => r.clone(),
            None => value,
        };
        let err = value
            .get("error")
            .and_then(|e| e.get("message").or(Some(e)))
            .or(value.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        match err {
            Some(message) => {
                let code = value
                    .get("code")
                    .or(value.get("error").and_then(|e| e.get("grpc_code")))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                // 4 DEADLINE_EXCEEDED, 14 UNAVAILABLE: no leader now, a leader change, a
                // timed-out proposal. Another member, or a later try, may succeed. A member
                // without a leader, and raft dropping the proposal, refuse it before it is
                // in the log; a timed-out proposal or a leader change may still commit it.
                if matches!(code, 4 | 14) || message.contains("leader") {
                    let refused_unlogged =
                        message.contains("no leader") || message.contains("proposal dropped");
                    Err(Failure::Transient {
                        why: format!("{endpoint}: {message}"),
                        maybe_applied: !refused_unlogged,
                    })
                } else {
                    Err(Failure::Final(message))
                }
            }
            None if status.is_success() => Ok(value),
            None => Err(Failure::Transient {
                why: format!("{endpoint}: HTTP {status}"),
                maybe_applied: true,
            }),
        }
    }

    /// Posts `body` to `path` on the members in turn until one answers, or the operation's
    /// deadline passes (no request outlives it). A `write` that fails after any copy of it
    /// may have been applied is [`vfio_mig_fence::Error::InDoubt`].
    fn call(&self, step: &str, path: &str, body: &Value, write: bool) -> Result<Value> {
        let body = body.to_string();
        let started = Instant::now();
        let deadline = started + self.operation_timeout;
        let mut last: Vec<String> = Vec::new();
        let mut maybe_applied = false;
        loop {
            let first = self.preferred.load(Ordering::Relaxed);
            last.clear();
            let mut tls_refusals = 0;
            for i in 0..self.endpoints.len() {
                let n = (first + i) % self.endpoints.len();
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.post_once(&self.endpoints[n], path, &body, left.min(REQUEST_TIMEOUT)) {
                    Ok(v) => {
                        self.preferred.store(n, Ordering::Relaxed);
                        return Ok(v);
                    }
                    // A copy sent before may still have been applied.
                    Err(Failure::Final(e)) if write && maybe_applied => {
                        return Err(store_in_doubt(self, step, e))
                    }
                    Err(Failure::Final(e)) => return Err(store_error(self, step, e)),
                    Err(Failure::Transient {
                        why,
                        maybe_applied: maybe,
                    }) => {
                        log::debug!("{step}: {why}");
                        maybe_applied |= maybe;
                        last.push(why);
                    }
                    Err(Failure::Tls(e)) => {
                        log::debug!("{step}: {e}");
                        tls_refusals += 1;
                        last.push(e);
                    }
                }
            }
            if tls_refusals == self.endpoints.len() {
                return Err(store_error(
                    self,
                    step,
                    format!(
                        "every member refused TLS ({}); no device was touched",
                        last.join("; ")
                    ),
                ));
            }
            if started.elapsed() + ROUND_PAUSE >= self.operation_timeout {
                let why = format!(
                    "unreachable for {:.1} s (no member answered with a quorum: {})",
                    started.elapsed().as_secs_f64(),
                    last.join("; ")
                );
                if write && maybe_applied {
                    return Err(store_in_doubt(self, step, why));
                }
                return Err(store_error(
                    self,
                    step,
                    format!("{why}; no device was touched"),
                ));
            }
            std::thread::sleep(ROUND_PAUSE);
        }
    }
}

/// Whether a request failed before any of it could reach a member (no connection, or the
/// TLS handshake failed), so that it certainly was not applied.
fn never_sent(e: &ureq::Error) -> bool {
    use ureq::Timeout;
    match e {
        ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
        ureq::Error::Timeout(t) => matches!(t, Timeout::Resolve | Timeout::Connect),
        ureq::Error::Io(io) => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
        ),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => true,
        _ => false,
    }
}

fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// An int64 of the gateway's JSON: a string, or absent for 0.
fn int(v: Option<&Value>) -> std::result::Result<i64, String> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => s.parse().map_err(|_| format!("bad number {s:?}")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| format!("bad number {n}")),
        Some(other) => Err(format!("bad number {other}")),
    }
}

fn revision(v: Option<&Value>) -> std::result::Result<Revision, String> {
    let n = int(v)?;
    u64::try_from(n).map_err(|_| format!("negative revision {n}"))
}

impl FenceStore for EtcdStore {
    fn describe(&self) -> String {
        format!("{}{}", self.scheme.prefix(), self.endpoints.join(","))
    }

    fn get(&self, key: &str) -> Result<Option<Entry>> {
        let step = "read the fencing store";
        let answer = self.call(
            step,
            "/v3/kv/range",
            &json!({ "key": b64(key.as_bytes()) }),
            false,
        )?;
        let Some(kv) = answer.get("kvs").and_then(|k| k.get(0)) else {
            return Ok(None);
        };
        let parse = || -> std::result::Result<Entry, String> {
            let value = match kv.get("value").and_then(Value::as_str) {
                Some(v) => B64
                    .decode(v)
                    .map_err(|e| format!("bad base64 value: {e}"))?,
                None => Vec::new(),
            };
            Ok(Entry {
                value,
                revision: revision(kv.get("mod_revision"))?,
            })
        };
        parse().map(Some).map_err(|e| store_error(self, step, e))
    }

    fn commit(&self, conditions: &[Condition], writes: &[Write]) -> Result<Option<Revision>> {
        let step = "write the fencing store";
        let compare: Vec<Value> = conditions
            .iter()
            .map(|c| {
                json!({
                    "key": b64(c.key.as_bytes()),
                    "target": "MOD",
                    "result": "EQUAL",
                    "mod_revision": c.revision.to_string(),
                })
            })
            .collect();
        let success: Vec<Value> = writes
            .iter()
            .map(|w| match w {
                Write::Put { key, value, lease } => json!({ "request_put": {
                    "key": b64(key.as_bytes()),
                    "value": b64(value),
                    "lease": lease.map_or(0, |l| l.0).to_string(),
                }}),
                Write::Delete { key } => {
                    json!({ "request_delete_range": { "key": b64(key.as_bytes()) } })
                }
            })
            .collect();
        let answer = self.call(
            step,
            "/v3/kv/txn",
            &json!({ "compare": compare, "success": success }),
            true,
        )?;
        if !answer
            .get("succeeded")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            return Ok(None);
        }
        let rev = revision(answer.get("header").and_then(|h| h.get("revision")))
            .map_err(|e| store_error(self, step, e))?;
        Ok(Some(rev))
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let step = "grant a lease";
        // etcd counts leases in whole seconds.
        let secs = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let answer = self.call(
            step,
            "/v3/lease/grant",
            &json!({ "TTL": secs.to_string() }),
            false,
        )?;
        match int(answer.get("ID")) {
            Ok(id) if id != 0 => Ok(LeaseId(id)),
            Ok(_) => Err(store_error(self, step, format!("no lease id in {answer}"))),
            Err(e) => Err(store_error(self, step, e)),
        }
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<bool> {
        let step = "keep a lease alive";
        let answer = self.call(
            step,
            "/v3/lease/keepalive",
            &json!({ "ID": lease.0.to_string() }),
            false,
        )?;
        // An expired lease is answered with a TTL of 0 (absent in the JSON).
        let ttl = int(answer.get("TTL")).map_err(|e| store_error(self, step, e))?;
        Ok(ttl > 0)
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let step = "revoke a lease";
        match self.call(
            step,
            "/v3/lease/revoke",
            &json!({ "ID": lease.0.to_string() }),
            false,
        ) {
            Err(Error::Refused { detail, .. }) if detail.contains("lease not found") => Ok(()),
            other => other.map(|_| ()),
        }
    }
}
