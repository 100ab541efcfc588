// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! iommufd HWPT dirty tracking (vfio-mig's `device::hwpt`, vmm-glue's `HwptDirtyPages`)
//! against a real kernel: the iommufd selftest's mock IOMMU (drivers/iommu/iommufd/
//! selftest.c, `CONFIG_IOMMUFD_TEST`, which the iommufd guest kernel enables).
//!
//! The mock IOMMU's domains keep one entry per mock IO page (`MOCK_IO_PAGE_SIZE`, half a CPU
//! page) and a dirty flag in it; `IOMMU_TEST_OP_DIRTY` sets that flag on the pages a bitmap
//! names, as a device's DMA would, and answers how many mapped pages it marked. What the
//! tests expect is what they marked through the kernel, never what the code under test says.
//! `mtty` devices play no part here: the mock device is created by `IOMMU_TEST_OP_MOCK_DOMAIN`.
//!
//! Only the iommufd kernel runs these tests (/init skips the module elsewhere and says so);
//! there every test FAILS when `IOMMU_TEST_CMD` is missing, never passes vacuously.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use iommufd_bindings::iommufd::{
    iommu_ioas_map, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE, IOMMUFD_CMD_BASE, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdIoas};
use nix::errno::Errno;
use vfio_mig::{DirtyHwpt, DirtyRange, ReadMode};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_glue::dirty::{merge_dirty, take_dirty, DirtyTracker, MemoryRange, MemoryRangeTable};
use vmm_glue::iommufd::HwptDirtyPages;

// The test interface below is not uAPI: it is drivers/iommu/iommufd/iommufd_test.h of Linux
// 6.12 (struct iommu_test_cmd and its op numbers), declared here with only the members used.

