// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fault plan: which access of which field fails, and how.
//!
//! A rule `FIELD@N[:ERRNO|:error]` makes the N-th access (1-based, counted since the mock was
//! created; a reset does not restart the count) of FIELD fail with ERRNO (default `EIO`). With
//! `:error` the access fails with `EIO` and the device also drops into the v1 ERROR state
//! (110b), as a vendor driver does when its hardware stops answering.
//!
//! The plan only counts and answers; the device decides what an "access of a field" is and
//! what entering ERROR means. The v1 mock counts an access once it is well-formed enough to
//! name its field (a migration-info access whole at the field's offset, or a data-section
//! access inside the section; a wrong width or offset is refused before counting), and checks
//! the plan before any of its protocol rules, so a faulted access has no other effect (a
//! faulted `pending_bytes` read does not consume the staged transaction).
//!
//! The v2 mock has its own fields ([`V2FaultField`]) and rules ([`V2FaultRule`]), written
//! `FIELD[:STATE]@N[:ERRNO|:error]`: the optional `:STATE` (`set-state` only) counts only the
//! arcs into that state, e.g. `set-state:STOP_COPY@1`. See [`crate::v2`] for what each
//! field counts and what a fault does there.

use std::fmt;
use std::str::FromStr;

use crate::rules::v2_arcs;

/// Declares a set of countable fields: the enum, `ALL`, the rule names, `index`, `Display`
/// and `FromStr`, so the v1 and v2 mocks name their fields the same way.
macro_rules! fault_fields {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every field, in the order of `index`.
            pub const ALL: &'static [$name] = &[ $( $name::$variant, )+ ];

            /// The name used in `fail-at=` rules.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// Position in `ALL`, used to index counters.
            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $name::ALL
                    .iter()
                    .copied()
                    .find(|f| f.name() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = $name::ALL.iter().map(|f| f.name()).collect();
                        format!(
                            "unknown {} `{s}` (expected one of {})",
                            $what,
                            names.join(", ")
                        )
                    })
            }
        }
    };
}

fault_fields! {
    /// A field (or operation) of the v1 mock device whose accesses are counted.
    FaultField, "field" {
        /// A read of `device_state`.
        StateRead => "state-read",
        /// A write of `device_state`.
        StateWrite => "state-write",
        /// An access of `pending_bytes`.
        Pending => "pending",
        /// An access of `data_offset`.
        DataOffset => "data-offset",
        /// A read of `data_size`.
        DataSizeRead => "data-size-read",
        /// A write of `data_size`.
        DataSizeWrite => "data-size-write",
        /// A read of the data section (trapped; mmapped accesses are not seen by the device).
        DataRead => "data-read",
        /// A write of the data section (trapped).
        DataWrite => "data-write",
        /// A `VFIO_DEVICE_GET_REGION_INFO` call, any region.
        RegionInfo => "region-info",
        /// An `mmap` of the device.
        Mmap => "mmap",
        /// A `VFIO_DEVICE_RESET`.
        Reset => "reset",
    }
}

/// Errno names accepted in rules (and printed back), with their values.
const ERRNO_NAMES: [(&str, i32); 21] = [
    ("EPERM", libc::EPERM),
    ("ENOENT", libc::ENOENT),
    ("EINTR", libc::EINTR),
    ("EIO", libc::EIO),
    ("ENXIO", libc::ENXIO),
    ("EAGAIN", libc::EAGAIN),
    ("ENOMEM", libc::ENOMEM),
    ("EFAULT", libc::EFAULT),
    ("EBUSY", libc::EBUSY),
    ("ENODEV", libc::ENODEV),
    ("EINVAL", libc::EINVAL),
    ("ENOSPC", libc::ENOSPC),
    ("ENOTTY", libc::ENOTTY),
    ("ENODATA", libc::ENODATA),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("EBADF", libc::EBADF),
    ("E2BIG", libc::E2BIG),
    ("EPIPE", libc::EPIPE),
    ("ENOMSG", libc::ENOMSG),
    ("EOVERFLOW", libc::EOVERFLOW),
];

/// Parses an errno name (`EIO`, case-insensitive) or a positive number.
pub fn parse_errno(s: &str) -> Result<i32, String> {
    if let Some((_, v)) = ERRNO_NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(s)) {
        return Ok(*v);
    }
    match s.parse::<i32>() {
        Ok(v) if v > 0 && v < 4096 => Ok(v),
        _ => Err(format!(
            "bad errno `{s}` (a name such as EIO, EINVAL, EAGAIN, or a number 1-4095)"
        )),
    }
}

/// The name of an errno when it is one of the known ones, else its number.
pub fn errno_name(errno: i32) -> String {
    ERRNO_NAMES
        .iter()
        .find(|(_, v)| *v == errno)
        .map(|(n, _)| (*n).to_string())
        .unwrap_or_else(|| errno.to_string())
}

