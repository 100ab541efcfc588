// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Driver profiles of the v2 mock (`mock:v2,profile=NAME`): the observable behaviour of one
//! kernel vendor driver, read from its source (see `docs/mock-device.md` for the sources).
//!
//! | profile  | flags | DMA log | pre-copy data      | temporary end | RESUMING -> STOP checks     | ERROR |
//! |----------|-------|---------|--------------------|---------------|-----------------------------|-------|
//! | (none)   | 0x7   | yes     | every page         | read 0        | framing (content at run)    | yes   |
//! | `mtty`   | 0x7   | no bits | match header       | read 0        | whole state (EINVAL)        | no    |
//! | `mlx5`   | 0x7   | yes     | every page, async  | ENOMSG        | nothing (loaded in write)   | no    |
//! | `hisi`   | 0x5   | no      | match header       | read 0        | whole state or match only   | no    |
//! | `pds`    | 0x3   | yes     | (no PRE_COPY)      | -             | whole state (EIO)           | yes   |
//! | `xe`     | 0x3   | no      | (no PRE_COPY)      | -             | framing in write (EINVAL), whole state (EIO) | no |
//! | `qat`    | 0x7   | no      | match header       | read 0        | whole state (EINVAL)        | no    |
//! | `virtio` | 0x7   | no      | every page         | ENOMSG        | nothing (loaded in write)   | no    |
//! | `igb`    | 0x5   | 4 ranges| nothing            | read 0        | whole state or empty (EIO)  | no    |
//!
//! "Full state" is the size of a whole stop-copy stream from scratch, whatever was read, as
//! `mtty_get_data_size`, `mlx5vf_pci_get_data_size` (the firmware's total), hisi's
//! `sizeof(struct acc_vf_data)` and pds's `PDS_LM_DEVICE_STATE_LENGTH` report. The match
//! header is the content codec's MATCH packet (seed and shape of the device), standing for
//! mtty's 24-byte `struct mtty_data` header and hisi's `QM_MATCH_SIZE` match data: the only
//! pre-copy data of those drivers, the whole state following in STOP_COPY. `flags=` and
//! `dma=` override a profile's defaults (`profile=mlx5,flags=0x3` is mlx5 before PRE_COPY).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::rules::v2_arcs::{FLAG_P2P, FLAG_PRE_COPY, FLAG_STOP_COPY};

/// A named driver profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileName {
    /// samples/vfio-mdev/mtty.c.
    Mtty,
    /// drivers/vfio/pci/mlx5 (ConnectX VFs).
    Mlx5,
    /// drivers/vfio/pci/hisilicon/hisi_acc_vfio_pci.c (newer version, with PRE_COPY).
    Hisi,
    /// drivers/vfio/pci/pds (AMD/Pensando DSC).
    Pds,
    /// drivers/gpu/drm/xe's SR-IOV VF migration behind xe-vfio-pci (Intel GPU VFs).
    Xe,
    /// drivers/vfio/pci/qat/main.c (Intel QAT VFs).
    Qat,
    /// drivers/vfio/pci/virtio/migrate.c (virtio-net VFs, admin-queue device parts).
    Virtio,
    /// The out-of-tree igb-vfio-pci (`shared/igb-vfio/driver/main.c`, Intel 82576 VFs).
    Igb,
}

/// The igb VF's state blob: `state_max_size` from its DVSEC DATA_SIZE (1024 bytes in the
/// driver's README), the most a resuming fd takes (EFBIG beyond).
pub const IGB_STATE_SIZE: u64 = 1024;

/// igb's CAPS `max_ranges` (bits 11:8 of 0x1403 in the driver's README).
pub const IGB_MAX_RANGES: u32 = 4;

impl ProfileName {
    /// Every profile, in the order of the table above.
    pub const ALL: [ProfileName; 8] = [
        Self::Mtty,
        Self::Mlx5,
        Self::Hisi,
        Self::Pds,
        Self::Xe,
        Self::Qat,
        Self::Virtio,
        Self::Igb,
    ];

