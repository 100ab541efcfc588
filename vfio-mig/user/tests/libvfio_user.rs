// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vfio-mig migrating libvfio-user's sample server device to a second sample server, with
//! the state checked through the socket: the oracle is the server itself (it aborts unless it
//! received exactly its whole state) and its BARs read back over vfio-user.

mod common;

use std::sync::Arc;

use common::*;
use vfio_mig::backend::DeviceIo;
use vfio_mig::{backend::v2_state::MigState, backend::V2Device};
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;

fn v2(dev: &Arc<vfio_mig_user::VfioUserDevice>) -> V2Device {
    V2Device::open(dev.clone() as Arc<dyn DeviceIo>).unwrap()
}

fn migrate(live: bool) {
    if skipped() {
        return;
    }
    let (mut a, mut b) = (Server::start(), Server::start());
    let (src_io, dst_io) = (a.connect(), b.connect());
    let (bar0, bar1) = prime(src_io.as_ref(), 7);
    // The destination starts with other content, so that a copy is visible.
    let before = read_region(dst_io.as_ref(), BAR1, BAR1_SIZE);
    assert_ne!(before, bar1);
    let (mut src, mut dst) = (v2(&src_io), v2(&dst_io));
    let opts = SaveOptions {
        live,
        ..SaveOptions::default()
    };
    let report = migrate_local(&mut src, &mut dst, &opts, &NoObserver, &NoObserver)
        .unwrap_or_else(|e| panic!("{e}\nsource: {}\ndestination: {}", a.log(), b.log()));
    assert_eq!(dst.state().unwrap(), MigState::Running);
    assert_eq!(src.state().unwrap(), MigState::Stop);
    assert_eq!(read_region(dst_io.as_ref(), BAR1, BAR1_SIZE), bar1);
    assert_eq!(bar0_value(dst_io.as_ref()), bar0);
    if live {
        assert_eq!(report.save.pre_copy_bytes, 0, "{report:?}");
        // The sample logs "transition to device state 3" (VFU_MIGR_STATE_PRE_COPY).
        assert!(
            a.log().contains("transition to device state 3"),
            "{}",
            a.log()
        );
    } else {
        assert!(
            !a.log().contains("transition to device state 3"),
            "{}",
            a.log()
        );
    }
    // Both servers are alive (an incomplete state aborts the sample) and end cleanly when
    // their client hangs up.
    drop((src, dst, src_io, dst_io));
    assert!(a.wait_exit().success(), "{}", a.log());
    assert!(b.wait_exit().success(), "{}", b.log());
}

#[test]
fn stop_and_copy_between_two_sample_servers() {
    migrate(false);
}

/// vfio-user has no `VFIO_MIG_GET_PRECOPY_INFO`: as QEMU does when that ioctl fails
/// (`vfio_query_precopy_size` leaves both sizes 0), pre-copy counts no pending bytes, so the
/// engine enters PRE_COPY while the device runs and switches to stop-and-copy without
/// reading pre-copy data.
#[test]
fn live_between_two_sample_servers() {
    migrate(true);
}

