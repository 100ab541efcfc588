// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The handoff protocol over a [`FenceStore`]: one owner per device-state identity, epochs
//! granted by compare-and-swap, claims under leases. Written once, so every store gives it
//! the same meaning; `docs/fencing.md` describes the model.
//!
//! Per identity `I` the store holds `PREFIX/state/I`, a [`HandoffRecord`], and, while a
//! handoff runs, `PREFIX/claim/I`, a [`ClaimRecord`] bound to its holder's lease.
//!
//! - **Begin** (source, [`SharedFencing::begin`]): only the owner (or anyone, for an identity
//!   never seen) may begin, and only when no other handoff's claim is alive. One transaction,
//!   conditioned on the revisions just read, raises the epoch, records the session as pending
//!   and takes the claim. A retry of a session begun or completed before gets its recorded
//!   epoch and changes nothing.
//! - **Admit** (destination, [`StoreFence`]): only the pending session at its granted epoch;
//!   a completed session is answered ALREADY_COMPLETED by the owner that completed it and
//!   refused by every other host; an older epoch is stale. The destination takes over the
//!   claim, conditioned on the record's revision.
//! - **Complete** (destination, before its device resumes): one transaction, conditioned on
//!   the record and the destination's claim being exactly as admitted, makes the destination
//!   the owner and records the completion at the granted epoch. If anything moved (the claim
//!   expired, a newer handoff began), it fails and the destination resets instead of
//!   resuming.

use std::sync::Arc;
use std::time::Duration;

use super::handoff_record::{valid_name, ClaimRecord, ClaimRole, HandoffRecord, Pending};
use super::lease::HeldLease;
use super::record::{session_hex, Admission};
use super::store::{store_error, Condition, FenceStore, Revision, Write};
use super::Fence;
use crate::error::{Error, ReasonCode, Result};
use vfio_mig::{wire::SessionId, wire::StreamHeader};

/// The default prefix of the store's keys.
pub const DEFAULT_PREFIX: &str = "vfio-mig";
/// The default time to live of a claim's lease.
pub const DEFAULT_CLAIM_TTL: Duration = Duration::from_secs(10);
/// What a destination does besides store operations between COMMIT and its answer: reset
/// its devices and send FAILED.
pub const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// How long a source waits for its destination's answer after COMMIT when both hosts use a
/// shared store whose operations give up after `store_timeout` (`--fence-timeout`, the same
/// on every host), for a handoff of `identities` device states: at least `session_timeout`,
/// and never less than the destination's longest way to its answer: the completion, one
/// read-back per identity, and the withdrawal of a completion whose resume failed, each
/// bounded by `store_timeout`, then the reset. A FAILED is then read, never missed by a
/// source that gave up and stays stopped in doubt.
pub fn source_answer_wait(
    session_timeout: Duration,
    store_timeout: Duration,
    identities: usize,
) -> Duration {
    let calls = u32::try_from(identities.saturating_add(2)).unwrap_or(u32::MAX);
    session_timeout.max(store_timeout.saturating_mul(calls) + ANSWER_MARGIN)
}
/// How often a transaction that lost a race is re-read and retried before giving up.
const ATTEMPTS: usize = 8;

fn refused(code: ReasonCode, step: &str, detail: String) -> Error {
    Error::Refused {
        step: step.to_owned(),
        code,
        detail,
    }
}

/// Handoffs of device states through a shared [`FenceStore`], as owner `owner` (this host).
#[derive(Clone)]
pub struct SharedFencing {
    store: Arc<dyn FenceStore>,
    owner: String,
    ttl: Duration,
    prefix: String,
}

impl std::fmt::Debug for SharedFencing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedFencing")
            .field("store", &self.store.describe())
            .field("owner", &self.owner)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// One identity as read from the store.
