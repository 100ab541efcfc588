// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A `vfio-mig` process of a soak run: its output collected while it runs, signals sent to
//! it by pid while it is not yet reaped (so the pid cannot have been reused), and its end
//! awaited within a bound.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running process.
pub struct Proc {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Option<JoinHandle<()>>,
    lines: mpsc::Receiver<String>,
    /// The signals the soak sent it.
    pub sent: Vec<i32>,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Ended {
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
    /// The signals the soak sent it.
    pub sent: Vec<i32>,
    /// When the soak saw it exit (within 10 ms).
    pub ended_at: Instant,
}

impl Ended {
    /// Its exit code, or 128 + the signal that killed it.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }

    /// The session id `send` printed on stderr before it connected (`vfio-mig: send: session
    /// HEX, ...`, or `save:` for `file:`).
    pub fn printed_session(&self) -> Option<String> {
        let at = self.stderr.find(": session ")? + ": session ".len();
        self.stderr.get(at..at + 32).map(str::to_owned)
    }

    /// Whether the soak's SIGKILL ended it.
    pub fn killed(&self) -> bool {
        self.status.signal() == Some(libc::SIGKILL) && self.sent.contains(&libc::SIGKILL)
    }
}

impl Proc {
    /// Spawns `cmd` with its output piped.
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vfio-mig");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            text
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let collected = Arc::clone(&stderr);
        let stderr_done = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                collected.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            stdout: Some(stdout),
            stderr,
            stderr_done: Some(stderr_done),
            lines,
            sent: Vec::new(),
        }
    }

    /// Waits (at most `limit`) for a stderr line starting with `prefix`; returns the rest.
    pub fn wait_line(&self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return Some(rest.to_owned());
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits (at most `limit`) for a stderr line containing `text`, one printed before
    /// included.
    pub fn wait_text(&self, text: &str, limit: Duration) -> bool {
        if self.printed(text) {
            return true;
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(text) => return true,
                Ok(_) => {}
                Err(_) => return self.printed(text),
            }
        }
    }

    /// Whether a stderr line so far contains `text`.
    pub fn printed(&self, text: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|l| l.contains(text))
    }

    /// Sends `signal` (the process is not reaped before [`Proc::wait`], so its pid is still
    /// its own, a zombie at worst, which ignores it).
    pub fn signal(&mut self, signal: i32) {
        // SAFETY: kill(2) on our own unreaped child; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.sent.push(signal);
    }

    /// Whether it has exited (without reaping it).
    pub fn exited(&self) -> bool {
        // SAFETY: siginfo_t is plain data, for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid(2) with WNOWAIT on our own child fills `info` and reaps nothing;
        // `info` is a valid, writable siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read once waitid returned 0 (0 when nothing exited).
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    /// Waits until it exits (`Ok`) or `limit` passes (`Err`: it hung, and was killed).
    pub fn wait(mut self, limit: Duration) -> Result<Ended, Ended> {
        let deadline = Instant::now() + limit;
        let mut hung = false;
        while !self.exited() {
            if Instant::now() >= deadline {
                hung = true;
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ended_at = Instant::now();
        let status = self.child.wait().expect("wait for vfio-mig");
        let stdout = self.stdout.take().unwrap().join().unwrap();
        self.stderr_done.take().unwrap().join().unwrap();
        let stderr = self.stderr.lock().unwrap().join("\n");
        let ended = Ended {
            status,
            stdout,
            stderr,
            sent: std::mem::take(&mut self.sent),
            ended_at,
        };
        if hung {
            Err(ended)
        } else {
            Ok(ended)
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
