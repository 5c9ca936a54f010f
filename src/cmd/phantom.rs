//! `cxrgen phantom`: procedural chest radiographs with known findings, written as a dataset in the
//! Kaggle IU-CXR layout (the work is [`crate::data::phantom`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

pub struct Request {
    pub out: PathBuf,
    pub n: usize,
    pub size: usize,
    pub seed: u64,
    pub progress: bool,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    if req.n == 0 {
        bail!("--n 0: nothing to write");
    }
    if !(32..=2048).contains(&req.size) {
        bail!("--size {}: must be between 32 and 2048 pixels", req.size);
    }
    if req.out.join("indiana_reports.csv").exists() {
        bail!(
            "{} already holds a dataset (indiana_reports.csv); choose another --out",
            req.out.display()
        );
    }
    let bar = crate::io::progress::bar(req.n as u64, req.progress, None);
    crate::data::phantom::write_dataset(&req.out, req.n, req.size, req.seed, &bar)?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} phantom radiographs of {}×{} to {}",
        req.n,
        req.size,
        req.size,
        req.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
