// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vfio-mig` command.

use std::process::ExitCode;

use clap::Parser;

mod bench;
mod cli;

fn main() -> ExitCode {
    crate::cli::signals::install();
    let cli = crate::cli::Cli::parse();
    crate::cli::init_logging(cli.verbose);
    let result = crate::cli::run(cli);
    if let Some(signal) = crate::cli::signals::received() {
        // The engine rolled back as for any failure; one line, and the status of a signal.
        let name = crate::cli::signals::name(signal);
        match result {
            Err(e) => eprintln!("vfio-mig: error: interrupted by {name}: {e}"),
            Ok(()) => eprintln!("vfio-mig: {name} arrived after the command completed"),
        }
        return ExitCode::from(crate::cli::signals::exit_status(signal) as u8);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the step (and what became of the devices), never a backtrace.
            // The error and its causes, each once (the library's errors keep their cause in
            // `source()`, not in their own message).
            eprintln!("vfio-mig: error: {}", vfio_mig::error::Report(&e));
            // 3: in doubt (the source device is left stopped); 1: any other failure.
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
