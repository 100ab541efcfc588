// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The v2 mock's rules, driven through raw `DeviceIo` calls: the feature probes, the
//! kernel's arcs and which of them return a data fd, the data fd's pre-copy and stop-copy
//! ends, PRECOPY_INFO, resume verification, DMA logging, and every fault field.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use vfio_bindings::bindings::vfio::{
    vfio_precopy_info, VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    VFIO_DEVICE_FEATURE_SET,
};
use vfio_mig::{backend::v2_feature as feature, backend::DmaLoggingRange};
use vfio_mig::{
    backend::v2_state::plan, backend::v2_state::returns_data_fd, backend::v2_state::MigState,
    backend::v2_state::MigrationFlags,
};
use vfio_mig::{backend::DataSession, backend::DeviceIo};
use vfio_mig_mock::{Content, Decoder, MockSpec, MockV2};
use vfio_mig_tests::StatusExt;
use MigState::{Error, PreCopy, PreCopyP2p, Resuming, Running, RunningP2p, Stop, StopCopy};

const EINVAL: i32 = libc::EINVAL;

fn dev(spec: &str) -> MockV2 {
    MockV2::new(&spec.parse::<MockSpec>().unwrap()).unwrap()
}

fn code<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn state(d: &MockV2) -> MigState {
    d.handle().status().mig_state().unwrap()
}

