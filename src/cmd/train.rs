//! `cxrgen train-vae` and `cxrgen train-diffusion`: the two training stages ([`crate::train`]),
//! and how a run that ended is reported (and what it exits with).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use crate::train::trainer::TrainSummary;
use crate::train::RunRequest;

/// `cxrgen train-vae`.
pub fn vae(req: &RunRequest) -> Result<ExitCode> {
    report(&crate::train::train_vae(req)?)
}

/// `cxrgen train-diffusion`; `vae`: `--vae`.
pub fn diffusion(req: &RunRequest, vae: Option<&Path>) -> Result<ExitCode> {
    report(&crate::train::train_diffusion(req, vae)?)
}

/// One line on stderr; exit code 130 when Ctrl-C stopped the run.
fn report(s: &TrainSummary) -> Result<ExitCode> {
    eprintln!(
        "{} at step {}; last checkpoint {}; best validation loss {}; non-finite steps skipped {}",
        if s.interrupted {
            "interrupted"
        } else {
            "trained"
        },
        s.steps,
        s.last_checkpoint.display(),
        s.best_val_loss.map_or("n/a".into(), |v| format!("{v:.5}")),
        s.nonfinite_skipped
    );
    Ok(if s.interrupted {
        ExitCode::from(crate::interrupt::EXIT_CODE)
    } else {
        ExitCode::SUCCESS
    })
}
