// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest-only integration tests: they run inside the QEMU guest that `scripts/guest/run.sh`
//! boots, against real mtty mdevs (the kernel's sample mediated device, samples/vfio-mdev/mtty.c).
//!
//! This target has `test = false` in tests/Cargo.toml, so a host `cargo test` never runs it;
//! `cargo test --test guest --no-run` builds it. Run on the host by hand, every test FAILS on
//! purpose: the guest's `/init` provides the environment below, nothing else does.
//!
//! Environment set by the guest's `/init` (scripts/guest/init.sh):
//! - `VFIO_MIG_MTTY_DEVICES`: space-separated sysfs paths `/sys/bus/mdev/devices/<uuid>` of
//!   the mtty mdevs (four of type `mtty-2` by default), each in an IOMMU group of its own.
//! - `VFIO_MIG_BIN`: path of the static `vfio-mig` command (`/bin/vfio-mig`).
//! - `VFIO_MIG_V1_TRAPPED`, `VFIO_MIG_V1_MMAP`, `VFIO_MIG_V1_DEVICES`: the mdevs of our v1
//!   sample module (kmod/mig-v1-sample), used by the `v1_sample` tests.
//! - `iommufd_dirty` tests: no variable; they drive the iommufd selftest's mock IOMMU
//!   (`IOMMU_TEST_CMD`, CONFIG_IOMMUFD_TEST), which only the iommufd guest kernel has; /init
//!   skips them on the Debian kernel and prints that it did.
//! - `VFIO_MIG_BACKEND`: `group` or `iommufd` (or `auto`): how the library, the `vfio-mig`
//!   command and [`mtty::MttyDevice`] open the devices. The harness runs the whole binary once
//!   per backend the guest kernel offers (see docs/guest-tests.md), and
//!   `backend_in_use_is_the_one_requested` makes sure no run silently fell back to another.
//!
//! Tests run one at a time (`--test-threads=1`), so a test may use any device, but must close
//! what it opens (a VFIO group can be open only once at a time).

use std::os::fd::AsRawFd;

#[path = "guest/bench.rs"]
mod bench;
#[path = "guest/migration.rs"]
mod migration;

#[path = "guest/glue.rs"]
mod glue;
#[path = "guest/iommufd_dirty.rs"]
mod iommufd_dirty;
#[path = "guest/precopy.rs"]
mod precopy;
#[path = "guest/signals.rs"]
mod signals;
#[path = "guest/v1_sample.rs"]
mod v1_sample;

use mtty::{mtty_devices, MttyDevice, LSR_DATA_READY, UART_LSR, UART_SCR, UART_TX};
use vfio_mig::Backend;

/// The environment variable the harness sets to pick the backend of a run.
const BACKEND_ENV: &str = "VFIO_MIG_BACKEND";

/// Reusable helpers for guest tests on mtty devices.
#[allow(dead_code)] // Not every helper is used by every test yet.
pub mod mtty {
    use std::fs;
    use std::io;
    use std::mem;
    use std::os::fd::{AsRawFd, RawFd};
    use std::path::{Path, PathBuf};
    use std::sync::Arc;

