//! `cxrgen prepare`: a dataset decoded, resized and cleaned once into the cache training reads
//! (the work is [`crate::data::prepare`]); a summary on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::config::Config;
use crate::data::prepare::{PrepareOptions, Source};
use crate::io::stdout::Stdout;

pub struct Request {
    /// A config file or preset (its `data:` section is used).
    pub config: String,
    pub source: Source,
    pub out: PathBuf,
    pub split: Option<PathBuf>,
    pub strict: bool,
    pub force: bool,
    /// The summary as JSON.
    pub json: bool,
    pub progress: bool,
}

pub fn run(req: Request) -> Result<ExitCode> {
    let cfg = Config::load(&req.config)?;
    let opts = PrepareOptions {
        source: req.source,
        out: req.out,
        split_file: req.split,
        strict: req.strict,
        force: req.force,
        progress: req.progress,
    };
    let summary = crate::data::prepare::prepare(&cfg, &opts)?;
    let mut out = Stdout::lock();
    if req.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    } else {
        write!(out, "{}", summary.human())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
