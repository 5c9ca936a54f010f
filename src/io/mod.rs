//! Files people look at: image grids, loss curves, generated PNGs and DICOMs.

pub mod dicom;
pub mod grid;
pub mod plot;
pub mod png;