#[derive(Debug, Clone)]
struct Snapshot {
    identity: String,
    record: Option<HandoffRecord>,
    record_rev: Revision,
    claim: Option<ClaimRecord>,
    claim_rev: Revision,
}

impl SharedFencing {
    /// Fencing through `store` as owner `owner` (a name every host of the fleet spells the
    /// same way for this host, e.g. its host name). Claims live [`DEFAULT_CLAIM_TTL`] without
    /// renewal; keys start with [`DEFAULT_PREFIX`].
    pub fn new(store: Arc<dyn FenceStore>, owner: impl Into<String>) -> Result<Self> {
        let owner = owner.into();
        if !valid_name(&owner) {
            return Err(Error::invalid_input(format!(
                "fencing owner name {owner:?}: expected 1 to 200 bytes without spaces"
            )));
        }
        Ok(Self {
            store,
            owner,
            ttl: DEFAULT_CLAIM_TTL,
            prefix: DEFAULT_PREFIX.to_owned(),
        })
    }

    /// The same with claims living `ttl` without renewal.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(100));
        self
    }

    /// The same with keys under `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// This host's owner name.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn FenceStore> {
        &self.store
    }

    /// A transaction of any step but the completion: one whose outcome the store cannot tell
    /// ([`Error::InDoubt`]) is a refusal of that step, for nothing was handed over yet (a
    /// begin or a claim left behind ends with its lease). Only the completion decides who
    /// runs a state, so only its doubt is reported as such ([`StoreFence`]).
    fn commit(&self, conditions: &[Condition], writes: &[Write]) -> Result<Option<Revision>> {
        self.store.commit(conditions, writes).map_err(|e| match e {
            Error::InDoubt { step, detail } => Error::Refused {
                step,
                code: ReasonCode::Fence,
                detail,
            },
            other => other,
        })
    }

    fn state_key(&self, identity: &str) -> String {
        format!("{}/state/{identity}", self.prefix)
    }

    fn claim_key(&self, identity: &str) -> String {
        format!("{}/claim/{identity}", self.prefix)
    }

    fn check_identities(identities: &[String]) -> Result<()> {
        if identities.is_empty() {
            return Err(Error::invalid_input("fencing: no device-state identity"));
        }
        for (i, id) in identities.iter().enumerate() {
            if !valid_name(id) {
                return Err(Error::invalid_input(format!(
                    "fencing identity {id:?}: expected 1 to 200 bytes without spaces"
                )));
            }
            if identities[..i].contains(id) {
                return Err(Error::invalid_input(format!(
                    "fencing identity {id} is given twice"
                )));
            }
        }
        Ok(())
    }

    /// The record of `identity`, if the store has one.
    pub fn record(&self, identity: &str) -> Result<Option<HandoffRecord>> {
        Ok(self.read(identity)?.record)
    }

    /// The claim on `identity`, if one is alive.
    pub fn claim(&self, identity: &str) -> Result<Option<ClaimRecord>> {
        Ok(self.read(identity)?.claim)
    }

    fn read(&self, identity: &str) -> Result<Snapshot> {
        let step = "read the fencing record";
        let corrupt = |what: &str, e: String| {
            store_error(
                &*self.store,
                step,
                format!("the {what} of {identity} is corrupt ({e}); refusing its handoffs"),
            )
        };
        let record = self.store.get(&self.state_key(identity))?;
        let claim = self.store.get(&self.claim_key(identity))?;
        let parsed_record = match &record {
            Some(e) => {
                let text = String::from_utf8_lossy(&e.value);
                let r = HandoffRecord::parse(&text).map_err(|e| corrupt("record", e))?;
                if r.identity != identity {
                    return Err(corrupt("record", format!("it names {}", r.identity)));
                }
                Some(r)
            }
            None => None,
        };
        let parsed_claim = match &claim {
            Some(e) => Some(
                ClaimRecord::parse(&String::from_utf8_lossy(&e.value))
                    .map_err(|e| corrupt("claim", e))?,
            ),
            None => None,
        };
        Ok(Snapshot {
            identity: identity.to_owned(),
            record: parsed_record,
            record_rev: record.map_or(0, |e| e.revision),
            claim: parsed_claim,
            claim_rev: claim.map_or(0, |e| e.revision),
        })
    }

    fn read_all(&self, identities: &[String]) -> Result<Vec<Snapshot>> {
        identities.iter().map(|i| self.read(i)).collect()
    }

    fn conditions(&self, snaps: &[Snapshot]) -> Vec<Condition> {
        snaps
            .iter()
            .flat_map(|s| {
                [
                    Condition {
                        key: self.state_key(&s.identity),
                        revision: s.record_rev,
                    },
                    Condition {
                        key: self.claim_key(&s.identity),
                        revision: s.claim_rev,
                    },
                ]
            })
            .collect()
    }

    fn put_record(&self, r: &HandoffRecord) -> Write {
        Write::Put {
            key: self.state_key(&r.identity),
            value: r.to_text().into_bytes(),
            lease: None,
        }
    }

    fn put_claim(&self, identity: &str, claim: &ClaimRecord, lease: &HeldLease) -> Write {
        Write::Put {
            key: self.claim_key(identity),
            value: claim.to_text().into_bytes(),
            lease: Some(lease.id()),
        }
    }

    /// Begins the handoff of session `session` of the states `identities` (one per device
    /// of the stream, in order) from this host, before the source device is touched.
    ///
    /// Refused ([`Error::Refused`]) when this host is not the owner (a stale source: code
    /// [`ReasonCode::StaleEpoch`]), when another handoff's claim is alive
    /// ([`ReasonCode::Busy`]), or when the store cannot be reached. A session begun or
    /// completed before is a retry ([`Handoff::is_retry`]) with its recorded epoch.
    pub fn begin(&self, identities: &[String], session: &SessionId) -> Result<Handoff> {
        Self::check_identities(identities)?;
        let step = "begin the handoff";
        let hex = session_hex(session);
        let mut lease: Option<HeldLease> = None;
        for _ in 0..ATTEMPTS {
            let snaps = self.read_all(identities)?;
            if let Some(epoch) = retried_epoch(&snaps, &hex, step)? {
                return Ok(Handoff {
                    fencing: self.clone(),
                    identities: identities.to_vec(),
                    session: *session,
                    epoch,
                    retry: true,
                    lease: None,
                    claim_rev: 0,
                });
            }
            for s in &snaps {
                check_may_begin(s, &self.owner, step)?;
            }
            let epoch = snaps
                .iter()
                .filter_map(|s| s.record.as_ref().map(|r| r.epoch))
                .max()
                .unwrap_or(0)
                + 1;
            if lease.as_ref().is_none_or(HeldLease::is_lost) {
                lease = Some(HeldLease::grant(self.store.clone(), self.ttl)?);
            }
            let held = lease.as_ref().expect("just granted");
            let claim = ClaimRecord {
                session: hex.clone(),
                role: ClaimRole::Source,
                holder: self.owner.clone(),
            };
            let mut writes = Vec::new();
            for s in &snaps {
                let mut r = s.record.clone().unwrap_or(HandoffRecord {
                    identity: s.identity.clone(),
                    owner: self.owner.clone(),
                    epoch: 0,
                    pending: None,
                    completed: Vec::new(),
                });
                r.epoch = epoch;
                r.pending = Some(Pending {
                    session: hex.clone(),
                    epoch,
                });
                writes.push(self.put_record(&r));
                writes.push(self.put_claim(&s.identity, &claim, held));
            }
            if let Some(rev) = self.commit(&self.conditions(&snaps), &writes)? {
                log::info!(
                    "began handoff {hex} of {} at epoch {epoch} in {}",
                    identities.join(","),
                    self.store.describe()
                );
                return Ok(Handoff {
                    fencing: self.clone(),
                    identities: identities.to_vec(),
                    session: *session,
                    epoch,
                    retry: false,
                    lease,
                    claim_rev: rev,
                });
            }
            // Lost a race: read again; the winner's records decide.
        }
        Err(refused(
            ReasonCode::Busy,
            step,
            format!(
                "{}: lost the race to other handoffs {ATTEMPTS} times in {}; try again",
                identities.join(","),
                self.store.describe()
            ),
        ))
    }

    /// The destination side of handoffs of `identities` (one per device of the stream, in
    /// order) into this host.
    pub fn destination(&self, identities: &[String]) -> Result<StoreFence> {
        Self::check_identities(identities)?;
        Ok(StoreFence {
            fencing: self.clone(),
            identities: identities.to_vec(),
            lease: None,
            admitted: None,
        })
    }
}

