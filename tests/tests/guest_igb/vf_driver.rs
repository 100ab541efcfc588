// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small user-space driver of the 82576 VF's transmit queue 0, written for this project from
//! the Intel 82576 datasheet's VF register map and advanced transmit descriptor layout: it makes
//! the VF write into guest memory by DMA (a descriptor's status write-back, or the queue's head
//! write-back at an address of the test's choice), which the dirty-tracking tests then look for
//! in the device's DMA log.
//!
//! It works through a [`DeviceIo`] (BAR0 by pread/pwrite on the VFIO device fd) and on
//! vm-memory guest memory that the caller has DMA-mapped for the VF at IOVA = guest physical
//! address. Nothing here panics: every step returns an error naming itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};
use vfio_mig::backend::query_region;
use vfio_mig::backend::DeviceIo;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// --- VF registers in BAR0 (82576 datasheet, "Virtual Function Registers") ---
/// VTCTRL: VF control; bit 26 (RST) is the VF's software reset.
const VTCTRL: u64 = 0x0000;
const VTCTRL_RST: u32 = 1 << 26;
/// VMBMEM: the VF's 16 dwords of mailbox memory shared with the PF.
const VMBMEM: u64 = 0x0800;
/// VFMailbox (V2PMAILBOX): the VF's side of the mailbox handshake.
const VFMAILBOX: u64 = 0x0c40;
/// Request for the PF: a message is in VMBMEM.
const MBX_REQ: u32 = 1 << 0;
/// Acknowledge of a PF message.
const MBX_ACK: u32 = 1 << 1;
/// The VF takes the mailbox memory.
const MBX_VFU: u32 = 1 << 2;
/// The PF wrote a message (cleared on read).
const MBX_PFSTS: u32 = 1 << 4;
/// The PF acknowledged the VF's message (cleared on read).
const MBX_PFACK: u32 = 1 << 5;
/// The PF is resetting the shared resources.
const MBX_RSTI: u32 = 1 << 6;
/// The bits a read clears (PFSTS, PFACK and RSTD, bit 7): kept across reads.
const MBX_READ_CLEARS: u32 = MBX_PFSTS | MBX_PFACK | (1 << 7);
/// Transmit queue 0: descriptor base (low, high), ring length, head, tail, control, head
/// write-back address (low, high).
const TDBAL: u64 = 0x3800;
const TDBAH: u64 = 0x3804;
const TDLEN: u64 = 0x3808;
const TDH: u64 = 0x3810;
const TDT: u64 = 0x3818;
const TXDCTL: u64 = 0x3828;
const TDWBAL: u64 = 0x3838;
const TDWBAH: u64 = 0x383c;
/// TXDCTL bit 25: the queue is enabled (reads back 1 once the device enabled it).
const TXDCTL_ENABLE: u32 = 1 << 25;
/// TDWBAL bit 0: write the head to TDWBAH:TDWBAL instead of writing back descriptors.
const TDWBAL_HEAD_WB_EN: u32 = 1;

// --- Advanced transmit data descriptor (datasheet, "Advanced Transmit Data Descriptor"):
// buffer address (8 bytes), then DTALEN[15:0], DTYP[23:20], DCMD[31:24], then PAYLEN[31:14] ---
const DTYP_DATA: u32 = 0b0011 << 20;
const DCMD_EOP: u32 = 1 << 24;
const DCMD_IFCS: u32 = 1 << 25;
const DCMD_RS: u32 = 1 << 27;
const DCMD_DEXT: u32 = 1 << 29;
const PAYLEN_SHIFT: u32 = 14;
/// Write-back format: the STA field's DD bit, bit 0 of the descriptor's last dword.
const WB_STATUS_OFFSET: u64 = 12;
const WB_DD: u32 = 1;
/// A descriptor's size; the ring must be a multiple of 128 bytes and 128-byte aligned.
pub const DESC_SIZE: u64 = 16;
/// Eight descriptors: the smallest ring the datasheet allows (128 bytes).
pub const RING_DESCS: u64 = 8;

