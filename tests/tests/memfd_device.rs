// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 mock whose data fds are memfds (`data-fd=memfd`, issue 22 "a device that is as fast
//! as a real one"): a stop-copy data fd reads the device's state out of a sealed memfd, opened
//! as a file description of its own, with no producer thread; a resuming data fd is a memfd
//! the caller writes, verified by seed when the device leaves RESUMING.
//!
//! The oracles are the kernel's: `memfd_create(2)` and `fcntl(2)` (`F_GET_SEALS`) say what the
//! fd is, `/proc/self/task/*/comm` which threads exist, the v2 uAPI (include/uapi/linux/vfio.h)
//! that a read of the STOP_COPY data fd returns the state and then 0, and that a device whose
//! state does not load fails RESUMING -> STOP (xe: EIO, as the PF's restore). Everything runs in
//! one test so that no other test's feeder thread can be mistaken for this device's.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::stat::{fstat, SFlag};
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;
use vfio_mig_tests::{handle, mock, MockDevice};

/// v2 device states (include/uapi/linux/vfio.h, `enum vfio_device_mig_state`).
const STOP: u32 = 1;
const STOP_COPY: u32 = 3;
const RESUMING: u32 = 4;
const RUNNING: u32 = 2;

/// Threads of this process named like the v2 mock's producer and consumer threads.
fn mock_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("read /proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("mock-v2-"))
        .count()
}

/// Reads `fd` to its end.
fn read_all(fd: &OwnedFd) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match nix::unistd::read(fd, &mut buf).expect("read the data fd") {
            0 => return out,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A data session over a copy of `fd`, as the device layer takes it.
fn session(fd: &OwnedFd) -> vfio_mig::backend::DataSession {
    vfio_mig::backend::DataSession::from_fd(fd.try_clone().expect("dup the data fd"))
}

/// The data fd the arc into `state` opens.
fn data_fd(dev: &MockDevice, state: u32) -> OwnedFd {
    dev.io
        .set_mig_state(state)
        .unwrap_or_else(|e| panic!("set state {state}: {e}"))
        .expect("a data session")
        .into_fd()
        .expect("a kernel-style data fd")
}

/// A data fd that is a regular file, not a pipe.
fn assert_regular(fd: &OwnedFd, what: &str) {
    let st = fstat(fd.as_fd()).expect("fstat");
    assert_eq!(
        SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT,
        SFlag::S_IFREG,
        "{what}: not a regular file (a pipe?)"
    );
}

/// A data fd that is a memfd, sealed against any change of its bytes.
fn assert_sealed_memfd(fd: &OwnedFd, what: &str) {
    assert_regular(fd, what);
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    assert!(
        link.to_string_lossy().starts_with("/memfd:"),
        "{what}: {link:?} is not a memfd"
    );
    let seals = SealFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GET_SEALS).expect("seals"));
    for seal in [
        SealFlag::F_SEAL_WRITE,
        SealFlag::F_SEAL_GROW,
        SealFlag::F_SEAL_SHRINK,
    ] {
        assert!(seals.contains(seal), "{what}: {seal:?} missing ({seals:?})");
    }
}