/// The recorded epoch of `session` if every identity knows it (pending or completed): the
/// handoff is a retry. An error if only some do.
fn retried_epoch(snaps: &[Snapshot], hex: &str, step: &str) -> Result<Option<u64>> {
    let epochs: Vec<Option<u64>> = snaps
        .iter()
        .map(|s| {
            let r = s.record.as_ref()?;
            r.completion(hex).map(|c| c.epoch).or(r
                .pending
                .as_ref()
                .filter(|p| p.session == hex)
                .map(|p| p.epoch))
        })
        .collect();
    match epochs.as_slice() {
        [Some(e), rest @ ..] if rest.iter().all(|x| *x == Some(*e)) => Ok(Some(*e)),
        all if all.iter().all(Option::is_none) => Ok(None),
        _ => Err(refused(
            ReasonCode::Fence,
            step,
            format!(
                "session {hex} is recorded for some of the devices only, or at different epochs"
            ),
        )),
    }
}

/// Whether this owner may begin a new handoff of `s`.
fn check_may_begin(s: &Snapshot, owner: &str, step: &str) -> Result<()> {
    let Some(r) = &s.record else {
        return Ok(());
    };
    if r.owner != owner {
        return Err(refused(
            ReasonCode::StaleEpoch,
            step,
            format!(
                "{} is owned by {} at epoch {}; {owner} is not its owner (a stale source) and \
                 may not hand it off",
                s.identity, r.owner, r.epoch
            ),
        ));
    }
    if let (Some(p), Some(c)) = (&r.pending, &s.claim) {
        if c.session == p.session {
            return Err(refused(
                ReasonCode::Busy,
                step,
                format!(
                    "{}: handoff {} (epoch {}) is in flight, claimed by {} ({}); retry that \
                     session with --session {}, or wait until its claim's lease expires",
                    s.identity, p.session, p.epoch, c.holder, c.role, p.session
                ),
            ));
        }
    }
    Ok(())
}

