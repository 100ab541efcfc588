// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vfio-mig` command.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

mod bench;
mod cli;

fn main() -> ExitCode {
    crate::cli::signals::install();
    let cli = crate::cli::Cli::parse();
    if let Some(conflict) = cli.command.usage_conflict() {
        crate::cli::Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, conflict)
            .exit();
    }
    crate::cli::init_logging(cli.verbose);
    cli.command.begin_outcome();
    // One line naming the step and what became of the devices (never a backtrace), the
    // status that says it too, and with --json the outcome on stdout.
    ExitCode::from(crate::cli::outcome::finish(crate::cli::run(cli)))
}
