//! Files people look at: image grids and loss curves.

pub mod grid;
pub mod plot;
pub mod png;
