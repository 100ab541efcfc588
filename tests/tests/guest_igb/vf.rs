// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The igb VFs of the guest: where they are, their BAR0 registers, and running `vfio-mig`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use vfio_mig_tests::cli::{assert_success as ok, clean_failure};

use vfio_mig::backend::v2_state::MigState;

use vfio_mig::backend::V2Device;
use vfio_mig_tests::open_device;
use vmm_glue::dma::VmContainer;

use super::vf_driver::VfRegs;

/// Environment variable listing the four VFs.
const VFS_ENV: &str = "VFIO_MIG_IGB_VFS";
/// Environment variable naming the `vfio-mig` command.
const BIN_ENV: &str = "VFIO_MIG_BIN";

/// The size of the device's state blob (`sizeof(IgbMigBlob)` in igb_migration.c: magic,
/// version, VF number, 64 register pairs, 48 RA pairs, two TX contexts, VFRE, VFTE).
pub const BLOB_SIZE: usize = 1024;

/// The four VFs: PF A VF0, PF A VF1, PF B VF0, PF B VF1. Panics outside the igb guest.
pub fn igb_vfs() -> [PathBuf; 4] {
    let value = std::env::var(VFS_ENV).unwrap_or_default();
    let vfs: Vec<PathBuf> = value.split_whitespace().map(PathBuf::from).collect();
    vfs.try_into().unwrap_or_else(|v: Vec<PathBuf>| {
        panic!(
            "{VFS_ENV} must name 4 VFs (got {v:?}): these tests run only inside the igb guest \
             of scripts/guest/igb/boot.sh"
        )
    })
}

/// VF 0 of PF A and VF 0 of PF B.
pub fn a0_b0() -> (PathBuf, PathBuf) {
    let [a0, _, b0, _] = igb_vfs();
    (a0, b0)
}

/// Ring registers of the VF's queue 0 in its BAR0 (82576 datasheet, VF register map; QEMU's
/// igbvf maps them to the PF's queue of the VF). The device's state blob carries all of them
/// (igb_vf_reg_list), and a function level reset keeps them (igb_vf_reset clears only the
/// queue enable bits), so they tell a migrated VF from a fresh one.
pub const RING_REGS: [(&str, u64, u32); 6] = [
    // name, BAR0 offset, the bits a valid value may have (datasheet: the descriptor rings are
    // 128-byte aligned and their length a multiple of 128 below 1 MiB). The tests write only
    // valid values, so every one must read back as written.
    ("RDBAL0", 0x2800, 0xffff_ff80),
    ("RDBAH0", 0x2804, 0xffff_ffff),
    ("RDLEN0", 0x2808, 0x000f_ff80),
    ("TDBAL0", 0x3800, 0xffff_ff80),
    ("TDBAH0", 0x3804, 0xffff_ffff),
    ("TDLEN0", 0x3808, 0x000f_ff80),
];

/// What a test writes into a VF's ring registers (and expects to read back after a migration).
pub type Rings = Vec<u32>;

/// A VF opened through its VFIO group in a container of its own (vmm-glue's, not through
/// vfio-mig's open), for register access through BAR0.
pub struct Vf {
    regs: VfRegs,
    /// Keeps the VF's container (and so its group) open as long as the VF.
    _container: VmContainer,
}

impl Vf {
    /// Opens the VF (this resets it: see the crate docs).
    pub fn open(path: &Path) -> Self {
        let container = VmContainer::new(None).expect("open /dev/vfio/vfio");
        let dev = container
            .open_device(path)
            .unwrap_or_else(|e| panic!("open {} via VFIO: {e}", path.display()));
        let regs = VfRegs::new(dev).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Vf {
            regs,
            _container: container,
        }
    }

    /// Reads a 32-bit register of BAR0.
    pub fn read32(&self, offset: u64) -> u32 {
        self.regs.read32(offset).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Writes a 32-bit register of BAR0.
    pub fn write32(&self, offset: u64, value: u32) {
        self.regs
            .write32(offset, value)
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// Writes valid ring register values derived from `seed` into the VF; each must read back
/// as written. Returns them.
pub fn write_rings(path: &Path, seed: u32) -> Rings {
    let vf = Vf::open(path);
    let mut rings = Vec::new();
    for (i, (name, offset, mask)) in RING_REGS.into_iter().enumerate() {
        let value =
            (seed.wrapping_mul(0x0101_0101).rotate_left(i as u32 * 5) ^ (i as u32 * 0x1357)) & mask;
        vf.write32(offset, value);
        let back = vf.read32(offset);
        assert_eq!(
            back,
            value,
            "{}: {name} reads {back:#x} after writing {value:#x}",
            path.display()
        );
        rings.push(back);
    }
    rings
}

/// Reads the ring registers of the VF.
pub fn read_rings(path: &Path) -> Rings {
    let vf = Vf::open(path);
    RING_REGS
        .iter()
        .map(|&(_, off, _)| vf.read32(off))
        .collect()
}

/// The VF's v2 migration state, read through the library (the open resets it; what this
/// shows is that the VF can be opened and answers).
pub fn mig_state(path: &Path) -> MigState {
    let opened = open_device(path.to_str().unwrap()).expect("open the VF");
    let mut v2 = V2Device::open(opened.io.clone()).expect("igb-vfio-pci speaks v2");
    v2.state().expect("read the state")
}

/// The `vfio-mig` command.
pub fn vfio_mig_bin() -> PathBuf {
    PathBuf::from(std::env::var_os(BIN_ENV).unwrap_or_else(|| panic!("{BIN_ENV} is not set")))
}

/// Runs `vfio-mig ARGS`, echoing its output into the test log.
pub fn vfio_mig(args: &[&str]) -> Output {
    vfio_mig_tests::cli::run(&vfio_mig_bin(), args)
}

/// A path as `&str`.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first value under `key` anywhere in a JSON document.
pub fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// The kernel log lines of igb-vfio-pci about `vf` (its PCI name), oldest first: the driver
/// logs the device's own error code of a refused command ("DVSEC cmd 0x3 failed (error 6)")
/// and, with its debug lines on (/init turns them on), "loaded state: N bytes".
pub fn kernel_lines(vf: &Path) -> Vec<String> {
    let name = vf.file_name().unwrap().to_string_lossy().into_owned();
    let out = Command::new("dmesg").output().expect("run dmesg");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("igb-vfio-pci") && l.contains(&name))
        .map(str::to_string)
        .collect()
}