/// Parses the `N[:ERRNO|:error]` after the `@` of rule `whole`: (access, errno, error state).
fn parse_count_action(rest: &str, whole: &str) -> Result<(u64, i32, bool), String> {
    let (count, action) = match rest.split_once(':') {
        Some((c, a)) => (c, Some(a)),
        None => (rest, None),
    };
    let at: u64 =
        count.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
            format!("bad access count `{count}` in `{whole}` (expected 1, 2, ...)")
        })?;
    let (errno, error_state) = match action {
        None => (libc::EIO, false),
        Some("error") => (libc::EIO, true),
        Some(e) => (parse_errno(e)?, false),
    };
    Ok((at, errno, error_state))
}

/// Prints `@N[:ERRNO|:error]`, what [`parse_count_action`] reads (EIO, the default, unsaid).
fn fmt_count_action(
    f: &mut fmt::Formatter<'_>,
    at: u64,
    errno: i32,
    error_state: bool,
) -> fmt::Result {
    write!(f, "@{at}")?;
    if error_state {
        write!(f, ":error")
    } else if errno != libc::EIO {
        write!(f, ":{}", errno_name(errno))
    } else {
        Ok(())
    }
}

/// One `fail-at=` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// The field whose accesses are counted.
    pub field: FaultField,
    /// The 1-based access that fails.
    pub at: u64,
    /// The errno the access fails with.
    pub errno: i32,
    /// Whether the device also enters the ERROR state.
    pub error_state: bool,
}

impl FromStr for FaultRule {
    type Err = String;

    /// Parses `FIELD@N[:ERRNO|:error]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (field, rest) = s
            .split_once('@')
            .ok_or_else(|| format!("`{s}` is not FIELD@N[:ERRNO|:error]"))?;
        let field: FaultField = field.parse()?;
        let (at, errno, error_state) = parse_count_action(rest, s)?;
        Ok(FaultRule {
            field,
            at,
            errno,
            error_state,
        })
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.field)?;
        fmt_count_action(f, self.at, self.errno, self.error_state)
    }
}

/// A rule that fired: the access fails with `errno`, and the device enters ERROR when
/// `error_state` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultHit {
    /// The errno to fail with.
    pub errno: i32,
    /// Whether the device must enter the ERROR state.
    pub error_state: bool,
}

impl FaultHit {
    /// Counts a fired rule (`errno`, `error_state`) and fails the access with it.
    fn record(hits: &mut u64, fired: Option<(i32, bool)>) -> Result<(), FaultHit> {
        match fired {
            Some((errno, error_state)) => {
                *hits += 1;
                Err(FaultHit { errno, error_state })
            }
            None => Ok(()),
        }
    }

    /// The error to return from the failing access.
    pub fn to_io(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(self.errno)
    }
}

/// The rules and the per-field access counters.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    rules: Vec<FaultRule>,
    counts: [u64; FaultField::ALL.len()],
    hits: u64,
}

impl FaultPlan {
    /// A plan with these rules and all counters at zero.
    pub fn new(rules: &[FaultRule]) -> Self {
        Self {
            rules: rules.to_vec(),
            ..Default::default()
        }
    }

    /// Counts one access of `field`; fails it when a rule names this access.
    pub fn check(&mut self, field: FaultField) -> Result<(), FaultHit> {
        let count = &mut self.counts[field.index()];
        *count += 1;
        let n = *count;
        let fired = self
            .rules
            .iter()
            .find(|r| r.field == field && r.at == n)
            .map(|r| (r.errno, r.error_state));
        FaultHit::record(&mut self.hits, fired)
    }

    /// How many accesses of `field` have been counted.
    pub fn count(&self, field: FaultField) -> u64 {
        self.counts[field.index()]
    }

    /// How many accesses were failed by a rule.
    pub fn hits(&self) -> u64 {
        self.hits
    }
}

fault_fields! {
    /// An operation of the v2 mock device whose accesses are counted (see [`crate::v2`]).
    V2FaultField, "v2 field" {
        /// A GET of `VFIO_DEVICE_FEATURE_MIGRATION` (the flags).
        Migration => "migration",
        /// A GET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
        GetState => "get-state",
        /// One arc of a SET of `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (a SET walking several
        /// arcs counts each); a rule may name the arc's target state.
        SetState => "set-state",
        /// A GET of `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
        DataSize => "data-size",
        /// A `VFIO_MIG_GET_PRECOPY_INFO` on this device's saving data fd.
        PrecopyInfo => "precopy-info",
        /// One block of up to `chunk` bytes the device produces into a saving data fd.
        DataRead => "data-read",
        /// One block of `chunk` bytes of the stream written into a resuming data fd.
        DataWrite => "data-write",
        /// A SET or GET of `DMA_LOGGING_START`, `_REPORT` or `_STOP`.
        DmaLogging => "dma-logging",
        /// A `VFIO_DEVICE_RESET`.
        Reset => "reset",
    }
}