fn set(d: &MockV2, s: MigState) -> io::Result<Option<OwnedFd>> {
    Ok(feature::set_state(d, s)?.and_then(DataSession::into_fd))
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on `fd` (a duplicate: the mock knows a session by its file).
fn precopy_info_of(d: &MockV2, fd: &OwnedFd) -> io::Result<vfio_precopy_info> {
    d.precopy_info(&DataSession::from_fd(fd.try_clone()?))
}

/// One read of at most `max` bytes.
fn read_some(fd: BorrowedFd<'_>, max: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; max];
    let n = nix::unistd::read(fd, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads until a 0-byte read, in pieces of `piece` bytes.
fn read_to_zero(fd: BorrowedFd<'_>, piece: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let got = read_some(fd, piece).unwrap();
        if got.is_empty() {
            return out;
        }
        out.extend_from_slice(&got);
    }
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = nix::unistd::write(fd, data)?;
        data = &data[n..];
    }
    Ok(())
}

/// The bytes of a complete stream of `spec`'s content at generation 0.
fn stream_len(size: u64, page: u64) -> u64 {
    size.div_ceil(page) * 16 + size + 16
}

fn decoder_for(spec: &str) -> Decoder {
    let s: MockSpec = spec.parse().unwrap();
    Decoder::new(Content::new(s.seed, s.size, s.page))
}

#[test]
fn feature_probes_check_access_as_the_kernel_does() {
    let d = dev("mock:v2,size=8K");
    let mig = VFIO_DEVICE_FEATURE_MIGRATION;
    let mstate = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
    let (get, set) = (VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_SET);
    let probe = |f: u32, access: u32| code(d.probe_feature(f, access));
    // PROBE: answered for the accesses the feature offers (vfio_check_feature).
    assert_eq!(probe(mstate, get | set), 0);
    assert_eq!(probe(mig, get), 0);
    assert_eq!(probe(mig, 0), 0);
    assert_eq!(probe(mig, set), EINVAL);
    assert_eq!(probe(VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, set), EINVAL);
    assert_eq!(probe(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, get), EINVAL);
    assert_eq!(probe(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, get), 0);
    assert_eq!(probe(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, get), EINVAL);
    assert!(!d.handle().status().precopy_info_v2);
    assert_eq!(probe(VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2, set), 0);
    assert!(
        !d.handle().status().precopy_info_v2,
        "a probe changes nothing"
    );
    assert_eq!(code(d.enable_precopy_info_v2()), 0);
    assert!(d.handle().status().precopy_info_v2);
    // Unknown features.
    for f in [3, 4, 5, 10, 11, 13, 0xffff] {
        assert_eq!(probe(f, get), libc::ENOTTY, "feature {f}");
    }
    // The answers.
    assert_eq!(feature::migration_flags(&d).unwrap(), MigrationFlags::all());
    assert_eq!(
        MigState::from_raw(feature::get_state(&d).unwrap()),
        Some(Running)
    );
    assert_eq!(feature::data_size(&d).unwrap(), stream_len(8192, 4096));
    // Nothing of this changed the device.
    assert_eq!(state(&d), Running);
    assert_eq!(d.handle().status().data_fds, 0);
}

#[test]
fn flags_and_optional_features_follow_the_spec() {
    let d = dev("mock:v2,size=8K,flags=0x1,dma=off");
    assert_eq!(
        feature::migration_flags(&d).unwrap(),
        MigrationFlags::STOP_COPY
    );
    // PRECOPY_INFOv2 needs PRE_COPY; DMA logging is gone.
    assert_eq!(code(feature::enable_precopy_info_v2(&d)), EINVAL);
    for f in [
        VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    ] {
        assert_eq!(
            code(feature::probe(&d, f, VFIO_DEVICE_FEATURE_SET)),
            libc::ENOTTY
        );
    }
    assert_eq!(code(set(&d, PreCopy)), EINVAL);
    assert_eq!(code(set(&d, RunningP2p)), EINVAL);
    assert_eq!(state(&d), Running);
}

/// Puts a fresh device of `flags` in `from` (dropping any data fd).
fn device_in(flags: u64, from: MigState) -> MockV2 {
    let d = dev(&format!("mock:v2,size=8K,flags={flags:#x}"));
    drop(set(&d, from).unwrap());
    assert_eq!(state(&d), from);
    d
}

#[test]
fn every_request_walks_the_kernel_arcs_and_only_fd_arcs_return_an_fd() {
    let states = [
        Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
    ];
    for bits in [0x1u64, 0x3, 0x5, 0x7] {
        let flags = MigrationFlags::from_bits_retain(bits);
        for from in states.into_iter().filter(|s| s.is_supported(flags)) {
            for to in MigState::ALL {
                let d = device_in(bits, from);
                let ctx = format!("flags {bits:#x}: {from} -> {to}");
                let got = set(&d, to);
                match plan(from, to, flags) {
                    // An empty resume never verifies: leaving RESUMING for a running state
                    // (or STOP_COPY) fails at STOP -> it and drops the device into ERROR.
                    Ok(path)
                        if from == Resuming && !matches!(to, Stop | Resuming) && path.len() > 1 =>
                    {
                        assert_eq!(code(got), EINVAL, "{ctx}");
                        assert_eq!(state(&d), Error, "{ctx}");
                    }
                    Ok(path) => {
                        let fd = got.unwrap_or_else(|e| panic!("{ctx}: {e}"));
                        assert_eq!(state(&d), to, "{ctx}");
                        let before_last = if path.len() > 1 {
                            path[path.len() - 2]
                        } else {
                            from
                        };
                        let opens = !path.is_empty() && returns_data_fd(before_last, to);
                        assert_eq!(fd.is_some(), opens, "{ctx}: path {path:?}");
                    }
                    Err(_) => {
                        assert_eq!(code(got), EINVAL, "{ctx}");
                        assert_eq!(state(&d), from, "{ctx}: a refused request moves nothing");
                    }
                }
            }
        }
    }
    // Raw values beyond the enum.
    let d = dev("mock:v2,size=8K");
    for raw in [8, 9, u32::MAX] {
        assert_eq!(code(d.set_mig_state(raw)), EINVAL);
        assert_eq!(state(&d), Running);
    }
}

#[test]
fn error_is_left_only_by_reset() {
    let d = dev("mock:v2,size=8K,fail-at=set-state@1:error");
    assert_eq!(code(set(&d, Stop)), libc::EIO);
    assert_eq!(state(&d), Error);
    for s in [Stop, Running, StopCopy, Resuming] {
        assert_eq!(code(set(&d, s)), EINVAL, "{s}");
    }
    // A SET of the current state is a no-op, even of ERROR (mtty's loop never runs).
    assert_eq!(code(set(&d, Error)), 0);
    assert_eq!(state(&d), Error);
    d.reset().unwrap();
    assert_eq!(state(&d), Running);
    assert_eq!(d.handle().status().resets, 1);
    // ERROR is never a target.
    assert_eq!(code(set(&d, Error)), EINVAL);
}

#[test]
fn pre_copy_to_stop_copy_keeps_the_pre_copy_fd() {
    for flags in ["0x7", "0x5"] {
        let spec = format!("mock:v2,size=20000,seed=3,page=4096,flags={flags}");
        let d = dev(&spec);
        let fd = set(&d, PreCopy).unwrap().expect("PRE_COPY opens a data fd");
        let info = precopy_info_of(&d, &fd).unwrap();
        let initial = stream_len(20000, 4096) - 16;
        assert_eq!((info.initial_bytes, info.dirty_bytes), (initial, 0));
        // Small reads work: a pipe has no minimum read size.
        let first = read_some(fd.as_fd(), 7).unwrap();
        assert_eq!(first.len(), 7);
        let info = precopy_info_of(&d, &fd).unwrap();
        assert_eq!(info.initial_bytes, initial - 7);
        let mut stream = first;
        stream.extend(read_to_zero(fd.as_fd(), 1000));
        // The end of the pre-copy data is a 0-byte read; the fd stays usable.
        assert_eq!(stream.len() as u64, initial);
        assert!(read_some(fd.as_fd(), 64).unwrap().is_empty());
        let info = precopy_info_of(&d, &fd).unwrap();
        assert_eq!(
            (info.initial_bytes, info.dirty_bytes, info.flags),
            (0, 0, 0)
        );
        assert_eq!(feature::data_size(&d).unwrap(), 16, "only END is left");

        assert!(set(&d, StopCopy).unwrap().is_none(), "{flags}: no new fd");
        assert_eq!(code(precopy_info_of(&d, &fd)), EINVAL);
        stream.extend(read_to_zero(fd.as_fd(), 4096));
        assert!(read_some(fd.as_fd(), 64).unwrap().is_empty(), "EOF stays");
        assert_eq!(feature::data_size(&d).unwrap(), 0);
        let mut dec = decoder_for(&spec);
        dec.feed(&stream).unwrap();
        dec.verify_complete().unwrap();

        set(&d, Stop).unwrap();
        let st = d.handle().status();
        assert_eq!(st.saves_completed, 1);
        assert_eq!(st.bytes_saved, stream.len() as u64);
        assert_eq!(st.data_fds, 1);
    }
}

#[test]
fn pre_copy_data_ends_with_a_zero_read_and_more_follows_when_pages_are_dirtied() {
    let spec = "mock:v2,size=64K,seed=5,page=4K,dirty-rate=1G";
    let src = dev(spec);
    let fd = set(&src, PreCopy).unwrap().unwrap();
    let mut stream = read_to_zero(fd.as_fd(), 3000);
    let mut rounds = 0;
    loop {
        std::thread::sleep(Duration::from_millis(2));
        let info = precopy_info_of(&src, &fd).unwrap();
        assert_eq!(info.initial_bytes, 0);
        if info.dirty_bytes == 0 {
            continue;
        }
        // Dirty data, then again the temporary end.
        let more = read_to_zero(fd.as_fd(), 3000);
        assert_eq!(more.len() as u64, info.dirty_bytes);
        stream.extend(more);
        rounds += 1;
        if rounds == 3 {
            break;
        }
    }
    assert!(src.handle().status().dirtied_pages > 0);
    set(&src, StopCopy).unwrap();
    stream.extend(read_to_zero(fd.as_fd(), 1 << 20));
    set(&src, Stop).unwrap();

    // The destination gets the latest generation of every page.
    let dst = dev(spec);
    let input = set(&dst, Resuming).unwrap().unwrap();
    for piece in stream.chunks(777) {
        write_all(input.as_fd(), piece).unwrap();
    }
    set(&dst, Running).unwrap();
    assert!(dst.handle().status().resumed_ok);
    assert_eq!(src.handle().state_digest(), dst.handle().state_digest());
    assert_ne!(
        dev(spec).handle().state_digest(),
        dst.handle().state_digest()
    );
}

#[test]
fn stop_copy_from_stop_streams_everything_then_eof() {
    let spec = "mock:v2,size=300000,seed=1,page=1000";
    let d = dev(spec);
    let fd = set(&d, StopCopy).unwrap().unwrap();
    let stream = read_to_zero(fd.as_fd(), 65536);
    assert_eq!(stream.len() as u64, stream_len(300000, 1000));
    assert!(read_some(fd.as_fd(), 1).unwrap().is_empty());
    assert_eq!(code(precopy_info_of(&d, &fd)), EINVAL);
    set(&d, Stop).unwrap();
    assert_eq!(d.handle().status().saves_completed, 1);
    // After the session the fd only reads 0.
    assert!(read_some(fd.as_fd(), 1).unwrap().is_empty());
    // A save abandoned halfway is not a completed save.
    let fd = set(&d, StopCopy).unwrap().unwrap();
    read_some(fd.as_fd(), 100).unwrap();
    set(&d, Stop).unwrap();
    assert_eq!(d.handle().status().saves_completed, 1);
    assert!(read_to_zero(fd.as_fd(), 1 << 20).len() < stream.len());
}

#[test]
fn precopy_info_answers_only_for_this_device_s_saving_fd() {
    let a = dev("mock:v2,size=8K");
    let b = dev("mock:v2,size=8K");
    let fd = set(&a, PreCopy).unwrap().unwrap();
    precopy_info_of(&a, &fd).unwrap();
    // Another device, a foreign pipe, a closed fd.
    assert_eq!(code(precopy_info_of(&b, &fd)), libc::ENOTTY);
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert_eq!(code(precopy_info_of(&a, &r)), libc::ENOTTY);
    // A resuming fd has no such ioctl.
    let input = set(&b, Resuming).unwrap().unwrap();
    assert_eq!(code(precopy_info_of(&b, &input)), libc::ENOTTY);
    // An earlier saving fd: EINVAL outside pre-copy, ENODEV during a newer one.
    set(&a, Running).unwrap();
    assert_eq!(code(precopy_info_of(&a, &fd)), EINVAL);
    let fd2 = set(&a, PreCopy).unwrap().unwrap();
    assert_ne!(fd.as_raw_fd(), fd2.as_raw_fd());
    assert_eq!(code(precopy_info_of(&a, &fd)), libc::ENODEV);
    precopy_info_of(&a, &fd2).unwrap();
}

#[test]
fn resume_checks_framing_at_stop_and_content_when_the_device_runs() {
    let spec = "mock:v2,size=40000,seed=1,page=4096";
    let src = dev(spec);
    let fd = set(&src, StopCopy).unwrap().unwrap();
    let stream = read_to_zero(fd.as_fd(), 65536);

    // A wrong seed frames fine, so RESUMING -> STOP passes, but the device refuses to run.
    let wrong = dev("mock:v2,size=40000,seed=2,page=4096");
    let input = set(&wrong, Resuming).unwrap().unwrap();
    write_all(input.as_fd(), &stream).unwrap();
    set(&wrong, Stop).unwrap();
    assert_eq!(code(set(&wrong, Running)), EINVAL);
    let st = wrong.handle().status();
    assert_eq!(st.mig_state(), Some(Error));
    assert!(st.corrupt && !st.resumed_ok, "{st:?}");
    assert!(st.last_refusal.unwrap().contains("does not match"));
    wrong.reset().unwrap();
    assert_eq!(state(&wrong), Running);
    // Writes after RESUMING -> STOP fail: the session is over.
    assert_eq!(code(write_all(input.as_fd(), b"late")), libc::EPIPE);

    // A truncated stream: no END.
    let d = dev(spec);
    let input = set(&d, Resuming).unwrap().unwrap();
    write_all(input.as_fd(), &stream[..stream.len() - 16]).unwrap();
    set(&d, Stop).unwrap();
    assert_eq!(code(set(&d, RunningP2p)), EINVAL);
    assert_eq!(state(&d), Error);

    // Broken framing: RESUMING -> STOP fails and the device stays RESUMING, every time; the
    // mock closes its end, so writes fail with EPIPE.
    let d = dev(spec);
    let input = set(&d, Resuming).unwrap().unwrap();
    let mut bad = stream.clone();
    bad[0] ^= 0xff;
    let mut failed = false;
    for _ in 0..200 {
        if let Err(e) = write_all(input.as_fd(), &bad[..4096]) {
            assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
            failed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(failed, "writes after a framing error must fail");
    assert_eq!(code(set(&d, Stop)), EINVAL);
    assert_eq!(code(set(&d, Running)), EINVAL);
    assert_eq!(state(&d), Resuming);
    assert!(d
        .handle()
        .status()
        .last_refusal
        .unwrap()
        .contains("bad packet magic"));
    d.reset().unwrap();
    assert_eq!(state(&d), Running);

    // A good resume may be saved again without running (STOP -> STOP_COPY verifies too).
    let d = dev(spec);
    let input = set(&d, Resuming).unwrap().unwrap();
    write_all(input.as_fd(), &stream).unwrap();
    drop(input);
    let again = set(&d, StopCopy).unwrap().unwrap();
    assert!(d.handle().status().resumed_ok);
    assert_eq!(read_to_zero(again.as_fd(), 65536), stream);
}

#[test]
fn dma_logging_reports_the_seeded_writes_once() {
    let spec = "mock:v2,size=8K,seed=4,dma-dirty=16";
    let d = dev(spec);
    let ranges = [
        DmaLoggingRange {
            iova: 0x10_0000,
            length: 64 << 12,
        },
        DmaLoggingRange {
            iova: 0x4000_0000,
            length: 32 << 12,
        },
    ];
    // The device tracks at 4 KiB at least.
    assert_eq!(feature::dma_logging_start(&d, 4096, &ranges).unwrap(), 4096);
    assert_eq!(code(feature::dma_logging_start(&d, 4096, &ranges)), EINVAL);
    let report = |d: &MockV2, iova: u64, len: u64, page: u64| -> Vec<u64> {
        let words = vfio_mig::backend::dma_bitmap_words(len, page).unwrap() as usize;
        let mut bitmap = vec![0u64; words];
        feature::dma_logging_report(d, iova, len, page, &mut bitmap).unwrap();
        let mut pages = Vec::new();
        for (w, word) in bitmap.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    pages.push(iova + (w as u64 * 64 + b) * page);
                }
            }
        }
        pages
    };
    let first = report(&d, 0, 0x8000_0000, 4096);
    let written = d.handle().dma_written();
    assert!(!written.is_empty() && written.len() <= 16);
    assert_eq!(first, written, "every written page is reported");
    for p in &first {
        assert!(ranges
            .iter()
            .any(|r| (r.iova..r.iova + r.length).contains(p)));
    }
    // Read-and-clear: a window reports the new writes inside it, and each page once.
    let window = report(&d, 0x10_0000, 64 << 12, 4096);
    for p in &window {
        assert!((0x10_0000..0x10_0000 + (64 << 12)).contains(p));
    }
    let rest = report(&d, 0x4000_0000, 32 << 12, 4096);
    // A stopped device does no DMA: a last report gets what is left, then nothing is.
    set(&d, Stop).unwrap();
    let last = report(&d, 0, 0x8000_0000, 4096);
    assert!(report(&d, 0, 0x8000_0000, 4096).is_empty());
    let mut all: Vec<u64> = [first.clone(), window, rest, last].concat();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, d.handle().dma_written(), "every write reported");
    // Deterministic from the seed: a twin device reports the same first bitmap.
    let twin = dev(spec);
    feature::dma_logging_start(&twin, 4096, &ranges).unwrap();
    assert_eq!(report(&twin, 0, 0x8000_0000, 4096), first);
    let other = dev("mock:v2,size=8K,seed=5,dma-dirty=16");
    feature::dma_logging_start(&other, 4096, &ranges).unwrap();
    assert_ne!(report(&other, 0, 0x8000_0000, 4096), first);
    // Coarser report pages cover the written 4 KiB pages.
    let coarse = report(&twin, 0, 0x8000_0000, 1 << 20);
    assert!(!coarse.is_empty());
    let st = d.handle().status();
    assert!(st.dma_logging && st.dma_pages_dirtied == 48 && st.dma_bits_reported > 0);
    feature::dma_logging_stop(&d).unwrap();
    assert!(!d.handle().status().dma_logging);
    let mut bitmap = vec![0u64; 1];
    assert_eq!(
        code(feature::dma_logging_report(&d, 0, 4096, 4096, &mut bitmap)),
        EINVAL
    );
    // Stop twice is fine.
    feature::dma_logging_stop(&d).unwrap();
}

