// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target 6 of issue 6: the per-transition overhead of vfio-mig's v2 driver on a real mtty,
//! against a minimal C-like probe issuing the same ioctls with libc only, in the same guest
//! run, on the same device fd, interleaved.
//!
//! One cycle is five state changes, each as the driver makes it (a GET of the state, then one
//! SET per arc of the kernel's path, closing a data fd when its session ends):
//! RUNNING -> STOP_COPY (3 arcs, a data fd), -> STOP (1), -> RUNNING (2), -> PRE_COPY (1, a data
//! fd), -> RUNNING (1): 5 GETs and 8 SETs. The driver side is `V2Device::set_state`; the probe
//! side is `ioctl(fd, VFIO_DEVICE_FEATURE, ...)` and `close`, nothing else.
//!
//! The figure goes to the console log as one line, `VFIO-MIG-BENCH: transition ...` (written
//! to fd 2 directly, so the test harness does not capture it). Speed is never asserted: the
//! test fails only if a transition fails.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_SET, VFIO_TYPE,
};
use vfio_mig::VfioDeviceIo;
use vfio_mig::{backend::v2_state::MigState, backend::V2Device};

use super::mtty::{mtty_devices, MttyDevice};

/// `VFIO_DEVICE_FEATURE` = `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
const VFIO_DEVICE_FEATURE: libc::c_ulong =
    ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE as libc::c_ulong + 17);

// enum vfio_device_mig_state
const STOP: u32 = 1;
const RUNNING: u32 = 2;
const STOP_COPY: u32 = 3;
const RUNNING_P2P: u32 = 5;
const PRE_COPY: u32 = 6;

/// `struct vfio_device_feature` followed by `struct vfio_device_feature_mig_state`.
#[repr(C)]
struct MigStateArg {
    argsz: u32,
    flags: u32,
    device_state: u32,
    data_fd: i32,
}

/// The probe: one raw `VFIO_DEVICE_FEATURE` ioctl. Returns the data fd field.
fn feature(fd: RawFd, set: bool, state: u32) -> (u32, i32) {
    let mut arg = MigStateArg {
        argsz: std::mem::size_of::<MigStateArg>() as u32,
        flags: VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
            | if set {
                VFIO_DEVICE_FEATURE_SET
            } else {
                VFIO_DEVICE_FEATURE_GET
            },
        device_state: state,
        data_fd: -1,
    };
    // SAFETY: `arg` is a properly sized vfio_device_feature + mig_state argument, live for the
    // call; the fd is the device's.
    let r = unsafe { libc::ioctl(fd, VFIO_DEVICE_FEATURE, &mut arg as *mut MigStateArg) };
    assert!(
        r >= 0,
        "raw VFIO_DEVICE_FEATURE ({}, {state}): {}",
        if set { "SET" } else { "GET" },
        std::io::Error::last_os_error()
    );
    (arg.device_state, arg.data_fd)
}

/// One state change the way the driver makes it: GET, then SET each arc; an fd returned by
/// the last arc is kept in `data`, any open session's fd is closed once it ends.
fn raw_change(fd: RawFd, arcs: &[u32], data: &mut Option<RawFd>, keeps_session: bool) {
    feature(fd, false, 0);
    for &arc in arcs {
        let (_, dfd) = feature(fd, true, arc);
        if dfd >= 0 {
            if let Some(old) = data.replace(dfd) {
                // SAFETY: an fd this probe received and still owns.
                unsafe { libc::close(old) };
            }
        }
    }
    if !keeps_session {
        if let Some(old) = data.take() {
            // SAFETY: as above.
            unsafe { libc::close(old) };
        }
    }
}

fn raw_cycle(fd: RawFd) {
    let mut data = None;
    raw_change(fd, &[RUNNING_P2P, STOP, STOP_COPY], &mut data, true);
    raw_change(fd, &[STOP], &mut data, false);
    raw_change(fd, &[RUNNING_P2P, RUNNING], &mut data, false);
    raw_change(fd, &[PRE_COPY], &mut data, true);
    raw_change(fd, &[RUNNING], &mut data, false);
}

fn lib_cycle(dev: &mut V2Device) {
    for target in [
        MigState::StopCopy,
        MigState::Stop,
        MigState::Running,
        MigState::PreCopy,
        MigState::Running,
    ] {
        dev.set_state(target).unwrap();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes a line to fd 2 directly (the test harness captures `eprintln!`).
fn console(line: &str) {
    let s = format!("{line}\n");
    // SAFETY: writes a live buffer to stderr.
    unsafe { libc::write(2, s.as_ptr().cast(), s.len()) };
}

#[test]
fn bench_transition_overhead_against_raw_ioctls() {
    let path = mtty_devices().into_iter().next().expect("an mtty device");
    let mtty = MttyDevice::open_or_panic(&path);
    let fd = mtty.fd();
    let io = Arc::new(VfioDeviceIo::from_vfio_device(mtty.device, &path));
    let mut dev = V2Device::open(io.clone()).unwrap();
    assert_eq!(dev.state().unwrap(), MigState::Running);
    assert_eq!(feature(fd, false, 0).0, RUNNING);
    const BLOCKS: usize = 9;
    // Warm-up of both.
    raw_cycle(fd);
    lib_cycle(&mut dev);
    // Blocks of about 100 ms each: some guest kernels (the tinyconfig iommufd one) keep time
    // in jiffies, so a block must be long against the tick.
    let cycles = {
        let t = Instant::now();
        let mut n = 0usize;
        while t.elapsed().as_millis() < 100 {
            raw_cycle(fd);
            n += 1;
        }
        n.max(40)
    };
    let (mut lib, mut raw, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for block in 0..BLOCKS {
        let run_raw = || {
            let t = Instant::now();
            for _ in 0..cycles {
                raw_cycle(fd);
            }
            t.elapsed().as_secs_f64() / cycles as f64 * 1e6
        };
        let (r, l) = if block % 2 == 0 {
            let r = run_raw();
            let t = Instant::now();
            for _ in 0..cycles {
                lib_cycle(&mut dev);
            }
            (r, t.elapsed().as_secs_f64() / cycles as f64 * 1e6)
        } else {
            let t = Instant::now();
            for _ in 0..cycles {
                lib_cycle(&mut dev);
            }
            let l = t.elapsed().as_secs_f64() / cycles as f64 * 1e6;
            (run_raw(), l)
        };
        raw.push(r);
        lib.push(l);
        ratios.push(l / r);
    }
    // The device must be where both left it.
    assert_eq!(dev.state().unwrap(), MigState::Running);
    assert_eq!(feature(fd, false, 0).0, RUNNING);
    let (lo, hi) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), r| (a.min(*r), b.max(*r)));
    let ratio = median(&mut ratios);
    let line = format!(
        "VFIO-MIG-BENCH: transition overhead on mtty (backend {}; per cycle of 5 state changes, \
         13 ioctls): vfio-mig {:.1} us, raw libc ioctls {:.1} us, ratio {ratio:.3} (min {lo:.3}, \
         max {hi:.3}, {BLOCKS} interleaved blocks of {cycles} cycles), target <= 1.2: {}",
        io.access().backend,
        median(&mut lib),
        median(&mut raw),
        if ratio <= 1.2 { "met" } else { "MISSED" }
    );
    console(&line);
}
