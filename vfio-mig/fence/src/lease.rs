// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A lease held for as long as a claim is: a thread renews it every third of its time to
//! live, and dropping it revokes it, so a claim ends when its holder ends (at once) or dies
//! (after the time to live).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::store::{FenceStore, LeaseId};
use crate::error::Result;

/// A lease of a [`FenceStore`], renewed by a keep-alive thread until dropped.
pub struct HeldLease {
    id: LeaseId,
    store: Arc<dyn FenceStore>,
    lost: Arc<AtomicBool>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for HeldLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLease")
            .field("id", &self.id)
            .field("lost", &self.is_lost())
            .finish()
    }
}

impl HeldLease {
    /// Grants a lease of `ttl` and starts renewing it.
    pub fn grant(store: Arc<dyn FenceStore>, ttl: Duration) -> Result<Self> {
        let id = store.grant_lease(ttl)?;
        let lost = Arc::new(AtomicBool::new(false));
        let (stop, stopped) = mpsc::channel::<()>();
        let period = (ttl / 3).max(Duration::from_millis(50));
        let thread = {
            let (store, lost) = (store.clone(), lost.clone());
            std::thread::Builder::new()
                .name(format!("lease-{id}"))
                .spawn(move || loop {
                    match stopped.recv_timeout(period) {
                        Err(RecvTimeoutError::Timeout) => {}
                        // Stopped, or the lease was dropped.
                        _ => return,
                    }
                    match store.keep_alive(id) {
                        Ok(true) => {}
                        Ok(false) => {
                            log::warn!("lease {id} of {} expired", store.describe());
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        // Unreachable for now: try again; the lease expires if it stays so.
                        Err(e) => log::warn!("keep lease {id} alive: {e}"),
                    }
                })
                .ok()
        };
        if thread.is_none() {
            let _ = store.revoke_lease(id);
            return Err(super::store::store_error(
                &*store,
                "keep a lease alive",
                "cannot start the keep-alive thread",
            ));
        }
        Ok(Self {
            id,
            store,
            lost,
            stop: Some(stop),
            thread,
        })
    }

    /// The lease.
    pub fn id(&self) -> LeaseId {
        self.id
    }

    /// Whether a renewal found the lease expired.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stops renewing the lease without revoking it: it expires after its time to live, as
    /// the lease of a host that died or lost the store would. For tests of expiry.
    pub fn stop_keep_alive(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let renewing = self.thread.is_some();
        self.stop_keep_alive();
        if renewing {
            if let Err(e) = self.store.revoke_lease(self.id) {
                log::warn!("revoke lease {}: {e} (it expires by itself)", self.id);
            }
        }
    }
}
