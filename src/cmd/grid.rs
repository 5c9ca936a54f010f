//! `cxrgen grid`: images tiled into one PNG contact sheet.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

pub struct Request {
    pub images: Vec<PathBuf>,
    /// Images per row.
    pub cols: usize,
    /// Side of each tile in pixels.
    pub tile: u32,
    pub out: PathBuf,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    crate::io::grid::write_grid(&req.images, req.cols, req.tile, &req.out)?;
    Ok(ExitCode::SUCCESS)
}