    /// The name `profile=` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mtty => "mtty",
            Self::Mlx5 => "mlx5",
            Self::Hisi => "hisi",
            Self::Pds => "pds",
            Self::Xe => "xe",
            Self::Qat => "qat",
            Self::Virtio => "virtio",
            Self::Igb => "igb",
        }
    }

    /// The behaviour this profile models.
    pub fn behaviour(self) -> Behaviour {
        let full = FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY;
        // What every profile's driver does (each from its own source): MIG_DATA_SIZE is the
        // whole state, the stream opens with the match header, the state is loaded (and
        // checked whole) at RESUMING -> STOP, the data fd of an ended session answers ENODEV
        // (`migf->disabled` / `MIGF_STATE_ERROR`), and no path leads into ERROR.
        let base = Behaviour {
            flags: full,
            dma: true,
            dma_reports_nothing: false,
            dma_max_ranges: None,
            dma_report_in_one_range: false,
            dma_off_at_stop: false,
            data_size_full: true,
            data_size_error_as_length: false,
            match_header: true,
            precopy_header_only: false,
            precopy_empty: false,
            enomsg: false,
            reinit: false,
            save_latency: None,
            write_refusal: None,
            max_stream: None,
            write_limit: None,
            complete_at_stop: true,
            match_only_loads_nothing: false,
            empty_loads_nothing: false,
            ended_fd_enodev: true,
            enters_error: false,
            reset_keeps_failed_resume: false,
            resume_errno: libc::EINVAL,
            error_errno: libc::EINVAL,
        };
        match self {
            // mtty_init_dev: all three flags; mtty_log_ops whose start/stop/read_and_clear
            // return 0 and set no bit. mtty_save_read returns 0 at the temporary end;
            // mtty_resume_write fails with EFAULT on a bad header and ENOMEM past the state;
            // RESUMING -> STOP refuses a short state with EINVAL.
            Self::Mtty => Behaviour {
                dma_reports_nothing: true,
                precopy_header_only: true,
                write_refusal: Some(WriteRefusal::HeaderOnly(libc::EFAULT)),
                write_limit: Some(libc::ENOMEM),
                ..base
            },
            // mlx5vf_cmd_set_migratable: STOP_COPY | P2P | PRE_COPY; log_ops; SAVE commands
            // complete asynchronously; mlx5vf_save_read: ENOMSG at the temporary end;
            // mlx5vf_resume_write loads each image inside write(), so RESUMING -> STOP (with
            // PRE_COPY support) checks nothing. The 2026 REINIT series
            // (mlx5vf_precopy_ioctl): after the PRECOPY_INFOv2 opt-in, a firmware in
            // MIGRATION_INIT makes the unread bytes plus a new SAVE the initial bytes, with
            // VFIO_PRECOPY_INFO_REINIT and dirty_bytes 0.
            Self::Mlx5 => Behaviour {
                enomsg: true,
                reinit: true,
                save_latency: Some(Duration::from_millis(2)),
                write_refusal: Some(WriteRefusal::Everything {
                    framing: libc::EINVAL,
                    content: libc::EIO,
                }),
                complete_at_stop: false,
                ..base
            },
            // hisi_acc_vfio_pci_migrn_init_dev: STOP_COPY | PRE_COPY, never P2P; no log_ops;
            // pre-copy carries the match data only; vf_qm_check_match after each write ->
            // EFAULT; ENOMEM past sizeof(struct acc_vf_data); vf_qm_load_data at RESUMING ->
            // STOP returns 0 when only the match data came.
            Self::Hisi => Behaviour {
                flags: FLAG_STOP_COPY | FLAG_PRE_COPY,
                dma: false,
                precopy_header_only: true,
                write_refusal: Some(WriteRefusal::HeaderOnly(libc::EFAULT)),
                write_limit: Some(libc::ENOMEM),
                match_only_loads_nothing: true,
                ..base
            },
            // pds_vfio_init_device: STOP_COPY | P2P; log_ops, disabled at STOP_COPY -> STOP
            // (pds_vfio_dirty_disable; a later report is EINVAL); pds_vfio_restore_write only
            // buffers; the firmware checks at RESUMING -> STOP; a failed arc leaves the
            // device in ERROR, where every SET is EIO.
            Self::Pds => Behaviour {
                flags: FLAG_STOP_COPY | FLAG_P2P,
                dma_off_at_stop: true,
                enters_error: true,
                resume_errno: libc::EIO,
                error_errno: libc::EIO,
                ..base
            },
            // xe_vfio_pci_migration_init: STOP_COPY | P2P, no PRE_COPY, no log_ops; the VF's
            // whole VRAM quota is saved at stop-copy (in 512 MiB chunks by the GuC/PF), so
            // its state is multi-GiB. xe_vfio_pci_resume_write hands each packet to
            // xe_sriov_pf_migration_restore_produce, which refuses a malformed one with
            // EINVAL inside write(); the PF restores the state at RESUMING -> STOP
            // (xe_sriov_vfio_resume_data_exit). xe_vfio_pci_get_data_size stores the PF's
            // ssize_t answer in an unsigned length and returns 0: a failure reads as
            // 2^64 - errno.
            Self::Xe => Behaviour {
                flags: FLAG_STOP_COPY | FLAG_P2P,
                dma: false,
                write_refusal: Some(WriteRefusal::Framing(libc::EINVAL)),
                data_size_error_as_length: true,
                resume_errno: libc::EIO,
                ..base
            },
            // qat_vf_pci_init_dev: all three flags, no log_ops; pre-copy carries the setup
            // part only (qat_vf_save_setup), 0 at its end; qat_vf_resume_write: ENOMEM past
            // state_size, qat_vfmig_load_setup refuses another device's setup inside write();
            // qat_vf_load_device_data at RESUMING -> STOP.
            Self::Qat => Behaviour {
                dma: false,
                precopy_header_only: true,
                write_refusal: Some(WriteRefusal::HeaderOnly(libc::EINVAL)),
                write_limit: Some(libc::ENOMEM),
                ..base
            },
            // virtiovf_set_migratable: all three flags, no log_ops; the whole device context
            // in pre-copy, ENOMSG at the temporary end (virtiovf_save_read); each chunk is
            // loaded inside write() (virtio_pci_admin_dev_parts_set) and RESUMING -> STOP
            // only disables the fds.
            Self::Virtio => Behaviour {
                dma: false,
                enomsg: true,
                write_refusal: Some(WriteRefusal::Everything {
                    framing: libc::EINVAL,
                    content: libc::EIO,
                }),
                complete_at_stop: false,
                ..base
            },
            // igb_vfio_pci_init_dev: STOP_COPY | PRE_COPY, log_ops (max_ranges, merged by
            // the driver; a REPORT inside one of them only); an empty save file in PRE_COPY, the 1 KiB blob at STOP_COPY;
            // igb_resume_write: EFBIG past state_max_size; igb_load_data: an empty stream
            // loads nothing, the device checks magic/version/VF number (EIO, stays in
            // RESUMING); a VF reset does not reset the driver's mig_state.
            Self::Igb => Behaviour {
                flags: FLAG_STOP_COPY | FLAG_PRE_COPY,
                precopy_empty: true,
                dma_max_ranges: Some(IGB_MAX_RANGES),
                dma_report_in_one_range: true,
                max_stream: Some(IGB_STATE_SIZE),
                write_limit: Some(libc::EFBIG),
                empty_loads_nothing: true,
                reset_keeps_failed_resume: true,
                resume_errno: libc::EIO,
                ..base
            },
        }
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProfileName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|p| p.name()).collect();
                format!("unknown profile `{s}` (known: {})", known.join(", "))
            })
    }
}

