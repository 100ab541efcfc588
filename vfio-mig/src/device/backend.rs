// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which kernel interface opens a VFIO device.
//!
//! Linux offers two:
//! - **group** (the classic one): a type1 container `/dev/vfio/vfio`, the device's IOMMU group
//!   `/dev/vfio/<group>` attached to it, and `VFIO_GROUP_GET_DEVICE_FD` (kernel options
//!   `VFIO_GROUP`, `VFIO_CONTAINER`);
//! - **iommufd**: the device's own character device `/dev/vfio/devices/vfioN` (found through
//!   `<sysfs>/vfio-dev/vfioN`), bound to an iommufd `/dev/iommu` and attached to an IO address
//!   space of it (kernel options `IOMMUFD`, `VFIO_DEVICE_CDEV`).
//!
//! Either way the result is a device fd that answers the same ioctls, so everything above
//! [`super::DeviceIo`] is the same. [`Backend::Auto`] prefers the group interface when the
//! kernel offers it for the device and falls back to iommufd; the caller may force one (the
//! command line's `--backend`), and a forced backend that the kernel does not offer is an error
//! naming what is missing, never a silent fallback.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How a VFIO device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[non_exhaustive]
pub enum Backend {
    /// The group interface when the kernel offers it for the device, else iommufd.
    #[default]
    Auto,
    /// Container `/dev/vfio/vfio` + group `/dev/vfio/<group>` (`VFIO_GROUP_GET_DEVICE_FD`).
    Group,
    /// iommufd `/dev/iommu` + the device cdev `/dev/vfio/devices/vfioN`.
    Iommufd,
}

impl Backend {
    /// The backend's name as the environment variable and `--backend` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Group => "group",
            Backend::Iommufd => "iommufd",
        }
    }

    /// Decides how to open the VFIO device at sysfs path `device`, looking at the real `/dev`.
    ///
    /// A forced backend the kernel does not offer for this device fails with
    /// [`io::ErrorKind::Unsupported`] and a message that names what is missing.
    pub fn route(self, device: &Path) -> io::Result<Route> {
        self.route_in(device, Path::new("/dev"))
    }

    /// [`Backend::route`] with `/dev` at `dev` (for tests on a fake tree).
    pub fn route_in(self, device: &Path, dev: &Path) -> io::Result<Route> {
        let unavailable = |backend: Backend, why: String| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the {} backend cannot open {}: {why}",
                    backend.name(),
                    device.display()
                ),
            )
        };
        match self {
            Backend::Group => group_route(device, dev).map_err(|why| unavailable(self, why)),
            Backend::Iommufd => iommufd_route(device, dev).map_err(|why| unavailable(self, why)),
            Backend::Auto => match group_route(device, dev) {
                Ok(route) => Ok(route),
                Err(no_group) => iommufd_route(device, dev).map_err(|no_iommufd| {
                    io::Error::new(
                        io::ErrorKind::Unsupported,
                        format!(
                            "no VFIO backend can open {}: group: {no_group}; iommufd: {no_iommufd}",
                            device.display()
                        ),
                    )
                }),
            },
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "group" | "container" => Ok(Backend::Group),
            "iommufd" | "cdev" => Ok(Backend::Iommufd),
            _ => Err("expected auto, group or iommufd".into()),
        }
    }
}

/// The resolved way to a device: what [`Backend::route`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Through the container and the device's IOMMU group.
    Group {
        /// The IOMMU group number (`/dev/vfio/<group>`).
        group: u32,
    },
    /// Through iommufd and the device's cdev.
    Iommufd {
        /// The device cdev, `/dev/vfio/devices/vfioN`.
        cdev: PathBuf,
    },
}

impl Route {
    /// The backend this route belongs to (never [`Backend::Auto`]).
    pub fn backend(&self) -> Backend {
        match self {
            Route::Group { .. } => Backend::Group,
            Route::Iommufd { .. } => Backend::Iommufd,
        }
    }
}

/// How an opened device was reached, for `probe` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DeviceAccess {
    /// The backend that opened it (never [`Backend::Auto`]).
    pub backend: Backend,
    /// What was opened, e.g. `group 3 (/dev/vfio/3) in a type1 container (/dev/vfio/vfio);
    /// device fd anon_inode:[vfio-device]`.
    pub detail: String,
}

/// The container/group way to `device`, or why there is none.
fn group_route(device: &Path, dev: &Path) -> Result<Route, String> {
    let container = dev.join("vfio/vfio");
    if !container.exists() {
        return Err(format!(
            "{} is missing (kernel without VFIO_CONTAINER, or VFIO not loaded)",
            container.display()
        ));
    }
    let link = device.join("iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        format!(
            "{}: {e} (the device has no IOMMU group: not bound to a VFIO driver?)",
            link.display()
        )
    })?;
    let group: u32 = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            format!(
                "{} points to {}, not a numbered group",
                link.display(),
                target.display()
            )
        })?;
    let node = dev.join(format!("vfio/{group}"));
    if !node.exists() {
        return Err(format!(
            "{} is missing (kernel without VFIO_GROUP, or the group is not a VFIO group)",
            node.display()
        ));
    }
    Ok(Route::Group { group })
}

