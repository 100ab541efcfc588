// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A TCP relay in front of an etcd member that can lose the member's answers: requests still
//! reach the member (and are applied), but nothing it answers reaches the client. This is a
//! network that fails between a request and its answer, the case a store cannot decide on.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Relays for every member of a cluster, sharing one switch.
pub struct LossyRelays {
    /// The relays' addresses (`127.0.0.1:PORT`), in member order.
    pub endpoints: Vec<String>,
    lose_answers: Arc<AtomicBool>,
}

impl LossyRelays {
    /// Starts one relay per member address (`HOST:PORT`).
    pub fn start(members: &[String]) -> Self {
        let lose_answers = Arc::new(AtomicBool::new(false));
        let endpoints = members
            .iter()
            .map(|member| {
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let endpoint = listener.local_addr().unwrap().to_string();
                let (member, lose) = (member.clone(), lose_answers.clone());
                std::thread::spawn(move || {
                    for client in listener.incoming().flatten() {
                        let Ok(upstream) = TcpStream::connect(&member) else {
                            continue;
                        };
                        relay(client, upstream, lose.clone());
                    }
                });
                endpoint
            })
            .collect();
        Self {
            endpoints,
            lose_answers,
        }
    }

    /// From now on every answer (on open connections and new ones) is lost.
    pub fn lose_answers(&self) {
        self.lose_answers.store(true, Ordering::SeqCst);
    }
}

fn relay(client: TcpStream, upstream: TcpStream, lose: Arc<AtomicBool>) {
    let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    std::thread::spawn(move || pump(client, upstream, None));
    std::thread::spawn(move || pump(u2, c2, Some(lose)));
}

/// Copies `from` to `to` until either ends; with `lose` set, what is read is dropped.
fn pump(mut from: TcpStream, mut to: TcpStream, lose: Option<Arc<AtomicBool>>) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if lose.as_ref().is_some_and(|l| l.load(Ordering::SeqCst)) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
