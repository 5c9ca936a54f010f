//! Phantoms (the rooms come next; render.rs holds them all for now).

mod render;

pub use render::*;
