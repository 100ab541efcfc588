// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault sweeps: one migration per access count of a mock's fault field, until the fault lies
//! past the field's last access, with the invariants of every failure checked.

use crate::try_mock;
use vfio_mig::engine::{NoObserver, SaveOptions};
use vfio_mig::handshake::migrate_local;

use crate::{assert_destination_left_safe, assert_source_running, handle};

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
            let (mut src, mut dst) = match opened {
                Ok(pair) => pair,
                Err(e) => {
                    assert!(open_may_fail(n), "{context}: open failed: {e}");
                    assert!(!e.to_string().contains('\n'), "{context}: {e}");
                    failures += 1;
                    continue;
                }
            };
            let result = migrate_local(
                src.device.as_mut(),
                dst.device.as_mut(),
                &self.opts,
                &NoObserver,
                &NoObserver,
            );
            let (src_status, dst_status) = (handle(&src).status(), handle(&dst).status());
            match result {
                Ok(report) => {
                    assert!(
                        dst_status.resumed_ok && !dst_status.ran_incomplete,
                        "{context}: success without a verified resume: {dst_status:?}"
                    );
                    if report.save.after_handoff.is_some() {
                        // The source's STOP after the handoff failed: it was reset (its
                        // state is gone), never resumed with the state the destination runs.
                        assert!(src_status.resets > 0, "{context}: {src_status:?}");
                        return failures;
                    }
                    assert_eq!(
                        handle(&src).state_digest(),
                        handle(&dst).state_digest(),
                        "{context}"
                    );
                    return failures;
                }
                Err(e) => {
                    failures += 1;
                    let text = e.to_string();
                    assert!(
                        !text.contains('\n'),
                        "{context}: error must be one line: {text}"
                    );
                    assert_source_running(&src_status, &context);
                    assert_destination_left_safe(&dst_status, &context, &text);
                }
            }
        }
        panic!(
            "{}: the fault never stopped firing within {} accesses",
            self.field, self.max
        );
    }
}