/// The same through a saved file: the front door's source saves into a stream file, and
/// [`resume`](vfio_mig::resume) loads it and runs the destination.
#[test]
fn through_a_saved_file() {
    use vfio_mig::{resume, DestinationOptions, Epoch, Source, SourceOptions};
    if skipped() {
        return;
    }
    let (mut a, mut b) = (Server::start(), Server::start());
    let (src_io, dst_io) = (a.connect(), b.connect());
    let (bar0, bar1) = prime(src_io.as_ref(), 9);
    let (mut src, mut dst) = (v2(&src_io), v2(&dst_io));
    let file = tempfile::NamedTempFile::new().unwrap();
    let opts = SourceOptions::new(Epoch(1)).pre_copy(false);
    let mut source = Source::start(vec![&mut src], &opts).unwrap();
    source.switch_over(&mut file.reopen().unwrap()).unwrap();
    drop(source.finish());
    assert_eq!(src.state().unwrap(), MigState::Stop);
    resume(
        &mut [&mut dst],
        file.reopen().unwrap(),
        &DestinationOptions::new(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", b.log()));
    assert_eq!(dst.state().unwrap(), MigState::Running);
    assert_eq!(read_region(dst_io.as_ref(), BAR1, BAR1_SIZE), bar1);
    assert_eq!(bar0_value(dst_io.as_ref()), bar0);
    drop((src, dst, src_io, dst_io));
    assert!(a.wait_exit().success(), "{}", a.log());
    assert!(b.wait_exit().success(), "{}", b.log());
}

/// Kills a server (SIGKILL to the process this test started) at its side's Nth engine event.
struct KillAt {
    nth: usize,
    pid: u32,
    seen: std::sync::atomic::AtomicUsize,
}

impl vfio_mig::Observer for KillAt {
    fn on_event(&self, _: &vfio_mig::Event) {
        if self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == self.nth {
            let pid = nix::unistd::Pid::from_raw(self.pid as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        }
    }
}

/// A sample server killed at each step of a live migration, on either side: the error is one
/// line naming a step, and a surviving destination never runs; a surviving source runs or
/// the error says why not.
#[test]
fn a_server_killed_at_each_step() {
    if skipped() {
        return;
    }
    let counting = KillAt {
        nth: usize::MAX,
        pid: 0,
        seen: Default::default(),
    };
    {
        let (a, b) = (Server::start(), Server::start());
        let (src_io, dst_io) = (a.connect(), b.connect());
        prime(src_io.as_ref(), 1);
        let (mut src, mut dst) = (v2(&src_io), v2(&dst_io));
        let opts = SaveOptions {
            live: true,
            ..SaveOptions::default()
        };
        migrate_local(&mut src, &mut dst, &opts, &counting, &NoObserver).unwrap();
    }
    let events = counting.seen.into_inner();
    assert!(events >= 4, "{events} events");
    for on_source in [true, false] {
        for nth in 1..=events {
            let (mut a, mut b) = (Server::start(), Server::start());
            let (src_io, dst_io) = (a.connect(), b.connect());
            let (_, bar1) = prime(src_io.as_ref(), 3);
            let (mut src, mut dst) = (v2(&src_io), v2(&dst_io));
            let kill = KillAt {
                nth,
                pid: if on_source { a.pid() } else { b.pid() },
                seen: Default::default(),
            };
            let opts = SaveOptions {
                live: true,
                ..SaveOptions::default()
            };
            // The events are the source's; the kill hits either server at that moment.
            let result = migrate_local(&mut src, &mut dst, &opts, &kill, &NoObserver);
            let context = format!(
                "{} killed at source event {nth}",
                if on_source { "source" } else { "destination" }
            );
            match result {
                Ok(_) => {
                    assert_eq!(
                        read_region(dst_io.as_ref(), BAR1, BAR1_SIZE),
                        bar1,
                        "{context}"
                    );
                }
                Err(e) => {
                    let text = vfio_mig::error::Report(&e).to_string();
                    assert!(
                        !text.contains('\n') && text.contains(": "),
                        "{context}: {text}"
                    );
                    if b.alive() {
                        let state = dst_io.mig_state();
                        assert!(
                            state
                                .as_ref()
                                .map_or(true, |&s| s != MigState::Running.raw()),
                            "{context}: the destination runs: {text}"
                        );
                    }
                    if a.alive() {
                        if let Ok(s) = src_io.mig_state() {
                            assert!(
                                s == MigState::Running.raw()
                                    || text.contains("could not be recovered")
                                    || text.contains("failed"),
                                "{context}: source in {s}: {text}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// libvfio-user's own sample `client` migrating the same server (it forks the destination
/// server itself, as `SOCK_migrated`): the server accepts its device too. What the two
/// clients do differently is in docs/vfio-user.md.
#[test]
fn the_sample_client_migrates_the_same_server() {
    if skipped() {
        return;
    }
    let a = Server::start();
    let out = std::process::Command::new(samples().join("client"))
        .arg(&a.sock)
        .output()
        .expect("run libvfio-user's sample client");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\nsource: {}", a.log());
    // The source went PRE_COPY (3), STOP_COPY (2), STOP (0) in libvfio-user's numbering; the
    // destination (its log is the client's stderr) RESUME (4), STOP (0), RUNNING (1).
    let source = a.log();
    let order = ["device state 3", "device state 2", "device state 0"];
    let at: Vec<usize> = order.iter().map(|s| source.find(s).unwrap()).collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{source}");
    let dest = err.find("device state 4").expect("destination resumed");
    assert!(err[dest..].contains("device state 1"), "{err}");
}

/// DMA logging as libvfio-user's server takes it: START at one page size, a second START at
/// another refused (it read the first one's page size), STOP, then START at the other size.
/// A REPORT needs DMA mappings, which this client never makes: the server's error reply is
/// an errno and the connection stays usable.
#[test]
fn dma_logging_against_the_sample_server() {
    use vfio_mig::backend::DmaLoggingRange;
    if skipped() {
        return;
    }
    let a = Server::start();
    let dev = a.connect();
    let ranges = [DmaLoggingRange {
        iova: 0x10000,
        length: 0x10000,
    }];
    assert_eq!(dev.dma_logging_start(&ranges, 4096).unwrap(), 4096);
    let again = dev.dma_logging_start(&ranges, 8192).unwrap_err();
    assert_eq!(again.raw_os_error(), Some(libc::EINVAL), "{again}");
    dev.dma_logging_stop().unwrap();
    assert_eq!(dev.dma_logging_start(&ranges, 8192).unwrap(), 8192);
    let mut bitmap = [0u64; 1];
    let report = dev
        .dma_logging_report(0x10000, 0x10000, 8192, &mut bitmap)
        .unwrap_err();
    assert!(report.raw_os_error().is_some(), "{report}");
    dev.dma_logging_stop().unwrap();
    assert_eq!(dev.mig_state().unwrap(), MigState::Running.raw());
}
