use std::process::ExitCode;

use cxrgen::interrupt::{self, Interrupted};
use cxrgen::opcount::CountingAllocator;

/// Counts tensor operations for `cxrgen bench` (see `cxrgen::opcount`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    // First, in this order: the thread pool and the Ctrl-C handler start threads.
    cxrgen::device::keep_freed_memory();
    cxrgen::device::use_cpu_threads();
    if let Err(err) = interrupt::install() {
        eprintln!("warning: Ctrl-C will not be handled gracefully: {err}");
    }
    match cxrgen::cli::run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if err.downcast_ref::<Interrupted>().is_some() {
                ExitCode::from(interrupt::EXIT_CODE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