#[test]
fn dma_logging_start_checks_the_ranges_as_the_core() {
    let d = dev("mock:v2,size=8K");
    let raw =
        |page: u64, ranges: &[DmaLoggingRange]| -> i32 { code(d.dma_logging_start(ranges, page)) };
    let r = |iova, length| DmaLoggingRange { iova, length };
    assert_eq!(raw(4096, &[]), EINVAL);
    assert_eq!(raw(4096, &[r(0x1000, 0x2000), r(0x2000, 0x1000)]), EINVAL);
    assert_eq!(raw(4096, &[r(0x1800, 0x1000)]), EINVAL);
    assert_eq!(raw(4096, &[r(0x1000, 0x1800)]), EINVAL);
    assert_eq!(raw(4096, &[r(u64::MAX - 0xfff, 0x2000)]), libc::EOVERFLOW);
    assert_eq!(raw(3000, &[r(0, 3000)]), EINVAL);
    let many: Vec<DmaLoggingRange> = (0..257).map(|i| r(i << 20, 4096)).collect();
    assert_eq!(raw(4096, &many), libc::E2BIG);
    // A smaller hint is raised to the device's 4 KiB.
    assert_eq!(d.dma_logging_start(&[r(0, 8192)], 1024).unwrap(), 4096);
    // Reports: page size at least 4 KiB and a power of two, no overflow.
    let mut bitmap = [0u64; 4];
    let mut rep = |iova: u64, len: u64, page: u64| -> i32 {
        code(d.dma_logging_report(iova, len, page, &mut bitmap))
    };
    assert_eq!(rep(0, 8192, 2048), EINVAL);
    assert_eq!(rep(0, 8192, 12288), EINVAL);
    assert_eq!(rep(u64::MAX, 2, 4096), libc::EOVERFLOW);
    assert_eq!(rep(0, 8192, 4096), 0);
}

