// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The stores the scenarios run on: the local directory and a 3-member etcd cluster.

#![allow(dead_code)]

mod cluster;
mod proxy;

use std::sync::Arc;

// Each test crate uses part of this module (`Pki`: tests/tls.rs).
#[allow(unused_imports)]
pub use cluster::{EtcdCluster, Pki};
#[allow(unused_imports)]
pub use proxy::LossyRelays;
use vfio_mig_etcd::EtcdStore;
use vfio_mig_fence::{DirStore, FenceStore, SharedFencing};

/// A store a scenario runs on, and what keeps it alive.
pub struct TestStore {
    /// `dir` or `etcd` (over TLS).
    pub kind: &'static str,
    /// Makes a new client of the store (as another host or process would have).
    pub connect: Box<dyn Fn() -> Arc<dyn FenceStore>>,
    /// The cluster, for an etcd store.
    pub cluster: Option<EtcdCluster>,
    _dir: Option<tempfile::TempDir>,
}

impl TestStore {
    /// The local directory store, in a fresh directory.
    pub fn dir() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        TestStore {
            kind: "dir",
            connect: Box::new(move || Arc::new(DirStore::new(&path))),
            cluster: None,
            _dir: Some(dir),
        }
    }

    /// A fresh 3-member etcd cluster over mutual TLS (`None` when etcd is missing and not
    /// required).
    pub fn etcd() -> Option<Self> {
        let cluster = EtcdCluster::start()?;
        let (url, security) = (cluster.url(), cluster.security());
        Some(TestStore {
            kind: "etcd",
            connect: Box::new(move || Arc::new(EtcdStore::from_url(&url, &security).unwrap())),
            cluster: Some(cluster),
            _dir: None,
        })
    }

    /// Both stores (the etcd one when available).
    pub fn all() -> Vec<Self> {
        let mut v = vec![Self::dir()];
        v.extend(Self::etcd());
        v
    }

    /// Fencing as owner `owner`, through a client of its own.
    pub fn host(&self, owner: &str) -> SharedFencing {
        SharedFencing::new((self.connect)(), owner).unwrap()
    }
}
