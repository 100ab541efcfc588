// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VMM-side live migration of a guest with memory and a VFIO device, on mock devices.
//!
//! Source and destination "hosts" are two halves of this program: guest memory moves by
//! dirty-page rounds (vm-memory's dirty bitmap holds the vCPUs' writes and, merged into it, the
//! device's DMA writes), the device's state moves through vfio-mig's stream over a socket.
//! The destination checks at the end that its memory equals the source's and that its device
//! resumed with the source's state.
//!
//! Run: `cargo run -p vmm-glue --example live_migration [DEVICE_SPEC]`
//! (default `mock:v2,size=32M,seed=9,dirty-rate=64M,dma-dirty=64`).

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_mig::Backend;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_glue::dirty::{take_dirty, DmaLogging, MemoryRange, MemoryRangeTable};
use vmm_glue::{Migratable, Pausable, Snapshottable, VfioMigratable};

const PAGE: u64 = 4096;
const LOW: u64 = 48 << 20;
const HIGH_BASE: u64 = 0x1_0000_0000;
const HIGH: u64 = 16 << 20;

type Memory = GuestMemoryMmap<AtomicBitmap>;

/// The guest's working set, in pages.
const HOT_PAGES: u64 = 256;

fn guest_memory() -> Memory {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH_BASE), HIGH as usize),
    ])
    .expect("allocate guest memory")
}

/// Copies the given ranges of `src` into `dst` (what a VMM sends over its memory channel).
fn copy_ranges(src: &Memory, dst: &Memory, table: &MemoryRangeTable) -> u64 {
    let mut buf = vec![0u8; PAGE as usize];
    let mut bytes = 0;
    for r in &table.ranges {
        let mut gpa = r.gpa;
        while gpa < r.gpa + r.length {
            src.read_slice(&mut buf, GuestAddress(gpa))
                .expect("read source page");
            dst.write_slice(&buf, GuestAddress(gpa))
                .expect("write destination page");
            gpa += PAGE;
            bytes += PAGE;
        }
    }
    bytes
}

fn all_memory() -> MemoryRangeTable {
    MemoryRangeTable {
        ranges: vec![
            MemoryRange {
                gpa: 0,
                length: LOW,
            },
            MemoryRange {
                gpa: HIGH_BASE,
                length: HIGH,
            },
        ],
    }
}

/// A vCPU writing guest memory until told to pause; writes go through vm-memory, which marks
/// the dirty bitmap as KVM's dirty log would.
fn vcpu(mem: Memory, paused: Arc<AtomicBool>) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut writes = 0;
    while !paused.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Most writes hit a small working set, a few land anywhere: the shape that lets
        // pre-copy converge.
        let total = (LOW + HIGH) / PAGE;
        let page = if x % 16 == 0 {
            x % total
        } else {
            x % HOT_PAGES
        };
        let gpa = if page * PAGE < LOW {
            page * PAGE
        } else {
            HIGH_BASE + page * PAGE - LOW
        };
        mem.write_obj(x, GuestAddress(gpa + (x % (PAGE / 8)) * 8))
            .expect("guest write");
        writes += 1;
        if writes % 1024 == 0 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    writes
}

