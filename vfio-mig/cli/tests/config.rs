// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The host configuration file (issue 21, "Operations"; docs/cli.md "The configuration
//! file"): its settings reach the commands, options override it, bad files are refused with
//! one line naming the file, the line and the key, and `config check` validates it (0/2).

mod common;

use std::path::Path;
use std::process::Output;

use common::{assert_clean_failure, stderr, Dirs, Pki, Recv};

fn write(dirs: &Dirs, name: &str, text: &str) -> String {
    let path = dirs.path(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// `vfio-mig config check PATH`.
fn check(dirs: &Dirs, path: &str) -> Output {
    dirs.cmd(&[])
        .args(["config", "check", path])
        .output()
        .unwrap()
}

/// A refused file: status 2, one error line naming the file, the line and the key.
fn assert_refused(o: &Output, path: &str, line: usize, key: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let line_text = assert_clean_failure(o.status, &err, &format!("{path}:{line}: {key}"));
    assert!(!line_text.contains('\n'), "{line_text}");
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// A `[tls]` section with `leaf`'s identity.
fn identity(leaf: &common::Leaf) -> String {
    format!(
        "[tls]\ncert = {}\nkey = {}\nca = {}\n",
        toml_path(&leaf.cert),
        toml_path(&leaf.key),
        toml_path(&leaf.ca)
    )
}

#[test]
fn the_files_directories_apply_and_options_override_them() {
    let dirs = Dirs::new();
    // A lock directory that cannot be created (under a regular file).
    let blocker = write(&dirs, "blocker", "");
    let config = write(
        &dirs,
        "config.toml",
        &format!("lock-dir = \"{blocker}/locks\"\nstate-dir = \"{blocker}/state\"\n"),
    );
    // Mocks with an id are locked like real devices.
    let pair = [
        "migrate",
        "mock:v1,size=1M,seed=2,id=a",
        "mock:v1,size=1M,seed=2,id=b",
    ];
    let migrate = |extra: &[&str]| {
        let mut c = dirs.cmd(&[]);
        c.env_remove("VFIO_MIG_LOCK_DIR")
            .env_remove("VFIO_MIG_STATE_DIR")
            .args(pair)
            .args(["--config", &config])
            .args(extra);
        c.output().unwrap()
    };
    let o = migrate(&[]);
    assert_clean_failure(o.status, &stderr(&o), &format!("{blocker}/locks"));
    let lock = dirs.path("lock").display().to_string();
    let state = dirs.path("state").display().to_string();
    let o = migrate(&["--lock-dir", &lock, "--state-dir", &state]);
    assert!(o.status.success(), "{}", stderr(&o));
    // An option's environment variable overrides the file as the option does.
    let o = dirs
        .cmd(&[])
        .args(pair)
        .args(["--config", &config])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_files_store_is_used_unless_an_option_names_another() {
    let dirs = Dirs::new();
    let store = dirs.path("store").display().to_string();
    let config = write(
        &dirs,
        "config.toml",
        &format!("[fence]\nstore = \"dir:{store}\"\nowner = \"hostA\"\n"),
    );
    let out = dirs.path("out").display().to_string();
    // With the file's store, save needs a --fence-key for its device.
    let o = dirs.run(&["save", "mock:v1,size=1M", "-o", &out, "--config", &config]);
    assert_clean_failure(o.status, &stderr(&o), "--fence-key given");
    let o = dirs.run(&[
        "save",
        "mock:v1,size=1M",
        "-o",
        &out,
        "--config",
        &config,
        "--fence-key",
        "vm/a",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(Path::new(&store).exists(), "the file's store was not used");
}

#[test]
fn the_files_tls_identity_and_authorization_carry_a_migration() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let dst = write(
        &dirs,
        "dst.toml",
        &format!("{}allow = [\"dns:src.example\"]\n", identity(&pki.dst)),
    );
    let src = write(&dirs, "src.toml", &identity(&pki.src));
    let dev = "mock:v1,size=1M,seed=5";
    let recv = Recv::start(
        &dirs,
        &[],
        &[
            dev,
            "--listen",
            "tcp:127.0.0.1:0",
            "--once",
            "--json",
            "--config",
            &dst,
        ],
    );
    let o = dirs.run(&[
        "send",
        dev,
        "--to",
        &recv.addr,
        "--tls-server-name",
        "dst.example",
        "--config",
        &src,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (status, out, err) = recv.wait();
    assert!(status.success(), "{err}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["outcome"], "resumed", "{out}");
    assert!(
        got["source_identity"]
            .as_str()
            .unwrap()
            .contains("dns:src.example"),
        "{out}"
    );
}

#[test]
fn the_files_tls_yields_to_options_to_insecure_and_to_unix_sockets() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let allow = "allow = [\"dns:src.example\"]\n";
    let dst = write(&dirs, "dst.toml", &(identity(&pki.dst) + allow));
    // The source's file names an identity from a CA nobody trusts.
    let rogue = write(&dirs, "rogue.toml", &identity(&pki.rogue));
    let dev = "mock:v1,size=1M,seed=6";
    let recv = |listen: &str, extra: &[&str]| {
        let mut args = vec![dev, "--listen", listen, "--once", "--config", &dst];
        args.extend(extra);
        Recv::start(&dirs, &[], &args)
    };
    let send = |recv: &Recv, extra: &[String]| {
        let mut c = dirs.cmd(&[]);
        c.args(["send", dev, "--to", &recv.addr, "--config", &rogue])
            .args(extra);
        c.output().unwrap()
    };
    let both_succeed = |recv: Recv, o: Output| {
        assert!(o.status.success(), "{}", stderr(&o));
        let (status, _, err) = recv.wait();
        assert!(status.success(), "{err}");
    };
    let server_name = ["--tls-server-name".to_owned(), "dst.example".into()];
    // Without options the file's (rogue) identity is used, and refused; `recv` waits on.
    let r = recv("tcp:127.0.0.1:0", &[]);
    let o = send(&r, &server_name);
    assert_clean_failure(o.status, &stderr(&o), "refused our client certificate");
    // The options' identity replaces the file's as a whole.
    let mut flags = server_name.to_vec();
    flags.extend(pki.src.args());
    let o = send(&r, &flags);
    both_succeed(r, o);
    // --insecure sets the file's [tls] aside on both sides.
    let r = recv("tcp:127.0.0.1:0", &["--insecure"]);
    let o = send(&r, &["--insecure".into()]);
    both_succeed(r, o);
    // A unix: socket takes no TLS: the file's is not used there.
    let r = recv(&format!("unix:{}", dirs.path("sock").display()), &[]);
    let o = send(&r, &[]);
    both_succeed(r, o);
}

#[test]
fn unknown_keys_are_refused_with_the_key_named() {
    let dirs = Dirs::new();
    let path = write(
        &dirs,
        "c.toml",
        "lock-dir = \"/tmp\"\n[fence]\nstor = \"dir:/x\"\n",
    );
    let o = check(&dirs, &path);
    assert_refused(&o, &path, 3, "fence.stor");
    assert!(
        stderr(&o).contains("unknown field `stor`"),
        "{}",
        stderr(&o)
    );
    // Commands refuse it too, before touching a device.
    let o = dirs.run(&["recover", "mock:v1,size=1M", "--config", &path]);
    assert_clean_failure(o.status, &stderr(&o), &format!("{path}:3: fence.stor"));
    let path = write(&dirs, "d.toml", "\n[tsl]\n");
    assert_refused(&check(&dirs, &path), &path, 2, "tsl");
}

#[test]
fn bad_values_are_refused_naming_file_line_and_key() {
    let dirs = Dirs::new();
    let open_key = dirs.path("open.key");
    std::fs::write(&open_key, "secret").unwrap();
    std::fs::set_permissions(
        &open_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let cases = [
        ("[fence]\nttl = nan\n", 2, "fence.ttl", "finite"),
        ("[fence]\ntimeout = inf\n", 2, "fence.timeout", "finite"),
        ("[fence]\n\ntimeout = -1.0\n", 3, "fence.timeout", "finite"),
        ("[fence]\nttl = 1e308\n", 2, "fence.ttl", "finite"),
        ("[fence]\nttl = \"10\"\n", 2, "fence.ttl", "expected f64"),
        (
            "[fence]\nstore = \"http://x:1\"\n",
            2,
            "fence.store",
            "etcds://",
        ),
        ("[tls]\nallow = [\"dns:\"]\n", 2, "tls.allow", ""),
        (
            &format!("[tls]\nkey = {}\n", toml_path(&open_key)),
            2,
            "tls.key",
            "chmod 600",
        ),
        (
            &format!("\n[fence]\ncert-key = {}\n", toml_path(&open_key)),
            3,
            "fence.cert-key",
            "chmod 600",
        ),
        ("lock-dir = 7\n", 1, "lock-dir", ""),
    ];
    for (i, (text, line, key, why)) in cases.iter().enumerate() {
        let path = write(&dirs, &format!("{i}.toml"), text);
        let o = check(&dirs, &path);
        assert_refused(&o, &path, *line, key);
        assert!(stderr(&o).contains(why), "{text}: {}", stderr(&o));
        assert!(!stderr(&o).contains("secret"), "{}", stderr(&o));
    }
    // A file given but missing is an error, not an empty configuration.
    let o = check(&dirs, "/nonexistent/vfio-mig.toml");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = dirs.run(&[
        "recover",
        "mock:v1,size=1M",
        "--config",
        "/nonexistent/vfio-mig.toml",
    ]);
    assert_clean_failure(o.status, &stderr(&o), "/nonexistent/vfio-mig.toml");
}

#[test]
fn config_check_prints_the_effective_settings_and_no_secret() {
    let dirs = Dirs::new();
    let pki = Pki::new(dirs.tmp.path());
    let key_text = std::fs::read_to_string(&pki.dst.key).unwrap();
    let path = write(
        &dirs,
        "c.toml",
        &format!(
            "state-dir = \"/srv/state\"\n[tls]\ncert = {}\nkey = {}\nca = {}\n\
             [fence]\nstore = \"dir:/srv/store\"\nowner = \"hostA\"\nttl = 5\n",
            toml_path(&pki.dst.cert),
            toml_path(&pki.dst.key),
            toml_path(&pki.dst.ca)
        ),
    );
    let o = check(&dirs, &path);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    for line in [
        "lock-dir = \"/run/vfio-mig\"",
        "state-dir = \"/srv/state\"",
        &format!("tls.key = {}", toml_path(&pki.dst.key)),
        "fence.store = \"dir:/srv/store\"",
        "fence.ttl = 5",
        "fence.timeout = 10",
    ] {
        assert!(out.lines().any(|l| l == line), "{line:?} missing:\n{out}");
    }
    let secret = key_text.lines().nth(1).unwrap();
    assert!(!out.contains(secret), "{out}");
    // An incomplete identity is refused as a whole.
    let path = write(
        &dirs,
        "half.toml",
        &format!("[tls]\ncert = {}\n", toml_path(&pki.dst.cert)),
    );
    let o = check(&dirs, &path);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_clean_failure(o.status, &stderr(&o), "cert, key and ca come together");
    // Without a PATH, VFIO_MIG_CONFIG names the file.
    let o = dirs
        .cmd(&[])
        .env("VFIO_MIG_CONFIG", &path)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}
