// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The backend choice of the command line (`--backend`, `VFIO_MIG_BACKEND`) on a host without
//! VFIO: a forced backend that cannot open the device fails cleanly, naming the backend and
//! what is missing; a bad value is a usage error (whatever the device); mocks ignore the choice. (The guest tests
//! check the choices that work, on the Debian and the iommufd kernels.)

use std::process::{Command, Output};

fn vfio_mig(env: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfio-mig"));
    cmd.args(args);
    match env {
        Some(v) => cmd.env("VFIO_MIG_BACKEND", v),
        None => cmd.env_remove("VFIO_MIG_BACKEND"),
    };
    cmd.output().expect("run vfio-mig")
}

fn clean_failure(out: &Output, expect: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a failure: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
}

#[test]
fn a_forced_backend_that_cannot_open_the_device_names_itself_and_what_is_missing() {
    // A directory with none of a VFIO device's sysfs entries.
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().to_str().unwrap();
    clean_failure(
        &vfio_mig(None, &["--backend", "iommufd", "probe", dev]),
        &[
            "the iommufd backend cannot open",
            "vfio-dev",
            "VFIO_DEVICE_CDEV",
        ],
    );
    // The global option also goes after the command.
    clean_failure(
        &vfio_mig(None, &["probe", dev, "--backend", "group"]),
        &["the group backend cannot open"],
    );
    clean_failure(
        &vfio_mig(Some("iommufd"), &["probe", dev]),
        &["the iommufd backend cannot open"],
    );
    // --backend wins over the environment.
    clean_failure(
        &vfio_mig(Some("iommufd"), &["--backend", "group", "probe", dev]),
        &["the group backend cannot open"],
    );
    clean_failure(
        &vfio_mig(Some("auto"), &["probe", dev]),
        &["no VFIO backend can open", "group:", "iommufd:"],
    );
}

#[test]
fn bad_backend_values_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().to_str().unwrap();
    clean_failure(
        &vfio_mig(Some("vfio"), &["probe", dev]),
        &["VFIO_MIG_BACKEND=vfio", "expected auto, group or iommufd"],
    );
    clean_failure(
        &vfio_mig(Some("vfio"), &["probe", "mock:v1,size=1M"]),
        &["VFIO_MIG_BACKEND=vfio"],
    );
    let out = vfio_mig(None, &["--backend", "vfio", "probe", dev]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("invalid value") && err.contains("iommufd"),
        "{err}"
    );
}

#[test]
fn mocks_ignore_the_backend_and_report_none() {
    for env in [Some("iommufd"), Some("group"), None] {
        let out = vfio_mig(env, &["probe", "mock:v1,size=1M", "--json"]);
        assert!(
            out.status.success(),
            "{env:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["backend"].is_null() && v["access"].is_null(), "{v}");
    }
}