/// The iommufd/cdev way to `device`, or why there is none.
fn iommufd_route(device: &Path, dev: &Path) -> Result<Route, String> {
    let vfio_dev = device.join("vfio-dev");
    let entries = std::fs::read_dir(&vfio_dev).map_err(|e| {
        format!(
            "{}: {e} (kernel without VFIO_DEVICE_CDEV, or the device not bound to a VFIO driver)",
            vfio_dev.display()
        )
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio"))
        .collect();
    names.sort();
    let name = match names.as_slice() {
        [one] => one.clone(),
        [] => return Err(format!("{} lists no vfioN device", vfio_dev.display())),
        many => {
            return Err(format!(
                "{} lists several devices: {}",
                vfio_dev.display(),
                many.join(", ")
            ))
        }
    };
    let iommu = dev.join("iommu");
    if !iommu.exists() {
        return Err(format!(
            "{} is missing (kernel without IOMMUFD)",
            iommu.display()
        ));
    }
    let cdev = dev.join("vfio/devices").join(&name);
    if !cdev.exists() {
        return Err(format!(
            "{} is missing (sysfs lists {name} under {})",
            cdev.display(),
            vfio_dev.display()
        ));
    }
    Ok(Route::Iommufd { cdev })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A fake sysfs device and /dev: `group` adds the iommu_group link and the group nodes,
    /// `cdev` the vfio-dev entry, /dev/iommu and the cdev node.
    struct Tree {
        _dir: tempfile::TempDir,
        device: PathBuf,
        dev: PathBuf,
    }

    fn tree(group: bool, cdev: bool) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let device = dir.path().join("sys/devices/uuid");
        let dev = dir.path().join("dev");
        fs::create_dir_all(&device).unwrap();
        fs::create_dir_all(dev.join("vfio/devices")).unwrap();
        if group {
            let groups = dir.path().join("sys/kernel/iommu_groups/7");
            fs::create_dir_all(&groups).unwrap();
            std::os::unix::fs::symlink(&groups, device.join("iommu_group")).unwrap();
            fs::write(dev.join("vfio/vfio"), "").unwrap();
            fs::write(dev.join("vfio/7"), "").unwrap();
        }
        if cdev {
            fs::create_dir_all(device.join("vfio-dev/vfio3")).unwrap();
            fs::write(dev.join("iommu"), "").unwrap();
            fs::write(dev.join("vfio/devices/vfio3"), "").unwrap();
        }
        Tree {
            _dir: dir,
            device,
            dev,
        }
    }

    fn route(t: &Tree, b: Backend) -> io::Result<Route> {
        b.route_in(&t.device, &t.dev)
    }

    #[test]
    fn names_parse_and_print() {
        for b in [Backend::Auto, Backend::Group, Backend::Iommufd] {
            assert_eq!(b.name().parse::<Backend>().unwrap(), b);
            assert_eq!(b.to_string(), b.name());
        }
        assert_eq!(" IOMMUFD ".parse::<Backend>().unwrap(), Backend::Iommufd);
        assert_eq!("cdev".parse::<Backend>().unwrap(), Backend::Iommufd);
        assert_eq!("container".parse::<Backend>().unwrap(), Backend::Group);
        assert!("vfio".parse::<Backend>().is_err());
    }

    #[test]
    fn auto_prefers_the_group_and_falls_back_to_the_cdev() {
        let both = tree(true, true);
        assert_eq!(
            route(&both, Backend::Auto).unwrap(),
            Route::Group { group: 7 }
        );
        assert_eq!(
            route(&both, Backend::Iommufd).unwrap(),
            Route::Iommufd {
                cdev: both.dev.join("vfio/devices/vfio3")
            }
        );
        let cdev_only = tree(false, true);
        let r = route(&cdev_only, Backend::Auto).unwrap();
        assert_eq!(r.backend(), Backend::Iommufd);
        let group_only = tree(true, false);
        assert_eq!(
            route(&group_only, Backend::Auto).unwrap().backend(),
            Backend::Group
        );
    }

    #[test]
    fn a_forced_backend_never_falls_back() {
        let group_only = tree(true, false);
        let e = route(&group_only, Backend::Iommufd).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(msg.contains("iommufd backend"), "{msg}");
        assert!(msg.contains("VFIO_DEVICE_CDEV"), "{msg}");

        let cdev_only = tree(false, true);
        let msg = route(&cdev_only, Backend::Group).unwrap_err().to_string();
        assert!(msg.contains("group backend"), "{msg}");
        assert!(msg.contains("vfio/vfio is missing"), "{msg}");

        let neither = tree(false, false);
        let msg = route(&neither, Backend::Auto).unwrap_err().to_string();
        assert!(
            msg.contains("no VFIO backend") && msg.contains("group:") && msg.contains("iommufd:"),
            "{msg}"
        );
    }

    #[test]
    fn missing_nodes_are_named() {
        let t = tree(true, true);
        fs::remove_file(t.dev.join("iommu")).unwrap();
        let msg = route(&t, Backend::Iommufd).unwrap_err().to_string();
        assert!(
            msg.contains("iommu is missing") && msg.contains("IOMMUFD"),
            "{msg}"
        );

        let t = tree(true, true);
        fs::remove_file(t.dev.join("vfio/7")).unwrap();
        let msg = route(&t, Backend::Group).unwrap_err().to_string();
        assert!(msg.contains("vfio/7 is missing"), "{msg}");
        // Auto then takes the cdev.
        assert_eq!(
            route(&t, Backend::Auto).unwrap().backend(),
            Backend::Iommufd
        );

        let t = tree(true, true);
        fs::create_dir_all(t.device.join("vfio-dev/vfio4")).unwrap();
        let msg = route(&t, Backend::Iommufd).unwrap_err().to_string();
        assert!(msg.contains("several devices"), "{msg}");
    }
}