/// Sets up a device so that `field` can be accessed repeatedly; returns the access.
type Access = Box<dyn Fn(&MockV2, &OwnedFd) -> io::Result<()>>;

fn access(field: &str) -> (Option<MigState>, Access) {
    match field {
        "migration" => (None, Box::new(|d, _| feature::migration_flags(d).map(drop))),
        "get-state" => (None, Box::new(|d, _| feature::get_state(d).map(drop))),
        // Each access is one arc: RUNNING <-> RUNNING_P2P.
        "set-state" => (
            None,
            Box::new(|d, _| {
                let to = if state(d) == Running {
                    RunningP2p
                } else {
                    Running
                };
                set(d, to).map(drop)
            }),
        ),
        "data-size" => (None, Box::new(|d, _| feature::data_size(d).map(drop))),
        "precopy-info" => (
            Some(PreCopy),
            Box::new(|d, fd| precopy_info_of(d, fd).map(drop)),
        ),
        "dma-logging" => (None, Box::new(|d, _| feature::dma_logging_stop(d))),
        "reset" => (None, Box::new(|d, _| d.reset())),
        f => panic!("no access for {f}"),
    }
}

#[test]
fn each_fault_fires_on_exactly_the_nth_access() {
    for field in [
        "migration",
        "get-state",
        "set-state",
        "data-size",
        "precopy-info",
        "dma-logging",
        "reset",
    ] {
        let (setup, acc) = access(field);
        let d = dev(&format!("mock:v2,size=8K,fail-at={field}@2:ETIMEDOUT"));
        // The setup walk may access get-state or set-state already: count from there.
        let fd = match setup {
            Some(s) => set(&d, s).unwrap().unwrap(),
            None => nix::unistd::pipe().unwrap().0,
        };
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(code(acc(&d, &fd)));
        }
        assert_eq!(got[1], libc::ETIMEDOUT, "{field}: {got:?}");
        assert!(
            got[0] != libc::ETIMEDOUT && got[2] != libc::ETIMEDOUT,
            "{field}: {got:?}"
        );
        let st = d.handle().status();
        assert_eq!(st.fault_hits, 1, "{field}");
        assert!(st.last_refusal.unwrap().contains(field), "{field}");
    }
}