    use iommufd_ioctls::IommuFd;
    use vfio_bindings::bindings::vfio::{
        vfio_device_feature, vfio_device_feature_migration, VFIO_BASE, VFIO_DEVICE_FEATURE_GET,
        VFIO_DEVICE_FEATURE_MIGRATION, VFIO_TYPE,
    };
    use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd};
    use vfio_mig::Backend;

    /// Environment variable listing the mtty mdevs' sysfs paths.
    pub const DEVICES_ENV: &str = "VFIO_MIG_MTTY_DEVICES";
    /// Environment variable naming the `vfio-mig` command inside the guest.
    pub const BIN_ENV: &str = "VFIO_MIG_BIN";
    /// mdev type the guest creates.
    pub const MTTY_TYPE: &str = "mtty-2";

    /// Region index of port 0 (BAR0); port 1 is region 1 (BAR1) on `mtty-2`.
    pub const PORT0_REGION: u32 = 0;
    /// Region index of port 1 (BAR1).
    pub const PORT1_REGION: u32 = 1;
    /// 16550 register offsets within a port's region.
    pub const UART_RX: u64 = 0;
    /// Transmit holding register (same offset as RX): bytes written land in the port's FIFO.
    pub const UART_TX: u64 = 0;
    /// Line status register.
    pub const UART_LSR: u64 = 5;
    /// Scratch register.
    pub const UART_SCR: u64 = 7;
    /// LSR bit: the receive FIFO holds data.
    pub const LSR_DATA_READY: u8 = 0x01;
    /// mtty's receive FIFO depth.
    pub const FIFO_SIZE: usize = 16;

    /// `VFIO_DEVICE_FEATURE` = `_IO(VFIO_TYPE, VFIO_BASE + 17)`.
    pub const VFIO_DEVICE_FEATURE: libc::c_ulong =
        ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE as libc::c_ulong + 17);

    /// The sysfs paths of the guest's mtty mdevs, from `VFIO_MIG_MTTY_DEVICES`.
    ///
    /// Panics when the variable is absent or empty: outside the guest these tests must fail,
    /// never pass vacuously.
    pub fn mtty_devices() -> Vec<PathBuf> {
        let value = std::env::var(DEVICES_ENV).unwrap_or_default();
        let devices: Vec<PathBuf> = value.split_whitespace().map(PathBuf::from).collect();
        assert!(
            !devices.is_empty(),
            "{DEVICES_ENV} is not set: the guest tests run only inside the QEMU guest of \
             scripts/guest/run.sh (see docs/guest-tests.md)"
        );
        devices
    }

    /// The `vfio-mig` command to run, from `VFIO_MIG_BIN`. Panics when absent.
    pub fn vfio_mig_bin() -> PathBuf {
        let bin = std::env::var_os(BIN_ENV).unwrap_or_else(|| {
            panic!("{BIN_ENV} is not set: the guest tests run only inside the QEMU guest")
        });
        PathBuf::from(bin)
    }

    /// The device's name (its UUID), as `VFIO_GROUP_GET_DEVICE_FD` wants it.
    pub fn device_name(dev: &Path) -> String {
        dev.file_name()
            .unwrap_or_else(|| panic!("{} has no file name", dev.display()))
            .to_string_lossy()
            .into_owned()
    }

    /// The number of the device's IOMMU group (basename of its `iommu_group` link).
    pub fn iommu_group(dev: &Path) -> io::Result<u32> {
        let link = fs::read_link(dev.join("iommu_group"))?;
        let name = link.file_name().unwrap_or_default().to_string_lossy();
        name.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: iommu_group link {} is not a number",
                    dev.display(),
                    link.display()
                ),
            )
        })
    }

    /// The device's mdev type name (basename of its `mdev_type` link), e.g. `mtty-2`.
    pub fn mdev_type(dev: &Path) -> io::Result<String> {
        let link = fs::read_link(dev.join("mdev_type"))?;
        Ok(link
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned())
    }

    /// The backend this run asks for (`VFIO_MIG_BACKEND`, `auto` when unset), panicking on a
    /// bad value.
    pub fn requested_backend() -> Backend {
        vfio_mig_tests::test_backend()
    }

    /// The backend `requested` must end up as on this kernel, decided from /dev and sysfs
    /// directly (not through the library): `auto` is the group when the container and the
    /// device's group node exist, else iommufd.
    pub fn expected_backend(requested: Backend, dev: &Path) -> Backend {
        match requested {
            Backend::Auto => {
                let group_node = iommu_group(dev)
                    .map(|g| Path::new(&format!("/dev/vfio/{g}")).exists())
                    .unwrap_or(false);
                if Path::new("/dev/vfio/vfio").exists() && group_node {
                    Backend::Group
                } else {
                    Backend::Iommufd
                }
            }
            forced => forced,
        }
    }

    /// Whether this kernel offers the iommufd/cdev path for `dev`.
    pub fn iommufd_available(dev: &Path) -> bool {
        Path::new("/dev/iommu").exists() && dev.join("vfio-dev").is_dir()
    }

    /// Whether this kernel offers the container/group path for `dev`.
    pub fn group_available(dev: &Path) -> bool {
        Path::new("/dev/vfio/vfio").exists()
            && iommu_group(dev)
                .map(|g| Path::new(&format!("/dev/vfio/{g}")).exists())
                .unwrap_or(false)
    }

    /// What `/proc/self/fd/<fd>` points to.
    pub fn fd_target(fd: RawFd) -> String {
        fs::read_link(format!("/proc/self/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| format!("? ({e})"))
    }

    /// An mtty device opened through a VFIO container of its own (TYPE1v2 IOMMU) or an iommufd
    /// of its own, as `VFIO_MIG_BACKEND` asks.
    pub struct MttyDevice {
        /// The sysfs path it was opened from.
        pub path: PathBuf,
        /// The backend that opened it (group or iommufd, never auto).
        pub backend: Backend,
        /// The VFIO device; it keeps its group and container (or iommufd) alive, and closes
        /// them on drop.
        pub device: VfioDevice,
    }

    impl std::fmt::Debug for MttyDevice {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MttyDevice")
                .field("path", &self.path)
                .field("backend", &self.backend)
                .finish_non_exhaustive()
        }
    }

    impl MttyDevice {
        /// Opens the device through the backend `VFIO_MIG_BACKEND` asks for (see
        /// [`expected_backend`] for `auto`), with vfio-ioctls directly, not through vfio-mig.
        pub fn open(path: &Path) -> Result<Self, vfio_ioctls::VfioError> {
            Self::open_with(path, expected_backend(requested_backend(), path))
        }

        /// Opens the device through `backend`:
        /// - group: /dev/vfio/vfio, the device's group, attaches the group to the container
        ///   (VFIO_GROUP_SET_CONTAINER, VFIO_SET_IOMMU TYPE1v2) and gets the device fd
        ///   (VFIO_GROUP_GET_DEVICE_FD);
        /// - iommufd: /dev/iommu with a new IOAS, the cdev named by `<sysfs>/vfio-dev/vfioN`
        ///   (vfio-ioctls finds it), VFIO_DEVICE_BIND_IOMMUFD and
        ///   VFIO_DEVICE_ATTACH_IOMMUFD_PT.
        pub fn open_with(path: &Path, backend: Backend) -> Result<Self, vfio_ioctls::VfioError> {
            let device = match backend {
                Backend::Iommufd => {
                    let iommufd = IommuFd::new().map_err(vfio_ioctls::VfioError::NewVfioIommufd)?;
                    let ops = Arc::new(VfioIommufd::new(Arc::new(iommufd), None, None)?);
                    VfioDevice::new(path, ops, true)?
                }
                _ => {
                    let container = Arc::new(VfioContainer::new(None)?);
                    VfioDevice::new(path, container, false)?
                }
            };
            let backend = if backend == Backend::Auto {
                Backend::Group
            } else {
                backend
            };
            Ok(MttyDevice {
                path: path.to_path_buf(),
                backend,
                device,
            })
        }

        /// Like [`MttyDevice::open`], panicking with the device path on error.
        pub fn open_or_panic(path: &Path) -> Self {
            Self::open(path)
                .unwrap_or_else(|e| panic!("opening {} via VFIO: {e:?}", path.display()))
        }

        /// The device file descriptor.
        pub fn fd(&self) -> RawFd {
            self.device.as_raw_fd()
        }

        /// Reads `buf.len()` bytes of region `index` at `offset` (pread on the device fd).
        pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let pos = self.region_pos(index, offset, buf.len())?;
            // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes for the whole call
            // and the fd is owned by `self.device`, which outlives the call.
            let n = unsafe { libc::pread(self.fd(), buf.as_mut_ptr().cast(), buf.len(), pos) };
            check_len(n, buf.len(), "pread")
        }

        /// Writes `buf` into region `index` at `offset` (pwrite on the device fd).
        pub fn region_write(&self, index: u32, offset: u64, buf: &[u8]) -> io::Result<()> {
            let pos = self.region_pos(index, offset, buf.len())?;
            // SAFETY: `buf` is a valid, readable buffer of `buf.len()` bytes for the whole call
            // and the fd is owned by `self.device`, which outlives the call.
            let n = unsafe { libc::pwrite(self.fd(), buf.as_ptr().cast(), buf.len(), pos) };
            check_len(n, buf.len(), "pwrite")
        }

        /// Reads one UART register of a port (`region` 0 or 1).
        pub fn read_reg(&self, region: u32, reg: u64) -> io::Result<u8> {
            let mut b = [0u8];
            self.region_read(region, reg, &mut b)?;
            Ok(b[0])
        }

        /// Writes one UART register of a port (`region` 0 or 1).
        pub fn write_reg(&self, region: u32, reg: u64, value: u8) -> io::Result<()> {
            self.region_write(region, reg, &[value])
        }

        /// Empties the port's receive FIFO; returns the bytes it held.
        pub fn drain_rx(&self, region: u32) -> io::Result<Vec<u8>> {
            let mut out = Vec::new();
            while self.read_reg(region, UART_LSR)? & LSR_DATA_READY != 0 {
                out.push(self.read_reg(region, UART_RX)?);
                if out.len() > 4 * FIFO_SIZE {
                    return Err(io::Error::other("receive FIFO never empties"));
                }
            }
            Ok(out)
        }

        /// VFIO_DEVICE_FEATURE with GET | MIGRATION: the device's migration flags
        /// (VFIO_MIGRATION_STOP_COPY | P2P | PRE_COPY ...).
        pub fn migration_flags(&self) -> io::Result<u64> {
            #[repr(C)]
            struct Feature {
                hdr: vfio_device_feature,
                mig: vfio_device_feature_migration,
            }
            // The payload must follow the 8-byte header directly.
            const _: () =
                assert!(mem::offset_of!(Feature, mig) == mem::size_of::<vfio_device_feature>());
            let mut arg = Feature {
                hdr: vfio_device_feature {
                    argsz: mem::size_of::<Feature>() as u32,
                    flags: VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION,
                    ..Default::default()
                },
                mig: vfio_device_feature_migration { flags: 0 },
            };
            // SAFETY: `arg` is a properly laid out vfio_device_feature header followed by its
            // vfio_device_feature_migration payload; argsz covers exactly both, and the kernel
            // writes at most argsz bytes. The fd is owned by `self.device`.
            let ret = unsafe { libc::ioctl(self.fd(), VFIO_DEVICE_FEATURE as _, &mut arg) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(arg.mig.flags)
        }

        fn region_pos(&self, index: u32, offset: u64, len: usize) -> io::Result<libc::off_t> {
            let size = self.device.get_region_size(index);
            let in_range = matches!(offset.checked_add(len as u64), Some(end) if end <= size);
            if !in_range {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("region {index}: {len} bytes at {offset} exceed its size {size}"),
                ));
            }
            let pos = self.device.get_region_offset(index) + offset;
            libc::off_t::try_from(pos)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region offset too large"))
        }
    }

    fn check_len(n: isize, want: usize, what: &str) -> io::Result<()> {
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != want {
            return Err(io::Error::other(format!(
                "short {what}: {n} of {want} bytes"
            )));
        }
        Ok(())
    }
}