/// A handoff begun by this host as its source. Dropping it releases the source's claim; a
/// handoff that failed for sure (the source device runs again) is [`Handoff::abort`]ed.
#[derive(Debug)]
pub struct Handoff {
    fencing: SharedFencing,
    identities: Vec<String>,
    session: SessionId,
    epoch: u64,
    retry: bool,
    lease: Option<HeldLease>,
    claim_rev: Revision,
}

impl Handoff {
    /// The epoch the store granted: the stream header's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The session.
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    /// Whether this handoff was begun (or completed) before: a retry.
    pub fn is_retry(&self) -> bool {
        self.retry
    }

    /// The lease of the source's claim (none for a retry).
    pub fn lease_mut(&mut self) -> Option<&mut HeldLease> {
        self.lease.as_mut()
    }

    /// Ends a handoff that failed for sure (the source runs the state again): the session is
    /// no longer pending and the owner may begin another one. Identities whose record moved
    /// on (a destination completed, another handoff began) are left as they are.
    pub fn abort(mut self) -> Result<()> {
        let f = &self.fencing;
        let hex = session_hex(&self.session);
        for _ in 0..ATTEMPTS {
            let snaps = f.read_all(&self.identities)?;
            let mut conditions = Vec::new();
            let mut writes = Vec::new();
            for s in &snaps {
                let Some(r) = &s.record else { continue };
                if r.pending.as_ref().is_some_and(|p| p.session == hex) && r.owner == f.owner {
                    let mut r = r.clone();
                    r.pending = None;
                    conditions.push(Condition {
                        key: f.state_key(&s.identity),
                        revision: s.record_rev,
                    });
                    writes.push(f.put_record(&r));
                }
                if s.claim_rev == self.claim_rev && self.claim_rev != 0 {
                    conditions.push(Condition {
                        key: f.claim_key(&s.identity),
                        revision: s.claim_rev,
                    });
                    writes.push(Write::Delete {
                        key: f.claim_key(&s.identity),
                    });
                }
            }
            if writes.is_empty() || f.commit(&conditions, &writes)?.is_some() {
                self.lease.take();
                return Ok(());
            }
        }
        Err(refused(
            ReasonCode::Busy,
            "end the failed handoff",
            format!("session {hex}: the records kept changing; it stays pending"),
        ))
    }
}

