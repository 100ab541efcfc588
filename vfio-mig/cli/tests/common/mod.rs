// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers of the command-line tests: private lock and state directories, a running `recv`,
//! a test PKI (vfio-mig-testcerts).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use vfio_mig_testcerts::{Ca, Usage};

pub const BIN: &str = env!("CARGO_BIN_EXE_vfio-mig");

/// A private lock and state directory for one test.
pub struct Dirs {
    pub tmp: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// `vfio-mig` with this test's lock and state directories, and an empty configuration
    /// file (a host's /etc/vfio-mig/config.toml must not reach the tests).
    pub fn cmd(&self, prefix: &[&str]) -> Command {
        let (program, pre) = match prefix.split_first() {
            Some((p, rest)) => (*p, rest.to_vec()),
            None => (BIN, Vec::new()),
        };
        let mut c = Command::new(program);
        c.args(pre)
            .env_remove("RUST_LOG")
            .env("VFIO_MIG_LOCK_DIR", self.path("lock"))
            .env("VFIO_MIG_STATE_DIR", self.path("state"))
            .env("VFIO_MIG_CONFIG", "/dev/null");
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(&[]).args(args).output().expect("run vfio-mig")
    }
}

/// A running `recv`, its address known once it printed "listening on ADDR".
pub struct Recv {
    pub child: Child,
    pub addr: String,
    pub lines: mpsc::Receiver<String>,
    pub stdout: std::process::ChildStdout,
}

impl Recv {
    /// Starts `[prefix...] vfio-mig recv ARGS` and waits for its "listening on" line.
    pub fn start(dirs: &Dirs, prefix: &[&str], args: &[&str]) -> Self {
        let mut cmd = dirs.cmd(prefix);
        if !prefix.is_empty() {
            cmd.arg(BIN);
        }
        let mut child = cmd
            .arg("recv")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn recv");
        let stderr = child.stderr.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut seen = Vec::new();
        while addr.is_none() {
            match lines.recv_timeout(Duration::from_secs(20)) {
                Ok(l) => {
                    if let Some(a) = l.strip_prefix("vfio-mig: recv: listening on ") {
                        addr = Some(a.to_owned());
                    }
                    seen.push(l);
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("recv never listened: {seen:?}");
                }
            }
        }
        Self {
            child,
            addr: addr.unwrap(),
            lines,
            stdout,
        }
    }

    /// Waits for the exit: status, stdout, the stderr lines after "listening on".
    pub fn wait(mut self) -> (ExitStatus, String, String) {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut out).unwrap();
        let status = self.child.wait().unwrap();
        let err: Vec<String> = self.lines.iter().collect();
        (status, out, err.join("\n"))
    }
}