#[test]
fn set_state_faults_stop_the_walk_at_the_failing_arc() {
    // RUNNING -> STOP walks RUNNING_P2P first; the arc into STOP fails.
    let d = dev("mock:v2,size=8K,fail-at=set-state:STOP@1:EAGAIN");
    assert_eq!(code(set(&d, StopCopy)), libc::EAGAIN);
    assert_eq!(state(&d), RunningP2p);
    assert!(
        set(&d, StopCopy).unwrap().is_some(),
        "the second arc into STOP passes"
    );
    // :error drops the device into ERROR at the failing arc.
    let d = dev("mock:v2,size=8K,fail-at=set-state:RESUMING@1:error");
    assert_eq!(code(set(&d, Resuming)), libc::EIO);
    assert_eq!(state(&d), Error);
    assert_eq!(d.handle().status().data_fds, 0);
    // A get-state fault with :error, and a failed reset.
    let d = dev("mock:v2,size=8K,fail-at=get-state@1:error,fail-at=reset@1:ENODEV");
    assert_eq!(code(feature::get_state(&d)), libc::EIO);
    assert_eq!(state(&d), Error);
    assert_eq!(code(d.reset()), libc::ENODEV);
    assert_eq!(state(&d), Error);
    d.reset().unwrap();
    assert_eq!(state(&d), Running);
}

