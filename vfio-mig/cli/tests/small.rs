// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Small contract breaches of the command line (issue 21, defect 9): option values that
//! panicked or were clamped silently, usage errors with the status of a failure, an epoch
//! that ratchets the fencing record ahead, output to a closed standard output.

mod common;

use std::os::unix::process::CommandExt;

use common::{stderr, Dirs};

/// A usage error: status 2, no panic, `expect` in the message.
fn assert_usage(o: &std::process::Output, expect: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(expect), "{expect:?} expected: {err}");
}

#[test]
fn fence_seconds_outside_their_range_are_usage_errors() {
    let dirs = Dirs::new();
    for option in ["--fence-ttl", "--fence-timeout"] {
        for value in ["nan", "inf", "-1", "1e308", "0"] {
            let o = dirs.run(&[
                "load",
                "mock:v1,size=1M",
                "-i",
                "/nonexistent",
                "--fence",
                "dir:/nonexistent",
                "--fence-key",
                "k",
                &format!("{option}={value}"),
            ]);
            assert_usage(&o, "seconds");
        }
    }
}

#[test]
fn a_malformed_session_is_a_usage_error() {
    let dirs = Dirs::new();
    let o = dirs.run(&[
        "send",
        "mock:v1,size=1M",
        "--to",
        "unix:/nonexistent",
        "--session",
        "xyz",
    ]);
    assert_usage(&o, "32 hex digits");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Handoffs at about now+1d, then now+2d: the second is more than a day ahead of the clock and is
/// refused, so the record cannot be walked days ahead (which would refuse every default
/// handoff as stale).
#[test]
fn epochs_cannot_ratchet_the_record_ahead_of_the_clock() {
    let dirs = Dirs::new();
    let day = 24 * 3600 * 1000;
    let dst = "mock:v1,size=1M,seed=1,id=ratchet";
    let handoff = |epoch: u64| {
        let f = dirs.path(&format!("s{epoch}"));
        let o = dirs.run(&[
            "save",
            "mock:v1,size=1M,seed=1",
            "-o",
            f.to_str().unwrap(),
            "--epoch",
            &epoch.to_string(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        dirs.run(&["load", dst, "-i", f.to_str().unwrap()])
    };
    // Each a day ahead of the last, less ten minutes: within a day of the highest epoch.
    let first = now_ms() + day - 600_000;
    let o = handoff(first);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = handoff(first + day - 600_000);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("the clock"), "{}", stderr(&o));
}

/// `save -o -` with standard output closed is refused before the device is touched instead
/// of reporting "saved"; `--json` cannot share standard output with the stream.
#[test]
fn save_to_a_closed_standard_output_is_refused() {
    let dirs = Dirs::new();
    let mut cmd = dirs.cmd(&[]);
    cmd.args(["save", "mock:v1,size=1M", "-o", "-"]);
    // SAFETY: close(2) of fd 1 in the child before exec; no memory is involved.
    unsafe {
        cmd.pre_exec(|| {
            libc::close(1);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("standard output is closed or /dev/null"),
        "{err}"
    );
    assert!(!err.contains("saved"), "{err}");
    let o = dirs.run(&["save", "mock:v1,size=1M", "-o", "-", "--json"]);
    assert_usage(&o, "--json");
}

/// Issue 21, operations: options belong to the commands that use them. `probe`, `inspect`
/// and `bench` touch no lock and no fencing store, so their help shows none of those
/// options and they refuse them; the commands that drive devices show them.
#[test]
fn fencing_options_belong_to_the_commands_that_drive_devices() {
    let dirs = Dirs::new();
    for command in ["probe", "inspect", "bench"] {
        let o = dirs.run(&[command, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{command}: {}", stderr(&o));
        for option in ["--fence", "--lock-dir", "--state-dir"] {
            assert!(
                !help.contains(option),
                "{command} --help shows {option}:\n{help}"
            );
        }
    }
    let o = dirs.run(&["probe", "mock:v1,size=1M", "--fence", "dir:/x"]);
    assert_usage(&o, "--fence");
    for command in ["save", "load", "migrate", "send", "recv"] {
        let o = dirs.run(&[command, "--help"]);
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("--fence-timeout"), "{command}:\n{help}");
        assert!(help.contains("--lock-dir"), "{command}:\n{help}");
    }
    // `recover` locks its device but hands nothing off: no store.
    let o = dirs.run(&["recover", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(help.contains("--lock-dir"), "recover:\n{help}");
    assert!(!help.contains("--fence"), "recover:\n{help}");
}

/// `save --live --json` reports its pre-copy (docs/cli.md, "JSON output": `rounds`,
/// `switch_reason`, `pre_copy_bytes`, `stop_copy_bytes`): a mock that does not dirty its
/// state sends all of it in pre-copy, which then converges, and the file loads.
#[test]
fn a_live_save_reports_its_pre_copy_and_loads() {
    let dirs = Dirs::new();
    let file = dirs.path("live.vmig");
    let file = file.to_str().unwrap();
    let spec = "mock:v1,size=4M,seed=12";
    let o = dirs.run(&["save", spec, "-o", file, "--live", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(r["rounds"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["switch_reason"], "converged", "{r}");
    assert!(r["pre_copy_bytes"].as_u64().unwrap() >= 4 << 20, "{r}");
    assert!(r["stop_copy_bytes"].as_u64().unwrap() < 4 << 20, "{r}");
    let o = dirs.run(&["load", spec, "-i", file]);
    assert!(o.status.success(), "{}", stderr(&o));
}
