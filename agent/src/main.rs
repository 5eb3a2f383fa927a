//! The `decant` binary: parses the command line and runs the command.

use std::process::ExitCode;

use clap::Parser;

/// jemalloc keeps freed pages for reuse (for seconds, not forever): with the
/// system allocator the applier gave each group's folded maps and COPY data
/// back to the kernel and faulted fresh zeroed pages in for the next group
/// (14% of its time draining a backlog), and malloc/free took another 15%.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
