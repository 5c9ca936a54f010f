//! Training: the two objectives (the loops, optimizer, checkpoints and memory levers come with
//! issue #4).

pub mod losses;