/// What a destination admitted.
#[derive(Debug, Clone)]
struct Admitted {
    session: String,
    epoch: u64,
    /// The records as admitted (restored by [`Fence::undo_complete`]).
    records: Vec<HandoffRecord>,
    record_revs: Vec<Revision>,
    claim_rev: Revision,
    /// The revision of the completion, once recorded.
    completed_rev: Option<Revision>,
}

/// The [`Fence`] of a destination under a shared store: admits only the handoff the store
/// granted, and completes it in one transaction with the ownership.
#[derive(Debug)]
pub struct StoreFence {
    fencing: SharedFencing,
    identities: Vec<String>,
    lease: Option<HeldLease>,
    admitted: Option<Admitted>,
}

impl StoreFence {
    /// The lease of this destination's claims, once it admitted a stream.
    pub fn lease_mut(&mut self) -> Option<&mut HeldLease> {
        self.lease.as_mut()
    }

    fn decide(&self, snaps: &[Snapshot], header: &StreamHeader) -> Result<Admission> {
        let step = "check the handoff in the fencing store";
        let f = &self.fencing;
        let (hex, e) = (session_hex(&header.session_id), header.epoch);
        let mut done = Vec::new();
        for s in snaps {
            let id = &s.identity;
            let Some(r) = &s.record else {
                return Err(refused(
                    ReasonCode::Fence,
                    step,
                    format!(
                        "{id}: {} has no record of it; session {hex} (epoch {e}) was not \
                         begun through this store (send it with the same --fence)",
                        f.store.describe()
                    ),
                ));
            };
            if let Some(c) = r.completion(&hex) {
                if c.by != f.owner {
                    return Err(refused(
                        ReasonCode::Fence,
                        step,
                        format!(
                            "{id}: session {hex} was completed by {} at epoch {}: {} runs \
                             that state, so {} does not load it",
                            c.by, c.epoch, c.by, f.owner
                        ),
                    ));
                }
                done.push(true);
                continue;
            }
            done.push(false);
            if e < r.epoch {
                return Err(refused(
                    ReasonCode::StaleEpoch,
                    step,
                    format!(
                        "{id}: stale epoch {e} < {} (owner {}): session {hex} is older than \
                         the last handoff the store granted",
                        r.epoch, r.owner
                    ),
                ));
            }
            match &r.pending {
                Some(p) if p.session == hex && p.epoch == e => {}
                p => {
                    let now = p.as_ref().map_or("none".to_owned(), |p| {
                        format!("session {} at epoch {}", p.session, p.epoch)
                    });
                    return Err(refused(
                        ReasonCode::Fence,
                        step,
                        format!(
                            "{id}: session {hex} at epoch {e} is not the handoff the store \
                             granted (pending: {now}; owner {})",
                            r.owner
                        ),
                    ));
                }
            }
            if let Some(c) = &s.claim {
                if c.session == hex && c.role == ClaimRole::Destination && c.holder != f.owner {
                    return Err(refused(
                        ReasonCode::Busy,
                        step,
                        format!(
                            "{id}: session {hex} is being loaded by {} (its claim holds until \
                             its lease expires)",
                            c.holder
                        ),
                    ));
                }
            }
        }
        if done.iter().all(|d| *d) {
            Ok(Admission::AlreadyCompleted)
        } else if done.iter().any(|d| *d) {
            Err(refused(
                ReasonCode::Fence,
                step,
                format!("session {hex} was completed for some of the devices only"),
            ))
        } else {
            Ok(Admission::Accept)
        }
    }

