//! The subcommands, one file or folder each.

pub mod bench;
pub mod check_device;
pub mod generate;