// --- The mailbox message set is the PF driver's (Linux igb's e1000_mbx.h), not the
// datasheet's, which leaves the contents to software ---
/// "Reset me": the PF answers with the VF's MAC address and enables its queues (VFTE, VFRE).
const MSG_VF_RESET: u32 = 0x01;
const MSG_ACK: u32 = 0x8000_0000;
const MSG_NACK: u32 = 0x4000_0000;

/// The PCI command register (offset 4 of the VF's config space, vfio-pci's config region) has
/// Bus Master Enable at bit 2, without which the function may not start DMA (PCI spec;
/// vfio-pci leaves it to the user, as a VMM's guest driver sets it).
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// How long the PF (the guest's igb driver, on a TCG vCPU) may take to answer.
const PF_TIMEOUT: Duration = Duration::from_secs(10);

/// The PF's answer to the VF's reset message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetReply {
    /// The PF acknowledged (true) or refused (false, a NACK: no MAC address assigned).
    pub acked: bool,
    /// The VF's MAC address from the reply (all zero on a NACK).
    pub mac: [u8; 6],
}

/// A VF's registers through VFIO: BAR0 and the PCI config space, by pread/pwrite on the
/// device fd (vfio-pci's regions).
pub struct VfRegs {
    dev: Arc<dyn DeviceIo>,
    /// BAR0's offset in the device fd.
    bar0: u64,
    /// The config space's offset in the device fd.
    config: u64,
}

impl VfRegs {
    /// Finds BAR0 and the config space of `dev`.
    pub fn new(dev: Arc<dyn DeviceIo>) -> Result<Self, String> {
        let bar = query_region(dev.as_ref(), VFIO_PCI_BAR0_REGION_INDEX)
            .map_err(|e| format!("BAR0 region info: {e}"))?;
        if bar.size < 0x4000 {
            return Err(format!(
                "BAR0 is {:#x} bytes, the VF has 16 KiB of registers",
                bar.size
            ));
        }
        let config = query_region(dev.as_ref(), VFIO_PCI_CONFIG_REGION_INDEX)
            .map_err(|e| format!("config space region info: {e}"))?
            .offset;
        Ok(Self {
            dev,
            bar0: bar.offset,
            config,
        })
    }

    /// Reads `N` bytes at device-fd offset `at` (`what` names it in errors).
    fn read<const N: usize>(&self, at: u64, what: &str) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        match self.dev.read_at(&mut b, at) {
            Ok(n) if n == N => Ok(b),
            Ok(n) => Err(format!("{what}: short read of {n} bytes")),
            Err(e) => Err(format!("{what}: read: {e}")),
        }
    }

    /// Writes `bytes` at device-fd offset `at` (`what` names it in errors).
    fn write(&self, at: u64, bytes: &[u8], what: &str) -> Result<(), String> {
        match self.dev.write_at(bytes, at) {
            Ok(n) if n == bytes.len() => Ok(()),
            Ok(n) => Err(format!("{what}: short write of {n} bytes")),
            Err(e) => Err(format!("{what}: write: {e}")),
        }
    }

    /// Reads a 32-bit register of BAR0.
    pub fn read32(&self, reg: u64) -> Result<u32, String> {
        self.read(self.bar0 + reg, &format!("BAR0 {reg:#x}"))
            .map(u32::from_le_bytes)
    }

    /// Writes a 32-bit register of BAR0.
    pub fn write32(&self, reg: u64, value: u32) -> Result<(), String> {
        let what = format!("BAR0 {reg:#x} = {value:#x}");
        self.write(self.bar0 + reg, &value.to_le_bytes(), &what)
    }

    /// Sets or clears Bus Master Enable in the VF's PCI command register.
    pub fn bus_master(&self, on: bool) -> Result<(), String> {
        let at = self.config + PCI_COMMAND;
        let old = u16::from_le_bytes(self.read(at, "PCI command register")?);
        let new = if on {
            old | PCI_COMMAND_MASTER
        } else {
            old & !PCI_COMMAND_MASTER
        };
        self.write(at, &new.to_le_bytes(), "PCI command register")
    }
}

