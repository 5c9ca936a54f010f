//! Files people look at: image grids.

pub mod grid;