/// One `fail-at=` rule of the v2 mock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V2FaultRule {
    /// The field whose accesses are counted.
    pub field: V2FaultField,
    /// For `set-state`: count only the arcs into this state (a raw v2 state value).
    pub state: Option<u32>,
    /// The 1-based access that fails.
    pub at: u64,
    /// The errno the access fails with.
    pub errno: i32,
    /// Whether the device also enters the ERROR state.
    pub error_state: bool,
}

impl FromStr for V2FaultRule {
    type Err = String;

    /// Parses `FIELD[:STATE]@N[:ERRNO|:error]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (head, rest) = s
            .split_once('@')
            .ok_or_else(|| format!("`{s}` is not FIELD[:STATE]@N[:ERRNO|:error]"))?;
        let (field, state) = match head.split_once(':') {
            Some((f, st)) => (f, Some(st)),
            None => (head, None),
        };
        let field: V2FaultField = field.parse()?;
        let state = match state {
            None => None,
            Some(_) if field != V2FaultField::SetState => {
                return Err(format!(
                    "`{s}`: only set-state takes a :STATE filter, not {field}"
                ))
            }
            Some(st) => Some(
                v2_arcs::from_name(st)
                    .ok_or_else(|| format!("unknown v2 migration state `{st}`"))?,
            ),
        };
        let (at, errno, error_state) = parse_count_action(rest, s)?;
        Ok(V2FaultRule {
            field,
            state,
            at,
            errno,
            error_state,
        })
    }
}

impl fmt::Display for V2FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.field)?;
        if let Some(st) = self.state {
            write!(f, ":{}", v2_arcs::name(st))?;
        }
        fmt_count_action(f, self.at, self.errno, self.error_state)
    }
}

/// The v2 rules and access counters: per field, and for `set-state` also per target state.
#[derive(Debug, Clone, Default)]
pub struct V2FaultPlan {
    rules: Vec<V2FaultRule>,
    counts: [u64; V2FaultField::ALL.len()],
    state_counts: [u64; v2_arcs::ALL_STATES.len()],
    hits: u64,
}

impl V2FaultPlan {
    /// A plan with these rules and all counters at zero.
    pub fn new(rules: &[V2FaultRule]) -> Self {
        Self {
            rules: rules.to_vec(),
            ..Default::default()
        }
    }

    /// Counts one access of `field` (an arc into `state` for `set-state`); fails it when a
    /// rule names this access, by its count of the field or of arcs into `state`.
    pub fn check(&mut self, field: V2FaultField, state: Option<u32>) -> Result<(), FaultHit> {
        self.counts[field.index()] += 1;
        let n = self.counts[field.index()];
        let n_state = state.map(|s| {
            let c = &mut self.state_counts[(s as usize).min(v2_arcs::ALL_STATES.len() - 1)];
            *c += 1;
            *c
        });
        let fired = self.rules.iter().find(|r| {
            r.field == field
                && match r.state {
                    None => r.at == n,
                    Some(s) => Some(s) == state && Some(r.at) == n_state,
                }
        });
        FaultHit::record(&mut self.hits, fired.map(|r| (r.errno, r.error_state)))
    }

    /// How many accesses of `field` have been counted.
    pub fn count(&self, field: V2FaultField) -> u64 {
        self.counts[field.index()]
    }

