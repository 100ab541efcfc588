// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A relay between `send` and `recv` that can partition the network: it forwards every
//! connection (channels too) both ways until cut, then holds what it read and forwards
//! nothing in either direction, closing nothing, for a while (then it forwards again, as a
//! link that comes back after TCP's retransmissions) or for good (until the run ends).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The link's state, shared by the relay's threads.
#[derive(Default)]
struct Link {
    /// Cut until then (`Some(None)`: for good).
    cut: Mutex<Option<Option<Instant>>>,
    /// Told when the link is healed or the relay ends.
    changed: Condvar,
    /// The run ended: every thread lets go.
    ended: Mutex<bool>,
}

impl Link {
    /// Waits while the link is cut; false once the relay ended.
    fn pass(&self) -> bool {
        let mut cut = self.cut.lock().unwrap();
        loop {
            if *self.ended.lock().unwrap() {
                return false;
            }
            match *cut {
                None => return true,
                Some(Some(until)) if Instant::now() >= until => {
                    *cut = None;
                    return true;
                }
                Some(Some(until)) => {
                    let left = until.saturating_duration_since(Instant::now());
                    cut = self.changed.wait_timeout(cut, left).unwrap().0;
                }
                Some(None) => cut = self.changed.wait(cut).unwrap(),
            }
        }
    }
}

/// One direction's socket, Unix or TCP.
enum Socket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Socket {
    fn try_clone(&self) -> std::io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Socket::Unix(s) => s.write_all(buf),
            Socket::Tcp(s) => s.write_all(buf),
        }
    }

    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(how),
            Socket::Tcp(s) => s.shutdown(how),
        };
    }
}

/// A running relay in front of a `recv`.
pub struct Relay {
    /// The address `send` is given.
    pub addr: String,
    link: Arc<Link>,
    unix_path: Option<PathBuf>,
}

impl Relay {
    /// Listens beside `target` (`unix:PATH` or `tcp:HOST:PORT`, what `recv` printed) and
    /// forwards every connection to it.
    pub fn start(target: &str, dir: &std::path::Path) -> Relay {
        let link = Arc::new(Link::default());
        let (addr, unix_path) = match target.strip_prefix("unix:") {
            Some(path) => {
                let path = PathBuf::from(path);
                let mine = dir.join("relay.sock");
                let listener = UnixListener::bind(&mine).unwrap();
                let mine_path = mine.clone();
                let link = link.clone();
                std::thread::spawn(move || {
                    for c in listener.incoming() {
                        let (Ok(c), Ok(up)) = (c, UnixStream::connect(&path)) else {
                            continue;
                        };
                        forward(Socket::Unix(c), Socket::Unix(up), &link);
                    }
                });
                (format!("unix:{}", mine_path.display()), Some(mine))
            }
            None => {
                let to = target
                    .strip_prefix("tcp:")
                    .expect("a tcp: or unix: address");
                let to = to.to_owned();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = listener.local_addr().unwrap().port();
                let link = link.clone();
                std::thread::spawn(move || {
                    for c in listener.incoming() {
                        let (Ok(c), Ok(up)) = (c, TcpStream::connect(&to)) else {
                            continue;
                        };
                        forward(Socket::Tcp(c), Socket::Tcp(up), &link);
                    }
                });
                (format!("tcp:127.0.0.1:{port}"), None)
            }
        };
        Relay {
            addr,
            link,
            unix_path,
        }
    }

    /// Cuts the link: for `heal_after`, or for good.
    pub fn cut(&self, heal_after: Option<Duration>) {
        *self.link.cut.lock().unwrap() = Some(heal_after.map(|d| Instant::now() + d));
        self.link.changed.notify_all();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        *self.link.ended.lock().unwrap() = true;
        // Under the lock a waiting pump checks `ended` with: it cannot miss this wake-up.
        let _cut = self.link.cut.lock().unwrap();
        self.link.changed.notify_all();
        // The accept thread stays blocked on a listener nobody connects to again.
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Forwards `a` and `b` to each other, each direction on its own thread.
fn forward(a: Socket, b: Socket, link: &Arc<Link>) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    for (from, to) in [(a, b2), (b, a2)] {
        let link = link.clone();
        std::thread::spawn(move || pump(from, to, &link));
    }
}

/// Copies `from` to `to` while the link passes; closes both when `from` ends (once the link
/// passes) or the relay does.
fn pump(mut from: Socket, mut to: Socket, link: &Link) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !link.pass() {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                // A close crosses a cut link only once it heals (or the run ends).
                link.pass();
                break;
            }
            Ok(n) => n,
        };
        // What was read during a cut waits for the link to heal, as on a real link.
        if !link.pass() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    from.shutdown(Shutdown::Both);
    to.shutdown(Shutdown::Both);
}
