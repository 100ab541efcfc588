// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Progress bars (on a terminal) and one summary line per phase, fed by engine events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use vfio_mig::wire::Phase;
use vfio_mig::{Event, Observer};

/// Shows one side of a transfer (save or load) as a progress bar with bytes, rate and phase.
pub struct ProgressView {
    bar: ProgressBar,
    label: &'static str,
    pre_copy: AtomicU64,
    quiet: bool,
}

impl ProgressView {
    /// A bar labelled `label`, drawn on stderr only when it is a terminal.
    pub fn new(label: &'static str, multi: Option<&MultiProgress>, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        let bar = match multi {
            Some(m) => m.add(bar),
            None => bar,
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix:>5} {msg:14} {bytes:>11} {binary_bytes_per_sec:>13} {elapsed_precise}",
            )
            .expect("static template"),
        );
        bar.set_prefix(label);
        bar.enable_steady_tick(Duration::from_millis(120));
        Self {
            bar,
            label,
            pre_copy: AtomicU64::new(0),
            quiet,
        }
    }

    /// Stops the bar, leaving its last state on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }

    fn print(&self, line: String) {
        if !self.quiet {
            // Goes above the bars on a terminal, plainly to stderr otherwise.
            if self.bar.is_hidden() {
                eprintln!("{line}");
            } else {
                self.bar.println(line);
            }
        }
    }
}

impl Observer for ProgressView {
    fn on_event(&self, event: &Event) {
        match event {
            Event::PhaseStarted { phase, .. } => self.bar.set_message(phase.to_string()),
            Event::Progress { phase, bytes, .. } => {
                let base = match phase {
                    Phase::PreCopy => 0,
                    _ => self.pre_copy.load(Ordering::Relaxed),
                };
                self.bar.set_position(base + bytes);
            }
            Event::RoundDone {
                round,
                bytes,
                pending,
                ..
            } => self.print(format!(
                "{:>5} pre-copy round {round}: sent {}, {} still pending",
                self.label,
                HumanBytes(*bytes),
                HumanBytes(*pending)
            )),
            Event::PhaseEnded {
                phase,
                bytes,
                chunks,
                elapsed,
                ..
            } => {
                if *phase == Phase::PreCopy {
                    self.pre_copy.store(*bytes, Ordering::Relaxed);
                }
                let total = match phase {
                    Phase::PreCopy => *bytes,
                    _ => self.pre_copy.load(Ordering::Relaxed) + bytes,
                };
                self.bar.set_position(total);
                self.print(format!(
                    "{:>5} {phase}: {} in {chunks} chunks, {:.1} ms",
                    self.label,
                    HumanBytes(*bytes),
                    elapsed.as_secs_f64() * 1e3
                ));
            }
            // The error line names what became of every device: one line, not two.
            Event::RolledBack { recovery, .. } => {
                log::info!("{} rolled back: device {recovery}", self.label)
            }
            // Events of later versions: the progress view has nothing to show for them.
            _ => {}
        }
    }
}
