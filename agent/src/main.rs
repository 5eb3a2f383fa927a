//! The `decant` binary: parses the command line and runs the command.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = decant_agent::cli::Cli::parse();
    match decant_agent::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let root: &(dyn std::error::Error + 'static) = e.as_ref();
            eprintln!("decant: error: {}", decant_agent::error::report(root));
            ExitCode::FAILURE
        }
    }
}
