// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `vfio-mig` command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = vfio_mig::cli::Cli::parse();
    vfio_mig::cli::init_logging(cli.verbose);
    match vfio_mig::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line naming the step (and what became of the devices), never a backtrace.
            eprintln!("vfio-mig: error: {e}");
            // 3: in doubt (the source device is left stopped); 1: any other failure.
            ExitCode::from(e.exit_code())
        }
    }
}