#[test]
fn a_data_read_fault_cuts_the_stream_and_fails_the_save_once() {
    // Blocks of 4 KiB: the third is never produced.
    let d = dev("mock:v2,size=64K,chunk=4K,fail-at=data-read@3");
    let fd = set(&d, StopCopy).unwrap().unwrap();
    assert_eq!(read_to_zero(fd.as_fd(), 65536).len(), 8192);
    assert_eq!(code(set(&d, Stop)), libc::EIO);
    assert_eq!(state(&d), StopCopy);
    set(&d, Stop).unwrap();
    assert_eq!(d.handle().status().saves_completed, 0);

    // In pre-copy: the temporary end comes early, then PRECOPY_INFO reports the error; the
    // device may still be taken back to RUNNING.
    let d = dev("mock:v2,size=64K,chunk=4K,fail-at=data-read@2:ENOSPC");
    let fd = set(&d, PreCopy).unwrap().unwrap();
    assert_eq!(read_to_zero(fd.as_fd(), 65536).len(), 4096);
    assert_eq!(code(precopy_info_of(&d, &fd)), libc::ENOSPC);
    assert_eq!(code(precopy_info_of(&d, &fd)), libc::ENOSPC);
    set(&d, Running).unwrap();

    // With :error the device fails as the block is due.
    let d = dev("mock:v2,size=64K,chunk=4K,fail-at=data-read@1:error");
    let fd = set(&d, StopCopy).unwrap().unwrap();
    assert!(read_to_zero(fd.as_fd(), 65536).is_empty());
    assert_eq!(state(&d), Error);
    assert_eq!(code(set(&d, Stop)), EINVAL);
}

