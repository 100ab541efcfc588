// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Options belong to the commands that use them (issue 21, "Operations"): each command's
//! `--help` lists its own options and none of another concern's. The expected lists come
//! from what each command does (docs/cli.md): only commands that take device locks show the
//! lock and state directories, only those that hand devices off show the fencing store, only
//! `send` and `recv` show TLS.

use std::process::Command;

fn help(command: &str) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args([command, "--help"])
        .output()
        .expect("run vfio-mig");
    assert!(o.status.success(), "{command} --help failed");
    String::from_utf8(o.stdout).expect("help is UTF-8")
}

/// The options of the fencing store.
const STORE: &[&str] = &[
    "--fence ",
    "--fence-ca",
    "--fence-cert ",
    "--fence-cert-key",
    "--fence-insecure",
    "--fence-key",
    "--fence-owner",
    "--fence-ttl",
    "--fence-timeout",
];
/// The per-host lock and state directories.
const DIRS: &[&str] = &["--lock-dir", "--state-dir"];
/// TLS identities and authorization.
const TLS: &[&str] = &["--tls-cert", "--tls-key", "--tls-ca", " --insecure"];
const AUTHZ: &[&str] = &["--authorize", "--allow "];
/// The host configuration file.
const CONFIG: &[&str] = &["--config"];

fn check(command: &str, present: &[&[&str]], absent: &[&[&str]]) {
    let text = help(command);
    for opt in present.iter().flat_map(|g| g.iter()) {
        assert!(
            text.contains(opt),
            "`{command} --help` lacks {opt}:\n{text}"
        );
    }
    for opt in absent.iter().flat_map(|g| g.iter()) {
        assert!(
            !text.contains(opt),
            "`{command} --help` shows {opt}, which it does not use:\n{text}"
        );
    }
}

#[test]
fn commands_without_devices_to_hand_off_show_no_fencing_or_tls_options() {
    for command in ["probe", "inspect", "bench"] {
        check(command, &[], &[STORE, DIRS, TLS, AUTHZ, CONFIG]);
    }
}

#[test]
fn recover_shows_the_lock_directories_only() {
    check("recover", &[DIRS, CONFIG], &[STORE, TLS, AUTHZ]);
}

#[test]
fn local_commands_show_locks_and_the_store_but_no_tls() {
    for command in ["save", "load", "migrate"] {
        check(command, &[DIRS, STORE, CONFIG], &[TLS, AUTHZ]);
    }
}

#[test]
fn send_and_recv_show_everything_they_use() {
    check("send", &[DIRS, STORE, TLS, CONFIG], &[AUTHZ]);
    check("recv", &[DIRS, STORE, TLS, AUTHZ, CONFIG], &[]);
}
