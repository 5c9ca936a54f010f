use std::process::ExitCode;

use cxrgen::interrupt::{self, Interrupted};
use cxrgen::opcount::CountingAllocator;

/// Counts tensor operations for `cxrgen bench` (see `cxrgen::opcount`).
#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn main() -> ExitCode {
    // First: the Ctrl-C handler below starts a thread.
    cxrgen::device::fix_cpu_thread_count();
    cxrgen::device::keep_freed_memory();
    if let Err(err) = interrupt::install() {
        eprintln!("warning: Ctrl-C will not be handled gracefully: {err}");
    }
    match cxrgen::device::on_cpu_pool(cxrgen::cli::run) {
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