#[test]
fn a_data_write_fault_refuses_the_rest_of_the_stream() {
    let spec = "mock:v2,size=64K,chunk=4K";
    let src = dev(spec);
    let fd = set(&src, StopCopy).unwrap().unwrap();
    let stream = read_to_zero(fd.as_fd(), 65536);
    let d = dev(&format!("{spec},fail-at=data-write@2:ENOSPC"));
    let input = set(&d, Resuming).unwrap().unwrap();
    // The whole stream fits the pipe, so the writes may all pass before the consumer sees
    // the failing block; a write after that fails.
    let _ = write_all(input.as_fd(), &stream);
    assert_eq!(code(set(&d, Stop)), libc::ENOSPC);
    assert_eq!(code(set(&d, Stop)), libc::ENOSPC, "sticky until reset");
    assert_eq!(state(&d), Resuming);
    assert_eq!(d.handle().status().bytes_loaded, 4096);
    assert_eq!(code(write_all(input.as_fd(), b"more")), libc::EPIPE);
    d.reset().unwrap();
    assert_eq!(state(&d), Running);

    // With :error the device fails as the consumer meets the block: the SET sees that as
    // the fault's EIO, or, when the failure came first, as a SET in ERROR.
    let d = dev(&format!("{spec},fail-at=data-write@1:error"));
    let input = set(&d, Resuming).unwrap().unwrap();
    let _ = write_all(input.as_fd(), &stream);
    let got = code(set(&d, Stop));
    assert!(got == libc::EIO || got == EINVAL, "{got}");
    assert_eq!(state(&d), Error);
}