/// `IOMMU_TEST_OP_MOCK_DOMAIN`: a mock device bound to the iommufd and attached to `id`.
const IOMMU_TEST_OP_MOCK_DOMAIN: u32 = 2;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE`: attach mock device `id` to `pt_id` instead.
const IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;
/// `IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS`: like MOCK_DOMAIN, with device flags.
const IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS: u32 = 12;
/// `IOMMU_TEST_OP_DIRTY`: mark the mock IO pages a bitmap names dirty.
const IOMMU_TEST_OP_DIRTY: u32 = 13;
/// `MOCK_FLAGS_DEVICE_NO_DIRTY`: the mock device's IOMMU lacks IOMMU_CAP_DIRTY_TRACKING.
const MOCK_FLAGS_DEVICE_NO_DIRTY: u32 = 1;
/// `MOCK_APERTURE_START`: the mock domain's aperture starts at 16 MiB.
const MOCK_APERTURE_START: u64 = 1 << 24;

#[repr(C)]
#[derive(Clone, Copy)]
struct MockDomain {
    out_stdev_id: u32,
    out_hwpt_id: u32,
    out_idev_id: u32,
    dev_flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct MockDomainReplace {
    pt_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Dirty {
    flags: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    uptr: u64,
    out_nr_dirty: u64,
}

/// The union of `struct iommu_test_cmd`; its largest member (`dirty`) is 48 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
union Payload {
    mock_domain: MockDomain,
    replace: MockDomainReplace,
    dirty: Dirty,
    size: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IommuTestCmd {
    size: u32,
    op: u32,
    id: u32,
    reserved: u32,
    payload: Payload,
    last: u32,
}

// The kernel takes at least offsetofend(struct iommu_test_cmd, last) bytes.
const _: () = assert!(std::mem::offset_of!(IommuTestCmd, last) == 64);
const _: () = assert!(std::mem::size_of::<IommuTestCmd>() == 72);

// `IOMMU_TEST_CMD` = `_IO(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32)`.
nix::ioctl_readwrite_bad!(
    iommu_test_cmd,
    nix::request_code_none!(IOMMUFD_TYPE, IOMMUFD_CMD_BASE + 32),
    IommuTestCmd
);

/// Runs one `IOMMU_TEST_CMD`, returning the command as the kernel answered it.
fn test_cmd(fd: &IommuFd, op: u32, id: u32, payload: Payload) -> Result<IommuTestCmd, Errno> {
    let mut cmd = IommuTestCmd {
        size: std::mem::size_of::<IommuTestCmd>() as u32,
        op,
        id,
        reserved: 0,
        payload,
        last: 0,
    };
    // SAFETY: `cmd` is a complete struct iommu_test_cmd of the size its `size` field says; the
    // kernel reads it and writes back at most that many bytes. The only pointer it may carry
    // (`dirty.uptr`) is set by `mark_dirty`, which keeps its buffer alive across this call.
    unsafe { iommu_test_cmd(fd.as_raw_fd(), &mut cmd) }?;
    Ok(cmd)
}

fn zero_payload() -> Payload {
    Payload { size: [0; 6] }
}

/// The CPU page size (sysconf), which the tests read dirty bits at.
fn cpu_page() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert!(page > 0, "sysconf(_SC_PAGESIZE) failed");
    page as u64
}

/// The mock IOMMU's page: `MOCK_IO_PAGE_SIZE = PAGE_SIZE / 2` (selftest.c).
fn mock_page() -> u64 {
    cpu_page() / 2
}

/// One mock-domain setup: an iommufd, an IOAS, a mock device attached to it, guest memory
/// DMA-mapped at IOVA = GPA (from `MOCK_APERTURE_START`), and the ids the kernel returned.
struct MockSetup {
    fd: Arc<IommuFd>,
    ioas: IommufdIoas,
    stdev_id: u32,
    idev_id: u32,
    default_hwpt_id: u32,
    mem: GuestMemoryMmap<AtomicBitmap>,
    pages: u64,
}

impl MockSetup {
    /// Creates the mock device on a new IOAS and maps `pages` CPU pages of guest memory.
    fn new(pages: u64) -> Self {
        let fd = Arc::new(IommuFd::new().unwrap_or_else(|e| {
            panic!(
                "opening /dev/iommu: {e}: the iommufd dirty tests need the iommufd guest \
                 kernel (CONFIG_IOMMUFD, CONFIG_IOMMUFD_TEST)"
            )
        }));
        let ioas = IommufdIoas::new(fd.clone()).expect("IOMMU_IOAS_ALLOC");
        let cmd = test_cmd(&fd, IOMMU_TEST_OP_MOCK_DOMAIN, ioas.id(), zero_payload())
            .unwrap_or_else(|e| {
                panic!(
                    "IOMMU_TEST_CMD(MOCK_DOMAIN) on IOAS {}: {e}: this kernel has no \
                     CONFIG_IOMMUFD_TEST (scripts/guest/iommufd-kernel.config enables it)",
                    ioas.id()
                )
            });
        // SAFETY: MOCK_DOMAIN answered in the `mock_domain` member; every member of the union
        // is plain integers, so any bytes are a valid value.
        let md = unsafe { cmd.payload.mock_domain };
        let len = pages * cpu_page();
        let mem: GuestMemoryMmap<AtomicBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(MOCK_APERTURE_START), len as usize)])
                .expect("guest memory");
        let host = mem
            .find_region(GuestAddress(MOCK_APERTURE_START))
            .and_then(|r| r.get_host_address(MemoryRegionAddress(0)).ok())
            .expect("host address of guest memory") as u64;
        let map = iommu_ioas_map {
            size: std::mem::size_of::<iommu_ioas_map>() as u32,
            flags: iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE
                | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
            ioas_id: ioas.id(),
            __reserved: 0,
            user_va: host,
            length: len,
            iova: MOCK_APERTURE_START,
        };
        fd.map_iommu_ioas(&map)
            .unwrap_or_else(|e| panic!("IOMMU_IOAS_MAP of {len:#x} bytes at IOVA 16 MiB: {e}"));
        MockSetup {
            fd,
            ioas,
            stdev_id: md.out_stdev_id,
            idev_id: md.out_idev_id,
            default_hwpt_id: md.out_hwpt_id,
            mem,
            pages,
        }
    }

    /// A dirty-tracking HWPT for the mock device, which is then attached to it.
    fn dirty_hwpt(&self) -> DirtyHwpt {
        let hwpt = DirtyHwpt::alloc(self.fd.clone(), self.idev_id, self.ioas.id())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut payload = zero_payload();
        payload.replace = MockDomainReplace { pt_id: hwpt.id() };
        test_cmd(
            &self.fd,
            IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE,
            self.stdev_id,
            payload,
        )
        .unwrap_or_else(|e| panic!("MOCK_DOMAIN_REPLACE onto HWPT {}: {e}", hwpt.id()));
        hwpt
    }

    /// Destroys the mock device (detaching it), then drops `owner`, which holds the owned
    /// HWPT `hwpt_id` (a [`DirtyHwpt`] or a tracker over one), and checks that its drop
    /// destroyed the HWPT in the kernel.
    fn finish<T>(&self, hwpt_id: u32, owner: T) {
        self.fd
            .destroy_iommu_object(self.stdev_id)
            .unwrap_or_else(|e| panic!("IOMMU_DESTROY of mock device {}: {e}", self.stdev_id));
        drop(owner);
        let gone = DirtyHwpt::from_id(self.fd.clone(), hwpt_id)
            .set_dirty_tracking(false)
            .unwrap_err();
        assert_eq!(
            gone.errno(),
            Some(Errno::ENOENT),
            "HWPT {hwpt_id} still there after its owner was dropped: {gone}"
        );
    }

    /// The whole mapped range at CPU-page granularity.
    fn range(&self) -> DirtyRange {
        DirtyRange::new(MOCK_APERTURE_START, self.pages * cpu_page(), cpu_page()).unwrap()
    }

    /// Marks, through the kernel, one mock IO page of each CPU page in `pages` (the first or
    /// second half, alternating, so that either half must make the CPU page dirty). Returns
    /// the kernel's count of pages it marked.
    fn mark_dirty(&self, hwpt_id: u32, pages: &[u64]) -> Result<u64, Errno> {
        let mock = mock_page();
        let per_cpu_page = cpu_page() / mock;
        let mock_pages = self.pages * per_cpu_page;
        let mut bitmap = vec![0u64; mock_pages.div_ceil(64) as usize];
        for (n, &p) in pages.iter().enumerate() {
            let bit = p * per_cpu_page + (n as u64 % per_cpu_page);
            bitmap[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        let mut payload = zero_payload();
        payload.dirty = Dirty {
            flags: 0,
            iova: MOCK_APERTURE_START,
            length: self.pages * cpu_page(),
            page_size: mock,
            uptr: bitmap.as_ptr() as u64,
            out_nr_dirty: 0,
        };
        // `bitmap` (mock_pages bits) lives until after the call; the kernel reads
        // length / page_size bits of it.
        let cmd = test_cmd(&self.fd, IOMMU_TEST_OP_DIRTY, hwpt_id, payload)?;
        // SAFETY: IOMMU_TEST_OP_DIRTY answered in the `dirty` member (plain integers).
        Ok(unsafe { cmd.payload.dirty.out_nr_dirty })
    }
}

/// The bitmap with exactly `pages` set, `words` long.
fn bitmap_of(pages: &[u64], words: usize) -> Vec<u64> {
    let mut out = vec![0u64; words];
    for &p in pages {
        out[(p / 64) as usize] |= 1 << (p % 64);
    }
    out
}

/// The set bits of a bitmap, for messages.
fn bits(words: &[u64]) -> Vec<u64> {
    (0..words.len() as u64 * 64)
        .filter(|&i| words[(i / 64) as usize] & (1 << (i % 64)) != 0)
        .collect()
}

/// CPU pages the tests mark: first and last, both sides of word boundaries, and a run.
const MARKED: [u64; 10] = [0, 1, 2, 5, 63, 64, 65, 100, 126, 127];
const PAGES: u64 = 128;

#[test]
fn iommufd_dirty_bitmap_reports_what_the_kernel_marked_and_clears_it() {
    let setup = MockSetup::new(PAGES);
    let hwpt = setup.dirty_hwpt();
    let range = setup.range();
    let expected = bitmap_of(&MARKED, range.bitmap_words());

    hwpt.set_dirty_tracking(true)
        .unwrap_or_else(|e| panic!("{e}"));
    // Turning tracking on starts from a clean snapshot.
    let clean = hwpt.read_dirty(&range, ReadMode::Clear).unwrap();
    assert_eq!(
        bits(&clean),
        Vec::<u64>::new(),
        "dirty right after enabling"
    );

    let marked = setup.mark_dirty(hwpt.id(), &MARKED).unwrap();
    assert_eq!(
        marked,
        MARKED.len() as u64,
        "IOMMU_TEST_OP_DIRTY marked count"
    );

    // NO_CLEAR reports and keeps: twice the same answer.
    for round in 0..2 {
        let kept = hwpt.read_dirty(&range, ReadMode::NoClear).unwrap();
        assert_eq!(bits(&kept), MARKED, "NO_CLEAR read {round}");
    }
    // A clearing read reports the same pages, and a second read then finds nothing.
    let first = hwpt.read_dirty(&range, ReadMode::Clear).unwrap();
    assert_eq!(first, expected, "clearing read: {:?}", bits(&first));
    let second = hwpt.read_dirty(&range, ReadMode::Clear).unwrap();
    assert_eq!(
        bits(&second),
        Vec::<u64>::new(),
        "second read after clearing"
    );

    // A stale caller buffer is zeroed, not ORed into.
    setup.mark_dirty(hwpt.id(), &[7]).unwrap();
    let mut buf = vec![u64::MAX; range.bitmap_words() + 1];
    hwpt.read_dirty_into(&range, ReadMode::Clear, &mut buf)
        .unwrap();
    assert_eq!(bits(&buf[..range.bitmap_words()]), vec![7]);
    assert_eq!(
        buf[range.bitmap_words()],
        u64::MAX,
        "word past the range touched"
    );

    hwpt.set_dirty_tracking(false)
        .unwrap_or_else(|e| panic!("{e}"));
    setup.finish(hwpt.id(), hwpt);
}

#[test]
fn iommufd_dirty_bitmap_of_a_subrange_and_at_a_coarser_page_size() {
    let setup = MockSetup::new(PAGES);
    let hwpt = setup.dirty_hwpt();
    let page = cpu_page();
    hwpt.set_dirty_tracking(true)
        .unwrap_or_else(|e| panic!("{e}"));

    // Pages 64..128 only: bits count from the range's own start.
    setup.mark_dirty(hwpt.id(), &MARKED).unwrap();
    let upper = DirtyRange::new(MOCK_APERTURE_START + 64 * page, 64 * page, page).unwrap();
    let got = hwpt.read_dirty(&upper, ReadMode::Clear).unwrap();
    let want: Vec<u64> = MARKED
        .iter()
        .filter(|&&p| p >= 64)
        .map(|p| p - 64)
        .collect();
    assert_eq!(bits(&got), want, "upper half");
    // The lower half was not read, so it was not cleared.
    let all = hwpt.read_dirty(&setup.range(), ReadMode::Clear).unwrap();
    let lower: Vec<u64> = MARKED.iter().copied().filter(|&p| p < 64).collect();
    assert_eq!(bits(&all), lower, "lower half after reading the upper one");

    // Two CPU pages per bit.
    setup.mark_dirty(hwpt.id(), &MARKED).unwrap();
    let coarse = DirtyRange::new(MOCK_APERTURE_START, PAGES * page, 2 * page).unwrap();
    let got = hwpt.read_dirty(&coarse, ReadMode::Clear).unwrap();
    let mut want: Vec<u64> = MARKED.iter().map(|p| p / 2).collect();
    want.dedup();
    assert_eq!(bits(&got), want, "at twice the page size");
    setup.finish(hwpt.id(), hwpt);
}

#[test]
fn iommufd_dirty_pages_merge_into_the_vm_memory_bitmap() {
    let setup = MockSetup::new(PAGES);
    let page = cpu_page();
    let mut tracker = HwptDirtyPages::new(setup.dirty_hwpt());
    let ranges = [MemoryRange {
        gpa: MOCK_APERTURE_START,
        length: PAGES * page,
    }];
    tracker.start(&ranges, page).unwrap();
    // Nothing in vm-memory's bitmap before (a fresh region), nothing from the device yet.
    assert_eq!(take_dirty(&setup.mem, page), MemoryRangeTable::default());

    setup.mark_dirty(tracker.hwpt().id(), &MARKED).unwrap();
    // peek (NO_CLEAR) sees them without consuming them.
    let peeked = tracker.peek(ranges[0], page).unwrap();
    assert_eq!(bits(&peeked), MARKED);
    let (table, outside) = merge_dirty(&mut tracker, &ranges, page, &setup.mem).unwrap();
    assert_eq!(outside, 0);
    // The pages, as guest-physical ranges (IOVA = GPA), merged where adjacent.
    let gpa = |p: u64| MOCK_APERTURE_START + p * page;
    let want = MemoryRangeTable {
        ranges: [(0, 3), (5, 1), (63, 3), (100, 1), (126, 2)]
            .iter()
            .map(|&(p, n)| MemoryRange {
                gpa: gpa(p),
                length: n * page,
            })
            .collect(),
    };
    assert_eq!(table, want, "what the HWPT reported");
    // And vm-memory's bitmap now holds exactly those pages.
    assert_eq!(take_dirty(&setup.mem, page), want, "vm-memory bitmap");
    // The report cleared them in the IOMMU: a second merge adds nothing.
    let (again, _) = merge_dirty(&mut tracker, &ranges, page, &setup.mem).unwrap();
    assert_eq!(again, MemoryRangeTable::default());
    assert_eq!(take_dirty(&setup.mem, page), MemoryRangeTable::default());

    // A range the kernel would refuse never reaches it.
    let bad = MemoryRange {
        gpa: MOCK_APERTURE_START,
        length: PAGES * page,
    };
    assert!(tracker.report(bad, 3 * page).is_err(), "non power of two");
    tracker.stop().unwrap();
    setup.finish(tracker.hwpt().id(), tracker);
}

#[test]
fn iommufd_dirty_tracking_off_marks_and_reports_nothing() {
    let setup = MockSetup::new(PAGES);
    let hwpt = setup.dirty_hwpt();
    let range = setup.range();

    // Before tracking is on, the kernel refuses to mark (selftest.c: EINVAL without
    // MOCK_DIRTY_TRACK), so there is nothing a read could report.
    assert_eq!(setup.mark_dirty(hwpt.id(), &MARKED), Err(Errno::EINVAL));

    hwpt.set_dirty_tracking(true).unwrap();
    assert_eq!(
        setup.mark_dirty(hwpt.id(), &MARKED),
        Ok(MARKED.len() as u64)
    );
    hwpt.set_dirty_tracking(false).unwrap();
    // Off: marking is refused again, and a read reports nothing of the pages marked while it
    // was on. The mock driver refuses the walk with EINVAL (read_and_clear_dirty without
    // MOCK_DIRTY_TRACK); 6.12's iommu_read_and_clear_dirty drops that return value and
    // answers 0 with an untouched bitmap, a kernel that passes it on answers EINVAL.
    assert_eq!(setup.mark_dirty(hwpt.id(), &[3]), Err(Errno::EINVAL));
    match hwpt.read_dirty(&range, ReadMode::Clear) {
        Ok(words) => assert_eq!(bits(&words), Vec::<u64>::new(), "read while off"),
        Err(e) => assert_eq!(e.errno(), Some(Errno::EINVAL), "read while off: {e}"),
    }
    // On again: enabling clears what was left from before (iopt_set_dirty_tracking).
    hwpt.set_dirty_tracking(true).unwrap();
    let words = hwpt.read_dirty(&range, ReadMode::Clear).unwrap();
    assert_eq!(
        bits(&words),
        Vec::<u64>::new(),
        "stale bits after re-enabling"
    );
    hwpt.set_dirty_tracking(false).unwrap();
    setup.finish(hwpt.id(), hwpt);
}

#[test]
fn iommufd_dirty_tracking_is_refused_where_the_domain_cannot_track() {
    let setup = MockSetup::new(PAGES);
    // The mock device's first HWPT was allocated without the dirty flag: no dirty ops.
    let plain = DirtyHwpt::from_id(setup.fd.clone(), setup.default_hwpt_id);
    let e = plain.set_dirty_tracking(true).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EOPNOTSUPP), "{e}");
    let e = plain
        .read_dirty(&setup.range(), ReadMode::Clear)
        .unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EOPNOTSUPP), "{e}");
    drop(plain); // not ours: not destroyed, the device stays attached to it

    // A device whose IOMMU lacks IOMMU_CAP_DIRTY_TRACKING: the dirty HWPT is refused.
    let mut payload = zero_payload();
    payload.mock_domain = MockDomain {
        out_stdev_id: 0,
        out_hwpt_id: 0,
        out_idev_id: 0,
        dev_flags: MOCK_FLAGS_DEVICE_NO_DIRTY,
    };
    let cmd = test_cmd(
        &setup.fd,
        IOMMU_TEST_OP_MOCK_DOMAIN_FLAGS,
        setup.ioas.id(),
        payload,
    )
    .unwrap_or_else(|e| panic!("MOCK_DOMAIN_FLAGS(NO_DIRTY): {e}"));
    // SAFETY: MOCK_DOMAIN_FLAGS answered in the `mock_domain` member (plain integers).
    let no_dirty = unsafe { cmd.payload.mock_domain };
    let e = DirtyHwpt::alloc(setup.fd.clone(), no_dirty.out_idev_id, setup.ioas.id()).unwrap_err();
    assert_eq!(e.errno(), Some(Errno::EOPNOTSUPP), "{e}");
}