/// Where a driver refuses bad data inside `write(2)` on the resuming data fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteRefusal {
    /// Only a bad match header (another device's state), with this errno; the rest of the
    /// state is checked at RESUMING -> STOP (mtty, hisi).
    HeaderOnly(i32),
    /// Only a malformed stream (framing), with this errno; what the packets carry is
    /// checked at RESUMING -> STOP (xe's PF parses packets inside write()).
    Framing(i32),
    /// Every framing error (`framing`) and every page that does not match (`content`), as
    /// mlx5 loads each image inside write(); completeness is checked at RESUMING -> STOP.
    Everything {
        /// errno of a broken stream.
        framing: i32,
        /// errno of a page whose bytes the device refuses.
        content: i32,
    },
}

/// What a v2 mock does, where drivers differ. The mock without a profile keeps its generic
/// behaviour ([`Behaviour::generic`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behaviour {
    /// Default `VFIO_MIGRATION_*` flags.
    pub flags: u64,
    /// Default of `dma=`: whether the driver has DMA logging (`log_ops`).
    pub dma: bool,
    /// DMA logging reports never set a bit (mtty's log ops only return 0).
    pub dma_reports_nothing: bool,
    /// Most ranges the device tracks; more are merged by the driver (igb's CAPS `max_ranges`,
    /// 4 in its README, through `vfio_combine_iova_ranges`). `None`: each range as given.
    pub dma_max_ranges: Option<u32>,
    /// REPORT of a span that is not inside one tracked (merged) range is EINVAL (igb:
    /// `igb_pci_dirty_range_valid`, seen in the igb guest); the others report any span.
    pub dma_report_in_one_range: bool,
    /// STOP_COPY -> STOP stops DMA logging (pds); a later REPORT is EINVAL.
    pub dma_off_at_stop: bool,
    /// MIG_DATA_SIZE is the size of a whole stop-copy stream (true), or what is still unread
    /// (false, generic).
    pub data_size_full: bool,
    /// A failed MIG_DATA_SIZE query succeeds with `-errno` as the length (xe stores the
    /// PF's `ssize_t` in the unsigned `stop_copy_length`); otherwise the ioctl fails.
    pub data_size_error_as_length: bool,
    /// The stream starts with a MATCH packet (the device's seed and shape).
    pub match_header: bool,
    /// Pre-copy carries the match header only; the pages follow in STOP_COPY.
    pub precopy_header_only: bool,
    /// Pre-copy carries nothing; the whole state follows in STOP_COPY (igb).
    pub precopy_empty: bool,
    /// A read at the pre-copy temporary end fails with ENOMSG (the writer stays open) instead
    /// of returning 0.
    pub enomsg: bool,
    /// The device can re-initialise its pre-copy data (`reinit-at=`): mlx5's
    /// `MLX5_QUERY_VHCA_MIG_STATE_OPER_MIGRATION_INIT`, reported as
    /// `VFIO_PRECOPY_INFO_REINIT` to a caller that opted in to PRECOPY_INFOv2.
    pub reinit: bool,
    /// Saving data becomes readable this long after the device produced it (asynchronous
    /// SAVE commands); PRECOPY_INFO counts it at once.
    pub save_latency: Option<Duration>,
    /// Bad data refused inside write(2) (through [`DeviceIo::write_data`]); `None`: the
    /// stream is only checked later.
    ///
    /// [`DeviceIo::write_data`]: vfio_mig::backend::DeviceIo::write_data
    pub write_refusal: Option<WriteRefusal>,
    /// The largest whole stream the device holds (igb's `state_max_size`): a `size=` whose
    /// stream is longer is refused, and without `size=` the state fills it in one page.
    pub max_stream: Option<u64>,
    /// errno of a write(2) that would take the resuming stream past the whole state
    /// (ENOMEM: mtty, hisi, qat; EFBIG: igb); nothing of it is taken.
    pub write_limit: Option<i32>,
    /// RESUMING -> STOP refuses a state that is not complete and intact; false: the driver
    /// loaded what came inside write() and checks nothing more (mlx5, virtio).
    pub complete_at_stop: bool,
    /// A stream of only the MATCH packet passes RESUMING -> STOP and loads nothing (hisi's
    /// `vf_qm_load_data`).
    pub match_only_loads_nothing: bool,
    /// An empty stream passes RESUMING -> STOP and loads nothing (igb's `igb_load_data`).
    pub empty_loads_nothing: bool,
    /// The data fd of an ended session answers ENODEV (every profile's driver); the generic
    /// mock's pipe reads 0 and refuses writes with EPIPE.
    pub ended_fd_enodev: bool,
    /// The driver has a path into ERROR (pds, and the generic mock); the others never
    /// report it, so `fail-at=...:error` is refused for them.
    pub enters_error: bool,
    /// After RESUMING -> STOP failed, VFIO_DEVICE_RESET leaves the device in RESUMING and
    /// every later RESUMING -> STOP fails (igb: the VF resets, the driver's state does not;
    /// only closing the device fd helps).
    pub reset_keeps_failed_resume: bool,
    /// errno of RESUMING -> STOP refusing the state (profiles verify the whole state there).
    pub resume_errno: i32,
    /// errno of a SET in ERROR (other than for ERROR itself, a no-op, except on pds).
    pub error_errno: i32,
}