#[test]
fn memfd_data_fds_carry_the_state_without_threads_and_are_verified_by_seed() {
    let spec = "mock:v2,size=3M,seed=5,profile=xe,data-fd=memfd";
    let threads_before = mock_threads();

    // Source: STOP_COPY hands out a sealed memfd read-only, at offset 0, no thread behind it.
    let src = mock(spec);
    src.io.set_mig_state(STOP).expect("RUNNING -> STOP");
    let first = data_fd(&src, STOP_COPY);
    assert_sealed_memfd(&first, "stop-copy data fd");
    let mode = OFlag::from_bits_truncate(fcntl(&first, FcntlArg::F_GETFL).unwrap());
    assert_eq!(mode & OFlag::O_ACCMODE, OFlag::O_RDONLY, "{mode:?}");
    assert_eq!(mock_threads(), threads_before, "a producer thread runs");
    let state = read_all(&first);
    src.io.set_mig_state(STOP).expect("STOP_COPY -> STOP");
    assert_eq!(handle(&src).status().saves_completed, 1);
    assert!(state.len() > 3 << 20, "{} bytes of state", state.len());

    // A device that reports what stop-copy still has to send (the uAPI's MIG_DATA_SIZE in
    // STOP_COPY): what the reads of its own description have not taken yet.
    let plain = mock("mock:v2,size=1M,seed=5,flags=0x3,data-fd=memfd");
    plain.io.set_mig_state(STOP).unwrap();
    let fd = data_fd(&plain, STOP_COPY);
    let whole = plain.io.mig_data_size().unwrap();
    let mut half = vec![0u8; (whole / 2) as usize];
    assert_eq!(nix::unistd::read(&fd, &mut half).unwrap(), half.len());
    assert_eq!(plain.io.mig_data_size().unwrap(), whole - half.len() as u64);
    let rest = read_all(&fd);
    assert_eq!((half.len() + rest.len()) as u64, whole);
    assert_eq!(plain.io.mig_data_size().unwrap(), 0);
    plain.io.set_mig_state(STOP).unwrap();
    assert_eq!(
        read_all(&fd),
        b"",
        "an ended session's fd still reads state"
    );

    // A second stop-copy session is a new file description: it starts at 0 again.
    let second = data_fd(&src, STOP_COPY);
    assert_eq!(
        read_all(&second),
        state,
        "the second session's state differs"
    );
    src.io.set_mig_state(STOP).expect("STOP_COPY -> STOP");

    // Destination: RESUMING hands out a memfd to write, the state verified at RESUMING -> STOP.
    let dst = mock(spec);
    dst.io.set_mig_state(STOP).expect("RUNNING -> STOP");
    let into = data_fd(&dst, RESUMING);
    assert_regular(&into, "resuming data fd");
    assert_eq!(mock_threads(), threads_before, "a consumer thread runs");
    for piece in state.chunks(100_000) {
        assert_eq!(
            dst.io.write_data(&session(&into), piece).unwrap(),
            piece.len()
        );
    }
    dst.io.set_mig_state(STOP).expect("RESUMING -> STOP");
    dst.io.set_mig_state(RUNNING).expect("STOP -> RUNNING");
    assert!(handle(&dst).status().resumed_ok, "the state did not verify");

    // Another seed's device refuses the state at RESUMING -> STOP (xe: EIO).
    let other = mock("mock:v2,size=3M,seed=6,profile=xe,data-fd=memfd");
    other.io.set_mig_state(STOP).unwrap();
    let into = data_fd(&other, RESUMING);
    other.io.write_data(&session(&into), &state).unwrap();
    let err = other
        .io
        .set_mig_state(STOP)
        .expect_err("another seed's state loaded");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // The whole engine between two such devices, stop-copy only (xe has no PRE_COPY).
    let mut a = mock("mock:v2,size=5M,seed=9,profile=xe,data-fd=memfd");
    let mut b = mock("mock:v2,size=5M,seed=9,profile=xe,data-fd=memfd");
    migrate_local(
        a.device.as_mut(),
        b.device.as_mut(),
        &SaveOptions::default(),
        &NoObserver,
        &NoObserver,
    )
    .expect("migrate between two memfd devices");
    assert!(handle(&b).status().resumed_ok);
    assert_eq!(handle(&a).state_digest(), handle(&b).state_digest());
    assert_eq!(
        mock_threads(),
        threads_before,
        "a mock thread was left behind"
    );
}

#[test]
fn memfd_data_fds_refuse_what_they_cannot_model() {
    for (spec, why) in [
        ("mock:v2,data-fd=memfd", "PRE_COPY"),
        ("mock:v2,profile=xe,data-fd=memfd,rate=1G", "rate"),
        (
            "mock:v2,profile=xe,data-fd=memfd,accept-rate=1G",
            "accept-rate",
        ),
        (
            "mock:v2,profile=xe,data-fd=memfd,fail-at=data-read@1",
            "data-read",
        ),
        ("mock:v2,profile=xe,data-fd=pipes", "`pipe` or `memfd`"),
        ("mock:v1,data-fd=memfd", "mock:v2 only"),
    ] {
        let err = vfio_mig_tests::try_mock(spec).err().map(|e| e.to_string());
        let err = err.unwrap_or_else(|| panic!("{spec} was accepted"));
        assert!(err.contains(why), "{spec}: {err}");
    }
}

/// The distinct memfds of this process named as the v2 mock's state files and `len` bytes
/// long, by (device, inode) as `fstat(2)` reports them through `/proc/self/fd`.
fn state_files_of_len(len: i64) -> std::collections::BTreeSet<(u64, u64)> {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .filter_map(|e| {
            let path = e.ok()?.path();
            let link = std::fs::read_link(&path).ok()?;
            if !link
                .to_string_lossy()
                .starts_with("/memfd:vfio-mig-mock-v2-state")
            {
                return None;
            }
            let st = nix::sys::stat::stat(&path).ok()?;
            (st.st_size == len).then_some((st.st_dev, st.st_ino))
        })
        .collect()
}

/// A destination entering RESUMING gives up its old stop-copy image: the resume overwrites
/// the device's memory, and an xe-sized destination would otherwise hold gigabytes of shared
/// memory beside its resuming memfd (issue 22: an 8 GiB migration in one process needs the
/// source's image and the resuming memfd, not a third copy). The state files are told apart
/// by a size no other test of this file uses.
#[test]
fn a_resuming_memfd_device_drops_its_old_state_file() {
    let spec = "mock:v2,size=7M,seed=17,profile=xe,data-fd=memfd";
    let src = mock(spec);
    let dst = mock(spec);
    src.io.set_mig_state(STOP).expect("RUNNING -> STOP");
    let fd = data_fd(&src, STOP_COPY);
    let len = fstat(fd.as_fd()).expect("fstat").st_size;
    drop(fd);
    src.io.set_mig_state(STOP).expect("STOP_COPY -> STOP");
    assert_eq!(
        state_files_of_len(len).len(),
        2,
        "source and destination images"
    );
    dst.io.set_mig_state(STOP).expect("RUNNING -> STOP");
    let _into = data_fd(&dst, RESUMING);
    assert_eq!(
        state_files_of_len(len).len(),
        1,
        "the resuming destination still holds its old image"
    );
}
