//! Files: written safely (fs.rs), and those people look at: image grids, loss curves, generated
//! PNGs and DICOMs.

pub mod dicom;
pub mod font;
pub mod fs;
pub mod grid;
pub mod plot;
pub mod png;
pub mod progress;
pub mod stdout;