#[test]
fn four_mtty2_devices_with_their_own_vfio_groups() {
    let devices = mtty_devices();
    assert!(
        devices.len() >= 4,
        "need at least 4 mtty devices, got {devices:?}"
    );
    let mut groups = Vec::new();
    for dev in &devices {
        assert!(dev.is_dir(), "{} does not exist", dev.display());
        let ty =
            mtty::mdev_type(dev).unwrap_or_else(|e| panic!("{}: mdev_type: {e}", dev.display()));
        assert_eq!(ty, mtty::MTTY_TYPE, "{}", dev.display());
        let api = std::fs::read_to_string(dev.join("mdev_type/device_api")).unwrap();
        assert_eq!(api.trim(), "vfio-pci", "{}", dev.display());
        let group = mtty::iommu_group(dev).unwrap_or_else(|e| panic!("{}: {e}", dev.display()));
        let node = std::path::PathBuf::from(format!("/dev/vfio/{group}"));
        assert!(
            node.exists(),
            "{} missing for {}",
            node.display(),
            dev.display()
        );
        groups.push(group);
    }
    let mut unique = groups.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        groups.len(),
        "devices share IOMMU groups: {groups:?}"
    );
    assert!(
        std::path::Path::new("/dev/vfio/vfio").exists(),
        "/dev/vfio/vfio missing"
    );
}

