//! `cxrgen grid`: images tiled into one PNG contact sheet.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};

pub struct Request {
    pub images: Vec<PathBuf>,
    /// Images per row.
    pub cols: usize,
    /// Side of each tile in pixels.
    pub tile: u32,
    pub out: PathBuf,
}

pub fn run(req: &Request) -> Result<ExitCode> {
    if req.tile == 0 {
        bail!("--tile 0: a tile must be at least 1 pixel wide");
    }
    if req.cols == 0 {
        bail!("--cols 0: a row must hold at least 1 image");
    }
    crate::io::grid::write_grid(&req.images, req.cols, req.tile, &req.out)?;
    Ok(ExitCode::SUCCESS)
}