#[test]
fn dropping_the_device_ends_its_sessions() {
    // A feeder blocked on a full pipe, a consumer waiting for data: both end with the device.
    let src = dev("mock:v2,size=16M");
    let out = set(&src, StopCopy).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(10));
    let dst = dev("mock:v2,size=16M");
    let input = set(&dst, Resuming).unwrap().unwrap();
    drop(src);
    drop(dst);
    let got = read_to_zero(out.as_fd(), 1 << 20);
    assert!((got.len() as u64) < stream_len(16 << 20, 4096));
    assert_eq!(code(write_all(input.as_fd(), b"x")), libc::EPIPE);
    // A reset ends them too.
    let d = dev("mock:v2,size=16M");
    let out = set(&d, PreCopy).unwrap().unwrap();
    d.reset().unwrap();
    let _ = read_to_zero(out.as_fd(), 1 << 20);
    assert_eq!(state(&d), Running);
}

/// The program of issue 11 handed the mock a DMA_LOGGING_START buffer whose range address
/// was 0x10 and crashed (SIGSEGV) without any `unsafe`. The typed operations take the ranges
/// and the bitmap as slices: the nearest call is a range at 0x10, refused as the kernel's
/// core refuses it, and a report into a bitmap too short for the range is refused instead of
/// writing past it.
#[test]
fn bad_dma_logging_arguments_are_errors_not_memory_accesses() {
    let d = dev("mock:v2,size=8K");
    let r = |iova, length| DmaLoggingRange { iova, length };
    // Not page aligned (IS_ALIGNED in vfio_ioctl_device_feature_logging_start).
    assert_eq!(code(d.dma_logging_start(&[r(0x10, 0x1000)], 4096)), EINVAL);
    assert_eq!(code(d.dma_logging_start(&[r(0x10, 0)], 4096)), EINVAL);
    assert_eq!(d.dma_logging_start(&[r(0, 1 << 30)], 4096).unwrap(), 4096);
    // 1 GiB at 4 KiB pages is 262144 bits, 4096 words: one word is far too short, and an
    // empty bitmap too, through the trait and through the checked wrapper alike.
    for len in [0, 1] {
        let mut bitmap = vec![0u64; len];
        assert_ne!(code(d.dma_logging_report(0, 1 << 30, 4096, &mut bitmap)), 0);
        assert_ne!(
            code(feature::dma_logging_report(
                &d,
                0,
                1 << 30,
                4096,
                &mut bitmap
            )),
            0
        );
    }
    let mut bitmap = vec![0u64; 4096];
    d.dma_logging_report(0, 1 << 30, 4096, &mut bitmap).unwrap();
}
