//! The diffusion process: noise schedules (samplers come with issue #5).

pub mod schedule;

pub use schedule::NoiseSchedule;
