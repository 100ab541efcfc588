// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! libvfio-user's sample `server`, built by `scripts/libvfio-user.sh`, run on the host.

#![allow(dead_code)] // each test target uses a part

pub mod rust_server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vfio_mig::backend::DeviceIo;
use vfio_mig_user::{ConnectOptions, VfioUserDevice};

/// The sample server's BAR0 (a `time_t`) and BAR1 (0x4000 bytes, as patched by scripts/libvfio-user.sh) region indexes.
pub const BAR0: u32 = 0;
/// See [`BAR0`].
pub const BAR1: u32 = 1;
/// The sample server's BAR1 size.
pub const BAR1_SIZE: usize = 0x4000;

/// `VFIO_MIG_SKIP_VFIO_USER=1`: the named opt-out when libvfio-user cannot be built here.
pub fn skipped() -> bool {
    if std::env::var("VFIO_MIG_SKIP_VFIO_USER").as_deref() == Ok("1") {
        eprintln!("vfio-user tests SKIPPED (VFIO_MIG_SKIP_VFIO_USER=1): this is not a full pass");
        return true;
    }
    false
}

/// The directory of the built samples: `VFIO_MIG_LIBVFIO_USER`, else what
/// `scripts/libvfio-user.sh` builds (it fails naming a missing source or package).
pub fn samples() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("VFIO_MIG_LIBVFIO_USER") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/libvfio-user.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed (see above); set VFIO_MIG_LIBVFIO_USER to a built samples directory, \
             or VFIO_MIG_SKIP_VFIO_USER=1 to opt out (not a full pass)",
            script.display()
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// One sample server process on a socket of its own (killed when dropped).
pub struct Server {
    child: Option<Child>,
    /// The socket path.
    pub sock: PathBuf,
    /// Its stderr (`-v`: every command it handles).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts `server -v SOCK` and waits (bounded) until its socket accepts.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vfu.sock");
        let log = dir.path().join("server.log");
        let child = Command::new(samples().join("server"))
            .arg("-v")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start libvfio-user's sample server");
        let mut me = Self {
            child: Some(child),
            sock,
            log,
            _dir: dir,
        };
        me.wait_listening();
        me
    }

    /// Waits until the socket listens, as `/proc/net/unix` shows it (`__SO_ACCEPTCON`, flags
    /// 00010000): a trial connection would be the one client the sample serves.
    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening(&self.sock) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the sample server exited ({status}) before listening: {}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the sample server did not listen in 20 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connects to it.
    pub fn connect(&self) -> Arc<VfioUserDevice> {
        Arc::new(VfioUserDevice::connect(&self.sock, &ConnectOptions::default()).unwrap())
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Whether it still runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it now (SIGKILL to the process this test started).
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for it to exit by itself, which it does when its client hangs up.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the sample server did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn listening(sock: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let path = sock.to_string_lossy();
    table.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8 && f[3] == "00010000" && f[7] == path
    })
}

/// Reads all of a region through the socket.
pub fn read_region(dev: &dyn DeviceIo, index: u32, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = dev
        .read_at(
            &mut buf,
            u64::from(index) << vfio_mig_user::device::REGION_SHIFT,
        )
        .unwrap();
    assert_eq!(n, len, "short read of region {index}");
    buf
}

/// Writes a region through the socket.
pub fn write_region(dev: &dyn DeviceIo, index: u32, data: &[u8]) {
    let n = dev
        .write_at(
            data,
            u64::from(index) << vfio_mig_user::device::REGION_SHIFT,
        )
        .unwrap();
    assert_eq!(n, data.len());
}

/// Gives a source the state the tests migrate: BAR1 filled with `seed`'s pattern, BAR0 a
/// time an hour ahead (the sample arms a timer to it when it runs, and refuses a past one).
/// Returns (BAR0 as written, BAR1).
pub fn prime(dev: &dyn DeviceIo, seed: u8) -> (i64, Vec<u8>) {
    let bar1: Vec<u8> = (0..BAR1_SIZE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    write_region(dev, BAR1, &bar1);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = now + 3600;
    write_region(dev, BAR0, &t.to_le_bytes());
    (t, bar1)
}

/// BAR0 as the sample server reads it back: `time(NULL) - bar0`, so the written value is
/// `now - delta`, with `now` the second at which the server read its clock. That second lies
/// between two reads of ours around the access; when they differ (a second boundary fell in
/// between, and the server's second is unknown) the access is repeated.
pub fn bar0_value(dev: &dyn DeviceIo) -> i64 {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    loop {
        let before = now();
        let raw = read_region(dev, BAR0, 8);
        if now() == before {
            return before - i64::from_le_bytes(raw.try_into().unwrap());
        }
    }
}
