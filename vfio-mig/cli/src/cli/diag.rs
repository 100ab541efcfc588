// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What goes to stderr besides the one error line: warnings, recv's own and the library's
//! log records alike, as `vfio-mig: warning: TEXT`, one prefix on every line (a text with a
//! line break, such as a reason a peer sent, cannot start a line that looks like another
//! message), never two on one.

use std::fmt::Write as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Prints `text` as a warning on stderr, each of its lines with the prefix.
pub fn warning(text: &str) {
    eprint!("{}", prefixed("warning", text));
}

/// `text` with `vfio-mig: LEVEL: ` before each of its lines.
fn prefixed(level: &str, text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let _ = writeln!(out, "vfio-mig: {level}: {line}");
    }
    out
}

/// The format of the library's log records on stderr: warnings and errors (an error of the
/// log is not the command's error line) as warnings, the rest under their level's name.
pub struct LogFormat;

impl<S, N> FormatEvent<S, N> for LogFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let level = match *event.metadata().level() {
            Level::ERROR | Level::WARN => "warning",
            Level::INFO => "info",
            Level::DEBUG => "debug",
            Level::TRACE => "trace",
        };
        let mut text = String::new();
        ctx.field_format()
            .format_fields(Writer::new(&mut text), event)?;
        writer.write_str(&prefixed(level, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_has_one_prefix() {
        assert_eq!(
            prefixed("warning", "refused: a\nvfio-mig: recv: forged"),
            "vfio-mig: warning: refused: a\nvfio-mig: warning: vfio-mig: recv: forged\n"
        );
    }
}