fn memory_equal(a: &Memory, b: &Memory) -> bool {
    let (mut va, mut vb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    all_memory().ranges.iter().all(|r| {
        (r.gpa..r.gpa + r.length).step_by(va.len()).all(|gpa| {
            a.read_slice(&mut va, GuestAddress(gpa))
                .expect("read source memory");
            b.read_slice(&mut vb, GuestAddress(gpa))
                .expect("read destination memory");
            va == vb
        })
    })
}

fn main() {
    let spec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "mock:v2,size=32M,seed=9,dirty-rate=64M,dma-dirty=64".to_string());
    let started = Instant::now();

    // Source host: guest memory with some content, the device, dirty tracking.
    let src_mem = guest_memory();
    for (i, gpa) in (0..LOW).step_by(PAGE as usize).enumerate() {
        src_mem
            .write_obj(i as u64 ^ 0x5a5a, GuestAddress(gpa))
            .unwrap();
    }
    let (src_opened, src_mock) =
        vfio_mig_mock::open_named(&spec, Backend::Auto).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let src_io = src_opened.io.clone();
    let mut device = VfioMigratable::new("vfio0", src_opened);
    if spec.starts_with("mock:v2") || !spec.starts_with("mock:") {
        device = device.with_dirty_tracking(
            Box::new(DmaLogging::new(src_io)),
            all_memory().ranges,
            PAGE,
        );
    }

    // Destination host: empty memory, a fresh device, restoring from the socket.
    let dst_mem = guest_memory();
    let (dst_opened, dst_mock) =
        vfio_mig_mock::open_named(&spec, Backend::Auto).unwrap_or_else(|e| panic!("{spec}: {e}"));
    let mut dst_device = VfioMigratable::new("vfio0", dst_opened);
    let (tx, rx) = UnixStream::pair().expect("socketpair");
    let restorer = std::thread::spawn(move || {
        let mut rx = rx;
        dst_device.restore(&mut rx)
    });

    // The guest runs during pre-copy.
    let paused = Arc::new(AtomicBool::new(false));
    let vcpu_thread = {
        let (mem, paused) = (src_mem.clone(), paused.clone());
        std::thread::spawn(move || vcpu(mem, paused))
    };

    device.start_dirty_log().expect("start dirty log");
    // Round 0 sends all memory; later rounds what was written since.
    take_dirty(&src_mem, PAGE);
    let mut sent = copy_ranges(&src_mem, &dst_mem, &all_memory());
    device.begin_send(Box::new(tx)).expect("open device stream");
    device.start_migration().expect("device pre-copy");
    let mut round = 0;
    loop {
        round += 1;
        let dev_round = device.precopy_round().expect("device round");
        let (dev_bytes, pending) = (dev_round.sent, dev_round.estimate.pending);
        let device_dirty = device.dirty_log().expect("device dirty log");
        device_dirty.mark_dirty(&src_mem);
        let dirty = take_dirty(&src_mem, PAGE);
        sent += copy_ranges(&src_mem, &dst_mem, &dirty);
        println!(
            "round {round}: memory {} KiB dirty ({} KiB by device DMA), device sent {} KiB, {} KiB pending",
            dirty.bytes() >> 10,
            device_dirty.bytes() >> 10,
            dev_bytes >> 10,
            pending >> 10
        );
        if (dirty.bytes() < (4 << 20) && pending < (256 << 10)) || round == 20 {
            break;
        }
    }

    // Switch over: pause the vCPUs, quiesce every device (pause during a migration), then stop
    // and copy the rest.
    let downtime = Instant::now();
    paused.store(true, Ordering::Relaxed);
    let writes = vcpu_thread.join().expect("vcpu thread");
    device.pause().expect("quiesce (pause during a migration)");
    device.complete_migration().expect("device stop-and-copy");
    // The devices wait in STOP_COPY: their last DMA writes are still logged.
    let device_dirty = device.dirty_log().expect("final device dirty log");
    device_dirty.mark_dirty(&src_mem);
    device.stop_dirty_log().expect("stop dirty log");
    let last = take_dirty(&src_mem, PAGE);
    sent += copy_ranges(&src_mem, &dst_mem, &last);
    restorer
        .join()
        .expect("restore thread")
        .expect("destination device restore");
    // The destination runs the state: the point of no return.
    let stop_failures = device.finish_migration().expect("finish the migration");
    assert!(stop_failures.is_empty(), "{stop_failures:?}");
    let downtime = downtime.elapsed();

    assert!(
        memory_equal(&src_mem, &dst_mem),
        "destination memory differs"
    );
    if let (Some(s), Some(d)) = (src_mock, dst_mock) {
        assert!(d.status().resumed_ok, "destination device did not resume");
        assert_eq!(s.state_digest(), d.state_digest(), "device state differs");
    }
    println!(
        "migrated {} MiB of memory ({} MiB sent, {writes} guest writes) and {spec} in {:.2} s, downtime {:.1} ms: destination memory and device verified",
        (LOW + HIGH) >> 20,
        sent >> 20,
        started.elapsed().as_secs_f64(),
        downtime.as_secs_f64() * 1e3
    );
}