impl Behaviour {
    /// The mock without a profile: mtty's arcs and temporary end, MIG_DATA_SIZE the unread
    /// rest, every page in pre-copy, the state verified when the device next runs.
    pub fn generic() -> Self {
        Self {
            flags: FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY,
            dma: true,
            dma_reports_nothing: false,
            dma_max_ranges: None,
            dma_report_in_one_range: false,
            dma_off_at_stop: false,
            data_size_full: false,
            data_size_error_as_length: false,
            match_header: false,
            precopy_header_only: false,
            precopy_empty: false,
            enomsg: false,
            reinit: false,
            save_latency: None,
            write_refusal: None,
            max_stream: None,
            write_limit: None,
            complete_at_stop: true,
            match_only_loads_nothing: false,
            empty_loads_nothing: false,
            ended_fd_enodev: false,
            enters_error: true,
            reset_keeps_failed_resume: false,
            resume_errno: libc::EINVAL,
            error_errno: libc::EINVAL,
        }
    }

    /// Whether the state is verified at RESUMING -> STOP (every profile) rather than when the
    /// device next runs (generic).
    pub fn verify_at_stop(&self) -> bool {
        self.match_header
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_flags_follow_the_drivers() {
        for p in ProfileName::ALL {
            assert_eq!(p.name().parse::<ProfileName>(), Ok(p));
        }
        assert!("e1000".parse::<ProfileName>().unwrap_err().contains("igb"));
        assert_eq!(ProfileName::Mtty.behaviour().flags, 0x7);
        assert_eq!(ProfileName::Mlx5.behaviour().flags, 0x7);
        assert_eq!(ProfileName::Hisi.behaviour().flags, 0x5);
        assert_eq!(ProfileName::Pds.behaviour().flags, 0x3);
        assert_eq!(ProfileName::Xe.behaviour().flags, 0x3);
        assert_eq!(ProfileName::Qat.behaviour().flags, 0x7);
        assert_eq!(ProfileName::Virtio.behaviour().flags, 0x7);
        assert_eq!(ProfileName::Igb.behaviour().flags, 0x5);
        assert!(ProfileName::Mlx5.behaviour().enomsg);
        assert!(!ProfileName::Mtty.behaviour().enomsg);
        assert!(ProfileName::ALL
            .iter()
            .all(|p| p.behaviour().data_size_full && p.behaviour().verify_at_stop()));
        assert!(!Behaviour::generic().verify_at_stop());
    }
}