    /// How many accesses were failed by a rule.
    pub fn hits(&self) -> u64 {
        self.hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print_back() {
        let r: FaultRule = "pending@3".parse().unwrap();
        assert_eq!(
            r,
            FaultRule {
                field: FaultField::Pending,
                at: 3,
                errno: libc::EIO,
                error_state: false
            }
        );
        assert_eq!(r.to_string(), "pending@3");
        let r: FaultRule = "state-write@1:EAGAIN".parse().unwrap();
        assert_eq!(r.errno, libc::EAGAIN);
        assert_eq!(r.to_string(), "state-write@1:EAGAIN");
        let r: FaultRule = "data-read@2:error".parse().unwrap();
        assert!(r.error_state);
        assert_eq!(r.errno, libc::EIO);
        assert_eq!(r.to_string(), "data-read@2:error");
        let r: FaultRule = "mmap@1:22".parse().unwrap();
        assert_eq!(r.errno, libc::EINVAL);
        assert_eq!(r.to_string(), "mmap@1:EINVAL");
        let r: FaultRule = "reset@1:einval".parse().unwrap();
        assert_eq!(r.errno, libc::EINVAL);
        let r: FaultRule = "reset@1:1000".parse().unwrap();
        assert_eq!(r.to_string(), "reset@1:1000");
        for &f in FaultField::ALL {
            assert_eq!(f.name().parse::<FaultField>().unwrap(), f);
        }
    }

    #[test]
    fn bad_rules_are_explained() {
        let e = "bogus@1".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("unknown field `bogus`"), "{e}");
        let e = "pending".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("FIELD@N"), "{e}");
        let e = "pending@0".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("bad access count `0`"), "{e}");
        let e = "pending@x".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("bad access count"), "{e}");
        let e = "pending@1:EWHAT".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("bad errno `EWHAT`"), "{e}");
        let e = "pending@1:-3".parse::<FaultRule>().unwrap_err();
        assert!(e.contains("bad errno"), "{e}");
    }

    #[test]
    fn the_nth_access_fails_and_only_that_one() {
        let mut plan = FaultPlan::new(&[
            "pending@2:EAGAIN".parse().unwrap(),
            "pending@4:error".parse().unwrap(),
            "reset@1".parse().unwrap(),
        ]);
        assert_eq!(plan.check(FaultField::Pending), Ok(()));
        assert_eq!(
            plan.check(FaultField::Pending),
            Err(FaultHit {
                errno: libc::EAGAIN,
                error_state: false
            })
        );
        assert_eq!(plan.check(FaultField::DataOffset), Ok(()));
        assert_eq!(plan.check(FaultField::Pending), Ok(()));
        let hit = plan.check(FaultField::Pending).unwrap_err();
        assert!(hit.error_state);
        assert_eq!(hit.to_io().raw_os_error(), Some(libc::EIO));
        assert_eq!(plan.check(FaultField::Pending), Ok(()));
        assert!(plan.check(FaultField::Reset).is_err());
        assert_eq!(plan.check(FaultField::Reset), Ok(()));
        assert_eq!(plan.count(FaultField::Pending), 5);
        assert_eq!(plan.count(FaultField::DataOffset), 1);
        assert_eq!(plan.hits(), 3);
    }

    #[test]
    fn v2_rules_parse_print_back_and_filter_by_state() {
        let r: V2FaultRule = "set-state:STOP_COPY@2:error".parse().unwrap();
        assert_eq!(r.field, V2FaultField::SetState);
        assert_eq!(r.state, Some(v2_arcs::STOP_COPY));
        assert_eq!((r.at, r.errno, r.error_state), (2, libc::EIO, true));
        assert_eq!(r.to_string(), "set-state:STOP_COPY@2:error");
        let r: V2FaultRule = "set-state:stop-copy@1:EPIPE".parse().unwrap();
        assert_eq!(r.to_string(), "set-state:STOP_COPY@1:EPIPE");
        let r: V2FaultRule = "data-read@3".parse().unwrap();
        assert_eq!((r.state, r.errno), (None, libc::EIO));
        assert_eq!(r.to_string(), "data-read@3");
        for &f in V2FaultField::ALL {
            assert_eq!(f.name().parse::<V2FaultField>().unwrap(), f);
        }
        let e = "pending@1".parse::<V2FaultRule>().unwrap_err();
        assert!(e.contains("unknown v2 field `pending`"), "{e}");
        let e = "data-read:STOP@1".parse::<V2FaultRule>().unwrap_err();
        assert!(e.contains("only set-state"), "{e}");
        let e = "set-state:SAVING@1".parse::<V2FaultRule>().unwrap_err();
        assert!(e.contains("unknown v2 migration state"), "{e}");
        let e = "set-state@0".parse::<V2FaultRule>().unwrap_err();
        assert!(e.contains("bad access count `0`"), "{e}");
        assert!("set-state".parse::<V2FaultRule>().is_err());

        let mut plan = V2FaultPlan::new(&[
            "set-state:STOP@2:EAGAIN".parse().unwrap(),
            "set-state@5".parse().unwrap(),
        ]);
        use v2_arcs::{RUNNING, RUNNING_P2P, STOP};
        assert_eq!(
            plan.check(V2FaultField::SetState, Some(RUNNING_P2P)),
            Ok(())
        );
        assert_eq!(plan.check(V2FaultField::SetState, Some(STOP)), Ok(()));
        assert_eq!(
            plan.check(V2FaultField::SetState, Some(RUNNING_P2P)),
            Ok(())
        );
        let hit = plan.check(V2FaultField::SetState, Some(STOP)).unwrap_err();
        assert_eq!(hit.errno, libc::EAGAIN);
        let hit = plan
            .check(V2FaultField::SetState, Some(RUNNING))
            .unwrap_err();
        assert_eq!(hit.errno, libc::EIO);
        assert_eq!(plan.check(V2FaultField::SetState, Some(STOP)), Ok(()));
        assert_eq!(plan.count(V2FaultField::SetState), 6);
        assert_eq!(plan.hits(), 2);
    }
}
