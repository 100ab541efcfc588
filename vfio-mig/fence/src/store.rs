// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The interface of a fencing store: a small linearizable key-value store with
//! compare-and-swap transactions over several keys and keys bound to leases.
//!
//! This is the part of etcd v3 the handoff protocol ([`super::shared`]) needs, and nothing
//! more, so that the protocol is written once and every store gives it the same meaning:
//! [`super::DirStore`] (one host, a directory, embedded) and the etcd store of the
//! `vfio-mig-etcd` crate (a fleet).

use std::fmt;
use std::time::Duration;

use crate::error::{Error, ReasonCode, Result};

/// A key's modification revision: a number the store raises on every write, so that a
/// transaction can require that a key has not changed since it was read. `0` means "the key
/// does not exist" (etcd's convention).
pub type Revision = u64;

/// A lease: a time to live after which every key bound to it is deleted, unless it is kept
/// alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key's value and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value.
    pub value: Vec<u8>,
    /// The revision of the write that stored it.
    pub revision: Revision,
}

/// A condition of a transaction: `key` has modification revision `revision` (`0`: does not
/// exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// The key.
    pub key: String,
    /// The revision it must have.
    pub revision: Revision,
}

/// A write of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Stores `value` at `key`, bound to `lease` if given (deleted when it expires).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key lives under.
        lease: Option<LeaseId>,
    },
    /// Deletes `key` (nothing if it does not exist).
    Delete {
        /// The key.
        key: String,
    },
}

/// A linearizable store of fencing records.
///
/// Every method either answers from the store's current committed state or fails: a store
/// that cannot reach a quorum returns an error (never a stale read), and the caller refuses
/// the handoff before any device is touched.
pub trait FenceStore: Send + Sync {
    /// The store, for messages (`etcd://127.0.0.1:2379,...`, `dir:/var/lib/vfio-mig/store`).
    fn describe(&self) -> String;

    /// The value of `key`, if it exists (a key whose lease expired does not).
    fn get(&self, key: &str) -> Result<Option<Entry>>;

    /// Applies `writes` atomically if every condition holds, and returns the revision of
    /// those writes (`Some`), or `None` if a condition failed (nothing was written by this
    /// answer; a copy sent before, whose answer was lost, may have been).
    ///
    /// An error is [`Error::InDoubt`] (from [`store_in_doubt`]) when a request carrying the
    /// writes may have been applied and its answer never arrived; any other error means
    /// that nothing was written.
    fn commit(&self, conditions: &[Condition], writes: &[Write]) -> Result<Option<Revision>>;

    /// Grants a lease of `ttl`.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renews `lease` for its whole time to live; `false` if it already expired (its keys
    /// are gone).
    fn keep_alive(&self, lease: LeaseId) -> Result<bool>;

    /// Ends `lease` now and deletes its keys (nothing if it already expired).
    fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
}

/// A write of `store` at `step` whose outcome is unknown: it may have been applied.
pub fn store_in_doubt(store: &dyn FenceStore, step: &str, detail: impl fmt::Display) -> Error {
    Error::InDoubt {
        step: step.to_owned(),
        detail: format!(
            "fencing store {}: {detail}; the write may have been applied",
            store.describe()
        ),
    }
}

/// An error of `store` at `step`: the store could not be read or written. A fencing decision
/// that cannot be made is a refusal.
pub fn store_error(store: &dyn FenceStore, step: &str, detail: impl fmt::Display) -> Error {
    Error::Refused {
        step: step.to_owned(),
        code: ReasonCode::Fence,
        detail: format!("fencing store {}: {detail}", store.describe()),
    }
}
