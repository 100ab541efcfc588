// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Files and permissions (issue 21, defect 8), as root under umask 000: private keys others
//! can read or another user owns are refused before anything is touched, and `recv`'s Unix
//! socket is its owner's only, whatever the umask.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{assert_clean_failure, stderr, Dirs, Pki, Recv, BIN};

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn private_keys_others_can_read_are_refused() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    chmod(&pki.dst.key, 0o644);
    let mut args = vec![
        "recv".to_owned(),
        "mock:v1,size=1M".into(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--allow".into(),
        "dns:src.example".into(),
    ];
    args.extend(pki.dst.args());
    // Bounded: a recv that accepted the key would listen until killed.
    let o = dirs
        .cmd(&["timeout", "20", BIN])
        .args(&args)
        .output()
        .unwrap();
    let line = assert_clean_failure(o.status, &stderr(&o), "chmod 600");
    assert!(line.contains(&pki.dst.key.display().to_string()), "{line}");
    // The etcd client key too, before the store is asked anything.
    chmod(&pki.src.key, 0o640);
    let (ca, cert, key) = (
        pki.src.ca.display().to_string(),
        pki.src.cert.display().to_string(),
        pki.src.key.display().to_string(),
    );
    let o = dirs.run(&[
        "load",
        "mock:v1,size=1M",
        "-i",
        "/nonexistent",
        "--fence",
        "etcds://127.0.0.1:1",
        "--fence-ca",
        &ca,
        "--fence-cert",
        &cert,
        "--fence-cert-key",
        &key,
        "--fence-key",
        "vm/k",
    ]);
    assert_clean_failure(o.status, &stderr(&o), "chmod 600");
}

#[test]
fn a_key_file_another_user_owns_is_refused() {
    let dirs = Dirs::new();
    let key = dirs.path("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    chmod(&key, 0o600);
    std::os::unix::fs::chown(&key, Some(65534), Some(65534)).unwrap();
    let out = dirs.path("out");
    let o = dirs.run(&[
        "save",
        "mock:v1,size=1M",
        "-o",
        out.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    assert_clean_failure(o.status, &stderr(&o), "owned by uid 65534");
    assert!(!out.exists());
}

#[test]
fn the_unix_socket_is_private_under_umask_000() {
    let dirs = Dirs::new();
    let sock = dirs.path("s");
    let listen = format!("unix:{}", sock.display());
    let umask_000 = ["sh", "-c", "umask 000; exec \"$@\"", "sh"];
    let recv = Recv::start(&dirs, &umask_000, &["mock:v1,size=1M", "--listen", &listen]);
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    drop(recv);
}

/// A FIFO planted at a device's fencing state path must not hang the destination (opening it
/// for reading blocks until a writer comes): the load is refused at once, in one line naming
/// the path, the device untouched.
#[test]
fn a_fifo_at_the_state_path_is_refused_not_waited_on() {
    let dirs = Dirs::new();
    let dev = "mock:v1,size=1M,seed=17,id=fifo";
    let file = dirs.path("saved");
    let file = file.to_str().unwrap();
    let o = dirs.run(&["save", dev, "-o", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = dirs.run(&["load", dev, "-i", file]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The state file the load wrote, replaced by a FIFO.
    let state: Vec<_> = std::fs::read_dir(dirs.path("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "fence"))
        .collect();
    let [state] = state.as_slice() else {
        panic!("one state file expected: {state:?}");
    };
    std::fs::remove_file(state).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(state)
        .status()
        .unwrap();
    assert!(made.success());
    // Bounded: a load that opened the FIFO for reading would wait for a writer forever (and
    // its open is not interrupted by SIGTERM: SIGKILL follows).
    let o = dirs
        .cmd(&["timeout", "-k", "5", "20", BIN])
        .args(["load", dev, "-i", file])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(124), "load hung on the FIFO");
    let line = assert_clean_failure(o.status, &stderr(&o), "not a regular file");
    assert!(line.contains(&state.display().to_string()), "{line}");
}