    fn lease(&mut self) -> Result<&HeldLease> {
        if self.lease.as_ref().is_none_or(HeldLease::is_lost) {
            self.lease = Some(HeldLease::grant(
                self.fencing.store.clone(),
                self.fencing.ttl,
            )?);
        }
        Ok(self.lease.as_ref().expect("just granted"))
    }

    fn not_admitted(&self, session: &SessionId) -> Error {
        refused(
            ReasonCode::Fence,
            "record the handoff",
            format!("session {} was not admitted", session_hex(session)),
        )
    }
}

impl Fence for StoreFence {
    fn admit(&mut self, header: &StreamHeader) -> Result<Admission> {
        if header.devices.len() != self.identities.len() {
            return Err(Error::invalid_input(format!(
                "fencing: the stream carries {} devices and {} identities were given",
                header.devices.len(),
                self.identities.len()
            )));
        }
        let hex = session_hex(&header.session_id);
        self.admitted = None;
        for _ in 0..ATTEMPTS {
            let f = self.fencing.clone();
            let snaps = f.read_all(&self.identities)?;
            if self.decide(&snaps, header)? == Admission::AlreadyCompleted {
                return Ok(Admission::AlreadyCompleted);
            }
            let claim = ClaimRecord {
                session: hex.clone(),
                role: ClaimRole::Destination,
                holder: f.owner.clone(),
            };
            let lease = self.lease()?;
            let writes: Vec<Write> = snaps
                .iter()
                .map(|s| f.put_claim(&s.identity, &claim, lease))
                .collect();
            if let Some(rev) = f.commit(&f.conditions(&snaps), &writes)? {
                self.admitted = Some(Admitted {
                    session: hex,
                    epoch: header.epoch,
                    records: snaps.iter().filter_map(|s| s.record.clone()).collect(),
                    record_revs: snaps.iter().map(|s| s.record_rev).collect(),
                    claim_rev: rev,
                    completed_rev: None,
                });
                return Ok(Admission::Accept);
            }
        }
        Err(refused(
            ReasonCode::Busy,
            "claim the handoff",
            format!("session {hex}: lost the race to other hosts {ATTEMPTS} times; try again"),
        ))
    }

