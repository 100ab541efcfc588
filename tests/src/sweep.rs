// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault sweeps: one migration per access count of a mock's fault field, until the fault lies
//! past the field's last access, with the timeline of both devices checked step by step and
//! at the end ([`crate::timeline`]).

use crate::recorder::{recorder, UnitLog};
use crate::timeline::Timeline;
use crate::try_mock;
use vfio_mig::{NoObserver, SaveOptions};
use vfio_mig_session::handshake::migrate_local;

/// One sweep: `fail-at={field}@N{suffix}` added to `spec` on one side.
#[derive(Debug, Clone)]
pub struct Sweep<'a> {
    /// The device spec of both sides, without the fault.
    pub spec: String,
    /// The fault field.
    pub field: &'a str,
    /// Appended after the access count (`:EIO`, `:error`, or nothing).
    pub suffix: &'a str,
    /// Fault on the source (else on the destination).
    pub on_source: bool,
    /// The migration's options.
    pub opts: SaveOptions,
    /// Most access counts to try before declaring that the fault never stops firing.
    pub max: u64,
}

impl Sweep<'_> {
    /// Runs the sweep. `open_may_fail(n)` says whether the fault at access `n` is allowed to
    /// fire while the devices are opened (before the migration touches them). Returns how
    /// many migrations failed (the caller asserts there was at least one).
    pub fn run(&self, open_may_fail: impl Fn(u64) -> bool) -> u32 {
        let mut failures = 0;
        for n in 1..=self.max {
            let fault = format!("fail-at={}@{n}{}", self.field, self.suffix);
            let faulty = format!("{},{fault}", self.spec);
            let (src_spec, dst_spec) = if self.on_source {
                (faulty, self.spec.clone())
            } else {
                (self.spec.clone(), faulty)
            };
            let side = if self.on_source {
                "source"
            } else {
                "destination"
            };
            let context = format!("{side} {fault} {} live={}", self.spec, self.opts.live);
            let opened = try_mock(&src_spec).and_then(|s| try_mock(&dst_spec).map(|d| (s, d)));
            let (src, dst) = match opened {
                Ok(pair) => pair,
                Err(e) => {
                    assert!(open_may_fail(n), "{context}: open failed: {e}");
                    assert!(!e.to_string().contains('\n'), "{context}: {e}");
                    failures += 1;
                    continue;
                }
            };
            let (src_handle, dst_handle) = (src.handle.clone(), dst.handle.clone());
            let timeline = Timeline::new(vec![src_handle.clone(), dst_handle.clone()], 1);
            let log = UnitLog::new(2);
            let record = |d: crate::MockDevice, slot| {
                recorder(d.opened.device, slot, log.clone(), timeline.probe())
            };
            let (mut src, mut dst) = (record(src, 0), record(dst, 1));
            let result = migrate_local(&mut src, &mut dst, &self.opts, &NoObserver, &NoObserver);
            let replay = timeline
                .replay()
                .unwrap_or_else(|v| panic!("{context}: {v}"));
            let error = result
                .as_ref()
                .err()
                .map(|e| vfio_mig::error::Report(e).to_string());
            timeline
                .check_end(error.as_deref(), replay.ran)
                .unwrap_or_else(|v| panic!("{context}: {v}"));
            match result {
                Ok(report) => {
                    let dst_status = dst_handle.status();
                    assert!(
                        !dst_status.ran_incomplete,
                        "{context}: the destination ran without the whole state: {dst_status:?}"
                    );
                    if report.save.after_handoff.is_none() {
                        assert_eq!(
                            src_handle.state_digest(),
                            dst_handle.state_digest(),
                            "{context}"
                        );
                    }
                    return failures;
                }
                Err(e) => {
                    failures += 1;
                    let text = vfio_mig::error::Report(&e).to_string();
                    assert!(
                        !text.contains('\n'),
                        "{context}: error must be one line: {text}"
                    );
                }
            }
        }
        panic!(
            "{}: the fault never stopped firing within {} accesses",
            self.field, self.max
        );
    }
}