#[test]
fn vfio_mig_binary_runs() {
    let bin = mtty::vfio_mig_bin();
    let out = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("running {} --help: {e}", bin.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("Usage"),
        "{} --help: {:?}\nstdout: {stdout}\nstderr: {}",
        bin.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mtty_reports_migration_v2_flags() {
    for dev in mtty_devices() {
        let d = MttyDevice::open_or_panic(&dev);
        assert!(d.fd() >= 0 && d.device.as_raw_fd() == d.fd());
        let flags = d.migration_flags().unwrap_or_else(|e| {
            panic!("{}: VFIO_DEVICE_FEATURE GET|MIGRATION: {e}", dev.display())
        });
        assert_eq!(
            flags,
            0x7,
            "{}: STOP_COPY | P2P | PRE_COPY expected",
            dev.display()
        );
    }
}

#[test]
fn bar_registers_read_back() {
    let dev = &mtty_devices()[0];
    let d = MttyDevice::open_or_panic(dev);
    for region in [mtty::PORT0_REGION, mtty::PORT1_REGION] {
        d.drain_rx(region).unwrap();
        let scratch = 0x5a ^ region as u8;
        d.write_reg(region, UART_SCR, scratch).unwrap();
        assert_eq!(
            d.read_reg(region, UART_SCR).unwrap(),
            scratch,
            "scratch of port {region}"
        );

        let bytes = [b'v', b'f', b'i', b'o', region as u8];
        for b in bytes {
            d.write_reg(region, UART_TX, b).unwrap();
        }
        assert_ne!(d.read_reg(region, UART_LSR).unwrap() & LSR_DATA_READY, 0);
        assert_eq!(d.drain_rx(region).unwrap(), bytes, "FIFO of port {region}");
    }
    // Out of range accesses are refused by the helper, not sent to the kernel.
    assert!(d.region_read(0, 8, &mut [0u8]).is_err());
}

/// Runs `vfio-mig probe --json DEV` with `extra` arguments before `probe`.
fn probe_json(extra: &[&str], dev: &std::path::Path) -> std::process::Output {
    let out = std::process::Command::new(mtty::vfio_mig_bin())
        .args(extra)
        .args(["probe", "--json"])
        .arg(dev)
        .output()
        .expect("run vfio-mig probe");
    eprintln!(
        "$ vfio-mig {} probe --json {}\n{}{}",
        extra.join(" "),
        dev.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Checks that a device fd (its `/proc/self/fd` target) is what `backend` opens: the cdev for
/// iommufd, the anonymous device file of `VFIO_GROUP_GET_DEVICE_FD` for the group.
fn assert_fd_matches(backend: Backend, target: &str, context: &str) {
    match backend {
        Backend::Iommufd => assert!(
            target.starts_with("/dev/vfio/devices/vfio"),
            "{context}: iommufd device fd is {target}, not a /dev/vfio/devices cdev"
        ),
        _ => assert_eq!(
            target, "anon_inode:[vfio-device]",
            "{context}: group device fd is {target}"
        ),
    }
}

#[test]
fn backend_in_use_is_the_one_requested() {
    // The harness names the backend of every run: without it this run would test `auto` only.
    let requested = mtty::requested_backend();
    assert!(
        std::env::var_os(BACKEND_ENV).is_some(),
        "{BACKEND_ENV} is not set: the harness must say which backend a run tests"
    );
    eprintln!("requested backend: {requested}");
    for dev in mtty_devices() {
        let expected = mtty::expected_backend(requested, &dev);
        let ctx = format!("{} ({BACKEND_ENV}={requested})", dev.display());

        // The library (what the migration tests use).
        let opened = vfio_mig_tests::open_device(dev.to_str().unwrap())
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        let access = opened
            .access
            .clone()
            .expect("a real device reports its access");
        assert_eq!(access.backend, expected, "{ctx}: library: {access:?}");
        let lib_fd = access
            .detail
            .rsplit("device fd ")
            .next()
            .unwrap_or_default();
        assert_fd_matches(expected, lib_fd, &ctx);
        drop(opened);
        // The device layer alone (what the v1 sample tests use).
        let io = vfio_mig::VfioDeviceIo::open_with(&dev, requested)
            .unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(io.access().backend, expected, "{ctx}: VfioDeviceIo");
        // The same device from its fd, as a VMM hands it over (a dup; the container or
        // iommufd and its maps stay with `io`): the backend is recognized from the fd, and
        // the migration interface answers through it.
        let dup = std::os::fd::AsFd::as_fd(&io)
            .try_clone_to_owned()
            .unwrap_or_else(|e| panic!("{ctx}: dup the device fd: {e}"));
        let from_fd = vfio_mig::VfioDeviceIo::from_fd(dup, &dev)
            .unwrap_or_else(|e| panic!("{ctx}: from_fd: {e}"));
        assert_eq!(from_fd.access().backend, expected, "{ctx}: from_fd");
        let mut v2 = vfio_mig::backend::V2Device::open(std::sync::Arc::new(from_fd))
            .unwrap_or_else(|e| panic!("{ctx}: v2 through the fd: {e}"));
        assert_eq!(
            v2.state().unwrap(),
            vfio_mig::backend::v2_state::MigState::Running,
            "{ctx}"
        );
        drop(v2);
        drop(io);

        // The test helper (what the register-level tests use).
        let d = MttyDevice::open_or_panic(&dev);
        assert_eq!(d.backend, expected, "{ctx}: MttyDevice");
        assert_fd_matches(expected, &mtty::fd_target(d.fd()), &ctx);
        drop(d);
    }

    // The command, through the environment.
    let dev = &mtty_devices()[0];
    let expected = mtty::expected_backend(requested, dev);
    let out = probe_json(&[], dev);
    assert!(out.status.success(), "probe failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backend"], expected.name(), "{v}");
    let access = v["access"].as_str().expect("access listed");
    assert_fd_matches(
        expected,
        access.rsplit("device fd ").next().unwrap_or_default(),
        "probe",
    );

    // --backend overrides the environment; a backend the kernel lacks is a clean error.
    for (backend, available) in [
        (Backend::Group, mtty::group_available(dev)),
        (Backend::Iommufd, mtty::iommufd_available(dev)),
    ] {
        let out = probe_json(&["--backend", backend.name()], dev);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if available {
            assert!(out.status.success(), "--backend {backend}: {stderr}");
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["backend"], backend.name(), "{v}");
        } else {
            assert!(
                !out.status.success(),
                "--backend {backend} cannot work here"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
            assert!(
                stderr.contains(&format!("the {backend} backend cannot open")),
                "--backend {backend}: {stderr}"
            );
        }
    }
}