    fn complete(&mut self, session: &SessionId) -> Result<()> {
        let f = self.fencing.clone();
        let a = match &self.admitted {
            Some(a) if a.session == session_hex(session) => a.clone(),
            _ => return Err(self.not_admitted(session)),
        };
        let mut conditions = Vec::new();
        let mut writes = Vec::new();
        for (r, rev) in a.records.iter().zip(&a.record_revs) {
            let mut done = r.clone();
            done.complete(&a.session, a.epoch, &f.owner);
            conditions.push(Condition {
                key: f.state_key(&r.identity),
                revision: *rev,
            });
            conditions.push(Condition {
                key: f.claim_key(&r.identity),
                revision: a.claim_rev,
            });
            writes.push(f.put_record(&done));
            writes.push(Write::Delete {
                key: f.claim_key(&r.identity),
            });
        }
        let committed = match f.store.commit(&conditions, &writes) {
            Ok(Some(rev)) => Some(rev),
            // A condition failed, maybe because of an earlier copy whose answer was lost, or
            // no answer came at all: what the store holds decides.
            Ok(None) | Err(Error::InDoubt { .. }) => self.read_back_completion(&a)?,
            // Nothing was written.
            Err(e) => return Err(e),
        };
        match committed {
            Some(rev) => {
                if let Some(adm) = self.admitted.as_mut() {
                    adm.completed_rev = Some(rev);
                }
                Ok(())
            }
            None => Err(refused(
                ReasonCode::Fence,
                "record the handoff complete",
                format!(
                    "{}: session {} could not be recorded complete in {}: the claim was lost \
                     (its lease expired, or another handoff began); the device is not resumed",
                    self.identities.join(","),
                    a.session,
                    f.store.describe()
                ),
            )),
        }
    }

    fn undo_complete(&mut self, session: &SessionId) -> Result<()> {
        let f = self.fencing.clone();
        let Some(a) = self
            .admitted
            .clone()
            .filter(|a| a.session == session_hex(session))
        else {
            return Err(self.not_admitted(session));
        };
        let Some(rev) = a.completed_rev else {
            return Ok(());
        };
        let conditions: Vec<Condition> = a
            .records
            .iter()
            .map(|r| Condition {
                key: f.state_key(&r.identity),
                revision: rev,
            })
            .collect();
        // The state goes back to its source, still pending: a retry may load it again.
        let writes: Vec<Write> = a.records.iter().map(|r| f.put_record(r)).collect();
        if f.commit(&conditions, &writes)?.is_none() {
            return Err(refused(
                ReasonCode::Fence,
                "withdraw the completion",
                format!("session {}: the records moved on since", a.session),
            ));
        }
        if let Some(adm) = self.admitted.as_mut() {
            adm.completed_rev = None;
        }
        Ok(())
    }

    fn release(&mut self, session: &SessionId) -> Result<()> {
        let f = self.fencing.clone();
        let Some(a) = self
            .admitted
            .take()
            .filter(|a| a.session == session_hex(session) && a.completed_rev.is_none())
        else {
            return Ok(());
        };
        let conditions: Vec<Condition> = self
            .identities
            .iter()
            .map(|i| Condition {
                key: f.claim_key(i),
                revision: a.claim_rev,
            })
            .collect();
        let writes: Vec<Write> = self
            .identities
            .iter()
            .map(|i| Write::Delete {
                key: f.claim_key(i),
            })
            .collect();
        f.commit(&conditions, &writes)?;
        Ok(())
    }
}

impl StoreFence {
    /// [`Self::recorded_completion`] after a completion whose answer is unknown: a store
    /// that cannot be read leaves the completion in doubt ([`Error::InDoubt`]), for the
    /// device must neither resume nor let its source run again.
    fn read_back_completion(&self, a: &Admitted) -> Result<Option<Revision>> {
        self.recorded_completion(a).map_err(|e| Error::InDoubt {
            step: "record the handoff complete".into(),
            detail: format!(
                "{}: {} did not say whether session {} was recorded complete, and reading \
                 it back failed ({e})",
                self.identities.join(","),
                self.fencing.store.describe(),
                a.session
            ),
        })
    }

    /// The revision of a completion of `a` by this host already in the store, if there is one.
    fn recorded_completion(&self, a: &Admitted) -> Result<Option<Revision>> {
        let f = &self.fencing;
        let mut rev = None;
        for id in &self.identities {
            let s = f.read(id)?;
            let done = s
                .record
                .as_ref()
                .and_then(|r| r.completion(&a.session))
                .is_some_and(|c| c.by == f.owner);
            if !done {
                return Ok(None);
            }
            rev = Some(s.record_rev);
        }
        Ok(rev)
    }
}