impl Drop for Recv {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failure: non-zero exit, one `error:` line containing `expect`, no panic.
pub fn assert_clean_failure(status: ExitStatus, err: &str, expect: &str) -> String {
    assert!(!status.success(), "expected failure: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].contains(expect), "{expect:?} expected: {err}");
    lines[0].to_owned()
}

impl Recv {
    /// Waits (at most 30 s) for a stderr line containing `text`; returns it.
    pub fn wait_line(&self, text: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(30)) {
                Ok(l) if l.contains(text) => return l,
                Ok(l) => seen.push(l),
                Err(_) => panic!("recv never printed {text:?}: {seen:?}"),
            }
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// The files of one side's identity: its certificate and key, and the CA it trusts.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Leaf {
    /// A certificate of `issuer` for DNS name `dns` (CN the same), trusting `trust`.
    fn new(issuer: &Ca, dir: &Path, dns: &str, usage: Usage, trust: &Ca) -> Leaf {
        let minted = issuer.leaf(dir, dns, &[dns], usage).unwrap();
        Leaf {
            cert: minted.cert,
            key: minted.key,
            ca: trust.pem().to_owned(),
        }
    }

    /// `--tls-cert C --tls-key K --tls-ca A`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

/// A test PKI: the destination `dst.example`, the sources `src.example` (allowed) and
/// `other.example`, and `rogue.example` signed by a CA nobody trusts.
pub struct Pki {
    pub dst: Leaf,
    pub src: Leaf,
    pub other: Leaf,
    pub rogue: Leaf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::new(dir, "test-ca").unwrap();
        let rogue_ca = Ca::new(dir, "rogue-ca").unwrap();
        Pki {
            dst: Leaf::new(&ca, dir, "dst.example", Usage::Server, &ca),
            src: Leaf::new(&ca, dir, "src.example", Usage::Client, &ca),
            other: Leaf::new(&ca, dir, "other.example", Usage::Client, &ca),
            rogue: Leaf::new(&rogue_ca, dir, "rogue.example", Usage::Client, &ca),
        }
    }
}

/// A child whose standard error (or output) is a pipe filled to capacity before it started:
/// its first write there blocks until [`HeldOutput::release`] drains the pipe. It holds a
/// command at its first stderr line (`save`: after the device is claimed, before it is
/// touched), or at its JSON on stdout (after the command completed), without sleeps.
pub struct HeldOutput {
    pub child: Child,
    reader: std::fs::File,
    fd: u8,
}

impl HeldOutput {
    /// Spawns `cmd` with the full pipe as its stderr (stdout as `cmd` has it).
    pub fn stderr(cmd: Command) -> Self {
        Self::spawn(cmd, 2)
    }

    /// Spawns `cmd` with the full pipe as its stdout (stderr as `cmd` has it).
    pub fn stdout(cmd: Command) -> Self {
        Self::spawn(cmd, 1)
    }

    fn spawn(mut cmd: Command, fd: u8) -> Self {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        // Close-on-exec: children of tests running alongside must not hold it.
        let (reader, writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        fcntl(&writer, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        let block = [b'#'; 4096];
        loop {
            match nix::unistd::write(&writer, &block) {
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("fill the pipe: {e}"),
            }
        }
        // A byte at a time until not even one fits.
        while nix::unistd::write(&writer, b"#").is_ok() {}
        fcntl(&writer, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        if fd == 2 {
            cmd.stderr(Stdio::from(writer));
        } else {
            cmd.stdout(Stdio::from(writer));
        }
        Self {
            child: cmd.spawn().unwrap(),
            reader: reader.into(),
            fd,
        }
    }

    /// Waits until the child's main thread is blocked writing to the held pipe, as
    /// /proc/PID/syscall shows (x86-64 write is syscall 1; aarch64 64).
    pub fn wait_blocked(&mut self) {
        let path = format!("/proc/{}/syscall", self.child.id());
        let write = if cfg!(target_arch = "aarch64") {
            "64"
        } else {
            "1"
        };
        let fd = format!("0x{}", self.fd);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the child ended ({status}) before it wrote to fd {}",
                    self.fd
                );
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let fields: Vec<&str> = text.split_whitespace().collect();
            if fields.len() > 1 && fields[0] == write && fields[1] == fd {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the child never blocked on fd {}: {text}",
                self.fd
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Drains the pipe, lets the child run to its end: its status and what it wrote to the
    /// held pipe (without the filler).
    pub fn release(mut self) -> (ExitStatus, String) {
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut self.reader, &mut all).unwrap();
        let status = self.child.wait().unwrap();
        let text = String::from_utf8_lossy(&all);
        (status, text.trim_start_matches('#').to_owned())
    }
}

/// Sends `signal` to a child of the test.
pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid of a child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// A one-device v1 stream header (what a raw client sends after HELLO).
pub fn header_bytes(session: u8, epoch: u64) -> Vec<u8> {
    vfio_mig::wire::StreamHeader {
        session_id: [session; 16],
        epoch,
        devices: vec![vfio_mig::wire::DeviceDescriptor {
            protocol: vfio_mig::Protocol::V1,
            live: false,
            migration_flags: 0,
            model: "mock:v1".into(),
        }],
    }
    .encode()
    .unwrap()
}

/// A two-device v1 unit header of `session`, epoch 1 (each channel's sub-stream header over
/// two channels is then [`header_bytes`]`(session, 1)`).
pub fn unit_header_bytes(session: u8) -> Vec<u8> {
    let device = vfio_mig::wire::DeviceDescriptor {
        protocol: vfio_mig::Protocol::V1,
        live: false,
        migration_flags: 0,
        model: "mock:v1".into(),
    };
    vfio_mig::wire::StreamHeader {
        session_id: [session; 16],
        epoch: 1,
        devices: vec![device.clone(), device],
    }
    .encode()
    .unwrap()
}

/// The record header of a 1 MiB DATA fragment of device 0 (docs/stream-format.md,
/// "Records"), for a test that then sends its payload slowly: its CRC is never reached.
pub fn data_record_header() -> Vec<u8> {
    let mut record = vec![1u8, 1, 0, 0, 2, 0, 0, 0];
    record.extend_from_slice(&0u64.to_le_bytes());
    record.extend_from_slice(&(1u32 << 20).to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    record
}

/// An honest `send --channels 2` of the two-device unit `devs` (not P2P-capable, so
/// `--allow-non-p2p-unit`) to `listen`, where `recv` serves it and ends: both commands
/// succeed.
pub fn send_unit_over_two_channels(dirs: &Dirs, devs: [&str; 2], listen: &str, recv: Recv) {
    let unit = "--allow-non-p2p-unit";
    let o = dirs.run(&[
        "send",
        devs[0],
        devs[1],
        "--to",
        listen,
        "--channels",
        "2",
        unit,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, _, err) = recv.wait();
    assert!(status.success(), "{err}");
}
