//! Ctrl-C: the first one asks the running command to stop at its next safe point (training saves a
//! checkpoint; `prepare` removes its unfinished cache), the second one stops at once. Either way
//! the exit code is 130, as for any program stopped by SIGINT.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

pub const EXIT_CODE: u8 = 130;

/// Installs the handler; call once at start-up.
pub fn install() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: stopping now");
            std::process::exit(EXIT_CODE as i32);
        }
        eprintln!("\ninterrupted: stopping at the next safe point (Ctrl-C again to stop at once)");
    })?;
    Ok(())
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error a command returns when it stopped because of Ctrl-C.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted by Ctrl-C")
    }
}

impl std::error::Error for Interrupted {}
