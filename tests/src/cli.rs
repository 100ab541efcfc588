// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Running the `vfio-mig` command from guest tests and judging what it printed: success, or a
//! clean failure (no panic, exactly one `error:` line naming the step); the stderr lines of a
//! `recv` that tests wait on before they connect; SIGTERM in the middle of `send` and `recv`.

use std::io::{BufRead, BufReader, Lines, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Output, Stdio};

use vfio_mig::{wire::Record, wire::StreamReader};
use vfio_mig_session::handshake::{read_message, write_message, Message};

/// Runs `bin ARGS`, echoing its output into the test log.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    eprintln!(
        "$ vfio-mig {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Asserts that the command succeeded.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "vfio-mig failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts `stderr` of a failed command: no panic, exactly one `error:` line, containing every
/// string of `expect`. Returns that line.
pub fn one_error_line(stderr: &str, expect: &[&str]) -> String {
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    for e in expect {
        assert!(lines[0].contains(e), "expected {e:?} in {}", lines[0]);
    }
    lines[0].to_string()
}

/// Asserts a clean failure of the command (see [`one_error_line`]); returns the error line.
pub fn clean_failure(out: &Output, expect: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {err}");
    one_error_line(&err, expect)
}

/// A `vfio-mig recv` running in the background, with its stderr read line by line.
#[derive(Debug)]
pub struct Recv {
    /// The process.
    pub child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    /// Every stderr line read so far.
    pub seen: Vec<String>,
}

impl Recv {
    /// Starts `bin recv DEVICE --listen LISTEN EXTRA...` and waits for its "listening on" line.
    pub fn start(bin: &Path, device: &str, listen: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(bin)
            .args(["recv", device, "--listen", listen])
            .args(extra)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {} recv: {e}", bin.display()));
        let lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let mut recv = Recv {
            child,
            lines,
            seen: Vec::new(),
        };
        recv.wait_for("listening on");
        recv
    }

    /// Reads stderr up to the first line containing `needle`; panics if it ends first.
    pub fn wait_for(&mut self, needle: &str) {
        for line in self.lines.by_ref() {
            let line = line.expect("read recv's stderr");
            let found = line.contains(needle);
            self.seen.push(line);
            if found {
                return;
            }
        }
        panic!(
            "recv ended without a line containing {needle:?}:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits for the process to end; returns its exit code and all of its stderr.
    pub fn finish(mut self) -> (Option<i32>, String) {
        self.seen.extend(self.lines.by_ref().map_while(Result::ok));
        let status = self.child.wait().expect("wait for recv");
        (status.code(), self.seen.join("\n"))
    }
}

/// Sends SIGTERM to a child process of the test.
pub fn sigterm(pid: u32) {
    // SAFETY: kill(2) on a child this test started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
}

/// Runs `bin send DEVICE` to a fake destination that accepts, reads the whole stream and never
/// answers, so that `send` waits with its device saved; then SIGTERM. Returns the exit code
/// and stderr of `send`.
pub fn sigterm_during_send(bin: &Path, device: &str, dir: &Path) -> (Option<i32>, String) {
    let sock = dir.join("fake-destination");
    let listener = UnixListener::bind(&sock).expect("bind the fake destination");
    let send = Command::new(bin)
        .args(["send", device, "--to", &format!("unix:{}", sock.display())])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start send");
    let (conn, _) = listener.accept().expect("accept send");
    let mut tx = conn.try_clone().unwrap();
    let mut rx = conn;
    match read_message(&mut rx, "fake destination: HELLO").unwrap() {
        Message::Hello { .. } => {}
        other => panic!("{other}"),
    }
    let (mut reader, header) = StreamReader::open(&mut rx).unwrap();
    let session = header.session_id;
    write_message(&mut tx, &Message::Accept { session }, "fake destination").unwrap();
    while !matches!(reader.next_record().unwrap(), Record::End(_)) {}
    // The source sent its trailer: its device is stopped and it waits for LOADED.
    sigterm(send.id());
    let out = send.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts `bin recv DEVICE --once`, plays a source that sends HELLO and all of `stream` but its
/// trailer, waits for ACCEPT, then sends SIGTERM to `recv`. Returns its exit code and stderr,
/// after checking that its socket is gone.
pub fn sigterm_during_recv(
    bin: &Path,
    device: &str,
    stream: &[u8],
    dir: &Path,
) -> (Option<i32>, String) {
    let sock = dir.join("s");
    let recv = Recv::start(
        bin,
        device,
        &format!("unix:{}", sock.display()),
        &["--once"],
    );
    let conn = UnixStream::connect(&sock).unwrap();
    let mut tx = conn.try_clone().unwrap();
    let mut rx = conn;
    tx.write_all(&Message::Hello { features: 0 }.encode())
        .unwrap();
    // Everything but the trailer (its 24-byte header and 8 + 24 bytes of payload).
    let trailer = 24 + 8 + 24;
    tx.write_all(&stream[..stream.len() - trailer]).unwrap();
    match read_message(&mut rx, "fake source: ACCEPT").unwrap() {
        Message::Accept { .. } => {}
        other => panic!("{other}"),
    }
    sigterm(recv.child.id());
    let result = recv.finish();
    assert!(!sock.exists(), "recv left its socket behind");
    result
}
