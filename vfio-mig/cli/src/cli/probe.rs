// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfio-mig probe DEVICE`: protocol, flags, regions and sizes.

use crate::cli::devices::open_device;
use std::fmt::Write as _;
use vfio_mig::backend::query_region;
use vfio_mig::backend::DeviceIo;
use vfio_mig_session::{Error, Result};

/// One region, as `probe` shows it.
#[derive(Debug, serde::Serialize)]
struct RegionLine {
    index: u32,
    size: u64,
    offset: u64,
    flags: u32,
    region_type: Option<(u32, u32)>,
    sparse_mmap: Vec<(u64, u64)>,
}

/// What `probe` prints.
#[derive(Debug, serde::Serialize)]
struct ProbeOutput {
    device: String,
    model: String,
    /// How the device was opened: `group` or `iommufd` (`null` for a mock).
    backend: Option<vfio_mig::Backend>,
    /// What the backend opened (`null` for a mock).
    access: Option<String>,
    protocol: String,
    capabilities: vfio_mig::Capabilities,
    /// Whether the device can join a unit of several devices without
    /// `--allow-non-p2p-unit` (it has the P2P states); `unit_note` says why not.
    multi_device_unit: bool,
    unit_note: Option<String>,
    state: String,
    details: Vec<(String, String)>,
    device_flags: u32,
    regions: Vec<RegionLine>,
}

fn regions(io: &dyn DeviceIo) -> Result<(u32, Vec<RegionLine>)> {
    let info = io
        .device_info()
        .map_err(|e| Error::device("VFIO_DEVICE_GET_INFO", e))?;
    let mut out = Vec::new();
    for index in 0..info.num_regions {
        match query_region(io, index) {
            Ok(r) => out.push(RegionLine {
                index,
                size: r.size,
                offset: r.offset,
                flags: r.flags,
                region_type: r.region_type(),
                sparse_mmap: r
                    .sparse_areas()
                    .unwrap_or_default()
                    .iter()
                    .map(|a| (a.offset, a.size))
                    .collect(),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => {
                return Err(Error::device(
                    format!("VFIO_DEVICE_GET_REGION_INFO for region {index}"),
                    e,
                ))
            }
        }
    }
    Ok((info.flags, out))
}

/// Runs `probe`.
pub fn run(name: &str, json: bool) -> Result<()> {
    let mut opened = open_device(name)?;
    let id = opened.io.identity();
    let (device_flags, regions) = regions(opened.io.as_ref())?;
    let unit = opened
        .device
        .capabilities()
        .unit_member(opened.device.protocol());
    let out = ProbeOutput {
        device: id.instance,
        model: id.model,
        backend: opened.access.as_ref().map(|a| a.backend),
        access: opened.access.as_ref().map(|a| a.detail.clone()),
        protocol: opened.device.protocol().to_string(),
        capabilities: opened.device.capabilities(),
        multi_device_unit: unit.is_ok(),
        unit_note: unit.err(),
        state: opened.device.state_name()?,
        details: opened.device.details()?,
        device_flags,
        regions,
    };
    if json {
        return super::transfer::print_json(&out);
    }
    let mut text = String::new();
    let _ = writeln!(text, "device:       {}", out.device);
    let _ = writeln!(text, "model:        {}", out.model);
    if let (Some(backend), Some(access)) = (out.backend, &out.access) {
        let _ = writeln!(text, "backend:      {backend}: {access}");
    }
    let _ = writeln!(text, "protocol:     {}", out.protocol);
    let _ = writeln!(
        text,
        "capabilities: pre-copy {}, p2p {}, migration flags {:#x}",
        out.capabilities.pre_copy, out.capabilities.p2p, out.capabilities.migration_flags
    );
    let _ = match &out.unit_note {
        None => writeln!(text, "unit:         can join a multi-device unit (P2P)"),
        Some(why) => writeln!(
            text,
            "unit:         joins a multi-device unit only with --allow-non-p2p-unit ({why})"
        ),
    };
    let _ = writeln!(text, "state:        {}", out.state);
    for (k, v) in &out.details {
        let _ = writeln!(text, "{:<13} {v}", format!("{k}:"));
    }
    let _ = writeln!(text, "device flags: {:#x}", out.device_flags);
    let _ = writeln!(text, "regions:");
    for r in &out.regions {
        let kind = r
            .region_type
            .map(|(t, s)| format!(" type {t}/{s}"))
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "  {:>2}: size {:#x} offset {:#x} flags {:#x}{kind}",
            r.index, r.size, r.offset, r.flags
        );
    }
    super::output_text(&text)
}
