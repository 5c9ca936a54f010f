//! Data: loaders (IU-CXR in both public layouts, CSV manifests), report cleaning, patient-level
//! splits.

pub mod cache;
pub mod clean;
pub mod decode;
pub mod iu;
pub mod manifest;
pub mod phantom;
pub mod prepare;
pub mod record;
pub mod split;

pub use record::{Collection, Dropped, Projection, Record};