/// Transmit queue 0 of one VF, with its ring in guest memory.
pub struct VfTx {
    regs: VfRegs,
    /// Guest physical address of the descriptor ring.
    ring: u64,
    /// Index of the next descriptor to post.
    tail: u64,
}

impl VfTx {
    /// The transmit queue of the VF `dev`.
    pub fn new(dev: Arc<dyn DeviceIo>) -> Result<Self, String> {
        Ok(Self {
            regs: VfRegs::new(dev)?,
            ring: 0,
            tail: 0,
        })
    }

    fn read32(&self, reg: u64) -> Result<u32, String> {
        self.regs.read32(reg)
    }

    fn write32(&self, reg: u64, value: u32) -> Result<(), String> {
        self.regs.write32(reg, value)
    }

    /// Polls `reg` until `done(value)` or [`PF_TIMEOUT`]; returns the last value read.
    fn poll(&self, reg: u64, what: &str, mut done: impl FnMut(u32) -> bool) -> Result<u32, String> {
        let start = Instant::now();
        loop {
            let v = self.read32(reg)?;
            if done(v) {
                return Ok(v);
            }
            if start.elapsed() > PF_TIMEOUT {
                return Err(format!(
                    "{what}: not after {PF_TIMEOUT:?} (register {reg:#x} = {v:#x})"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resets the VF as the datasheet's VF initialization asks: a VF software reset
    /// (VTCTRL.RST), then a reset message to the PF through the mailbox, whose driver then
    /// enables the VF's queues (VFTE, VFRE) and answers with the VF's MAC address.
    pub fn reset(&self) -> Result<ResetReply, String> {
        self.write32(VTCTRL, VTCTRL_RST)?;
        // The bits a read clears are gathered over every read of the handshake.
        let mut seen = 0u32;
        self.poll(VFMAILBOX, "mailbox: the PF's reset to end (RSTI)", |v| {
            seen |= v & MBX_READ_CLEARS;
            v & MBX_RSTI == 0
        })
        .map_err(|e| format!("{e}: is the PF's interface up?"))?;
        // Take the mailbox memory, write the message, and hand it to the PF (REQ without VFU
        // releases the memory).
        self.write32(VFMAILBOX, MBX_VFU)?;
        self.poll(VFMAILBOX, "mailbox: the VF taking the buffer (VFU)", |v| {
            seen |= v & MBX_READ_CLEARS;
            v & MBX_VFU != 0
        })?;
        self.write32(VMBMEM, MSG_VF_RESET)?;
        self.write32(VFMAILBOX, MBX_REQ)?;
        self.poll(
            VFMAILBOX,
            "mailbox: the PF's reply to VF_RESET (PFSTS)",
            |v| {
                seen |= v & MBX_READ_CLEARS;
                seen & MBX_PFSTS != 0
            },
        )?;
        let mut words = [0u32; 3];
        for (i, w) in words.iter_mut().enumerate() {
            *w = self.read32(VMBMEM + 4 * i as u64)?;
        }
        self.write32(VFMAILBOX, MBX_ACK)?;
        if words[0] & 0xffff != MSG_VF_RESET {
            return Err(format!(
                "mailbox: the PF answered {:#x} to VF_RESET",
                words[0]
            ));
        }
        let acked = words[0] & MSG_ACK != 0;
        if !acked && words[0] & MSG_NACK == 0 {
            return Err(format!(
                "mailbox: the PF's reply {:#x} is neither ACK nor NACK",
                words[0]
            ));
        }
        let mut mac = [0u8; 6];
        mac[..4].copy_from_slice(&words[1].to_le_bytes());
        mac[4..].copy_from_slice(&words[2].to_le_bytes()[..2]);
        Ok(ResetReply { acked, mac })
    }

    /// Programs transmit queue 0 with an 8-descriptor ring at `ring` (guest physical, 128-byte
    /// aligned, DMA-mapped), head and tail 0, no head write-back, and enables it and the VF's
    /// bus mastering.
    pub fn start(&mut self, ring: u64) -> Result<(), String> {
        if ring % 128 != 0 {
            return Err(format!("ring {ring:#x} is not 128-byte aligned"));
        }
        self.regs.bus_master(true)?;
        self.write32(TXDCTL, 0)?;
        self.write32(TDBAL, ring as u32)?;
        self.write32(TDBAH, (ring >> 32) as u32)?;
        self.write32(TDLEN, (RING_DESCS * DESC_SIZE) as u32)?;
        self.write32(TDH, 0)?;
        self.write32(TDT, 0)?;
        self.head_write_back(None)?;
        self.write32(TXDCTL, TXDCTL_ENABLE)?;
        self.poll(TXDCTL, "TXDCTL: queue 0 enabled", |v| {
            v & TXDCTL_ENABLE != 0
        })?;
        self.ring = ring;
        self.tail = 0;
        Ok(())
    }

    /// Turns the head write-back on at `addr` (4-byte aligned, guest physical) or off.
    pub fn head_write_back(&self, addr: Option<u64>) -> Result<(), String> {
        let (lo, hi) = match addr {
            Some(a) if a % 4 != 0 => return Err(format!("head write-back {a:#x} unaligned")),
            Some(a) => (a as u32 | TDWBAL_HEAD_WB_EN, (a >> 32) as u32),
            None => (0, 0),
        };
        self.write32(TDWBAL, lo)?;
        self.write32(TDWBAH, hi)
    }

    /// Guest physical address of descriptor `index` of the ring.
    pub fn desc_addr(&self, index: u64) -> u64 {
        self.ring + (index % RING_DESCS) * DESC_SIZE
    }

    /// Writes descriptor `index` of the ring: one advanced data descriptor sending the `len`
    /// bytes at `buffer` (guest physical) as one packet, with report status (`rs`) or without.
    /// The device sees it once [`post`](Self::post) moves the tail past it. Returns its guest
    /// physical address.
    pub fn queue(
        &self,
        mem: &GuestMemoryMmap<AtomicBitmap>,
        index: u64,
        buffer: u64,
        len: u16,
        rs: bool,
    ) -> Result<u64, String> {
        let desc = self.desc_addr(index);
        let cmd = DTYP_DATA
            | DCMD_DEXT
            | DCMD_EOP
            | DCMD_IFCS
            | if rs { DCMD_RS } else { 0 }
            | u32::from(len);
        let olinfo = u32::from(len) << PAYLEN_SHIFT;
        let mut bytes = [0u8; DESC_SIZE as usize];
        bytes[..8].copy_from_slice(&buffer.to_le_bytes());
        bytes[8..12].copy_from_slice(&cmd.to_le_bytes());
        bytes[12..].copy_from_slice(&olinfo.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(desc))
            .map_err(|e| format!("descriptor {index} at {desc:#x}: {e}"))?;
        Ok(desc)
    }

    /// Hands the next descriptor to the device (the tail one further) and waits until the
    /// device's head passed it: by then the device has fetched it, read its buffer and done
    /// its write-back, if any.
    pub fn post(&mut self) -> Result<(), String> {
        self.tail = (self.tail + 1) % RING_DESCS;
        self.write32(TDT, self.tail as u32)?;
        let want = self.tail as u32;
        self.poll(TDH, "TDH: the device processing the descriptor", |h| {
            h == want
        })?;
        Ok(())
    }

    /// Whether the device wrote the descriptor at `desc` back with DD set.
    pub fn done(mem: &GuestMemoryMmap<AtomicBitmap>, desc: u64) -> Result<bool, String> {
        let status: u32 = mem
            .read_obj(GuestAddress(desc + WB_STATUS_OFFSET))
            .map_err(|e| format!("descriptor at {desc:#x}: {e}"))?;
        Ok(status & WB_DD != 0)
    }

    /// Disables transmit queue 0 and the VF's bus mastering (what the VF's reset at the next
    /// open does too).
    pub fn stop(&self) -> Result<(), String> {
        self.head_write_back(None)?;
        self.write32(TXDCTL, 0)?;
        self.regs.bus_master(false)
    }
}
