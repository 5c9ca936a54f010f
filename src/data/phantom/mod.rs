//! A procedural chest radiograph with known ground truth, and the measurements that read the
//! truth back from an image.
//!
//! Each phantom is a frontal (PA) view: trunk and shoulders, two lung fields with vessel markings,
//! posterior and anterior ribs, clavicles, spine, mediastinum with the aortic knob and hila, heart,
//! diaphragm domes with a gastric bubble, and one finding: normal, cardiomegaly (cardiothoracic
//! ratio above 0.5), pleural effusion (blunted costophrenic angle with a meniscus), pneumothorax (a
//! visceral pleural line with no markings beyond it) or consolidation in a named lobe. As on a real
//! PA film, the patient's right is on the image's left.
//!
//! Everything is drawn in normalised coordinates (x to the image's right, y down, both in [0, 1])
//! and rendered at any size. Intensities follow a radiograph: air dark, soft tissue grey, bone
//! bright; the darkest air and the densest bone saturate, so a min-max stretch leaves the image as
//! it is. The thresholds of [`measure`] rely on that scale.
//!
//! The rooms: the truth (this file: findings, sides, lobes), `anatomy.rs` (the geometry of one
//! chest), `render.rs` (drawing it), `report.rs` (the report text that says what was drawn),
//! `dataset.rs` (a whole dataset in the IU-CXR layout) and `measure.rs` (reading the truth back).

use serde::{Deserialize, Serialize};

use crate::rng::Rng;

mod anatomy;
mod dataset;
mod measure;
mod render;
mod report;

pub use dataset::{write_dataset, TRUTH_COLUMNS};
pub use measure::{measure, Measurement};
pub use render::render;
pub use report::read_finding;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Right,
    Left,
}

impl Side {
    fn image_index(self) -> usize {
        match self {
            Side::Right => 0, // the patient's right is the image's left
            Side::Left => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Side::Right => "right",
            Side::Left => "left",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lobe {
    RightUpper,
    RightMiddle,
    RightLower,
    LeftUpper,
    LeftLower,
}

impl Lobe {
    pub const ALL: [Lobe; 5] = [
        Lobe::RightUpper,
        Lobe::RightMiddle,
        Lobe::RightLower,
        Lobe::LeftUpper,
        Lobe::LeftLower,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lobe::RightUpper => "right upper lobe",
            Lobe::RightMiddle => "right middle lobe",
            Lobe::RightLower => "right lower lobe",
            Lobe::LeftUpper => "left upper lobe",
            Lobe::LeftLower => "left lower lobe",
        }
    }

    fn side(self) -> Side {
        match self {
            Lobe::RightUpper | Lobe::RightMiddle | Lobe::RightLower => Side::Right,
            Lobe::LeftUpper | Lobe::LeftLower => Side::Left,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finding {
    Normal,
    Cardiomegaly,
    Effusion(Side),
    Pneumothorax(Side),
    Consolidation(Lobe),
}

impl Finding {
    /// A finding drawn at random: 30 % normal, the rest evenly over the four abnormal kinds.
    pub fn random(rng: &mut Rng) -> Self {
        let side = |rng: &mut Rng| {
            if rng.uniform() < 0.5 {
                Side::Right
            } else {
                Side::Left
            }
        };
        let u = rng.uniform();
        if u < 0.3 {
            Finding::Normal
        } else if u < 0.475 {
            Finding::Cardiomegaly
        } else if u < 0.65 {
            Finding::Effusion(side(rng))
        } else if u < 0.825 {
            Finding::Pneumothorax(side(rng))
        } else {
            Finding::Consolidation(Lobe::ALL[rng.below(5)])
        }
    }

    /// Every finding a phantom can have: normal, cardiomegaly, an effusion and a pneumothorax on
    /// each side, a consolidation in each lobe.
    pub fn all() -> Vec<Finding> {
        let mut all = vec![Finding::Normal, Finding::Cardiomegaly];
        for side in [Side::Right, Side::Left] {
            all.extend([Finding::Effusion(side), Finding::Pneumothorax(side)]);
        }
        all.extend(Lobe::ALL.map(Finding::Consolidation));
        all
    }

    /// The kinds of [`Finding::kind`], in this order.
    pub const KINDS: [&'static str; 5] = [
        "normal",
        "cardiomegaly",
        "effusion",
        "pneumothorax",
        "consolidation",
    ];

    /// The finding in words, with its side or lobe: `effusion right`, `consolidation right
    /// lower lobe`.
    pub fn name(&self) -> String {
        match self {
            Finding::Normal | Finding::Cardiomegaly => self.kind().into(),
            Finding::Effusion(s) | Finding::Pneumothorax(s) => {
                format!("{} {}", self.kind(), s.name())
            }
            Finding::Consolidation(l) => format!("consolidation {}", l.name()),
        }
    }

    /// A short label: `normal`, `cardiomegaly`, `effusion`, `pneumothorax`, `consolidation`.
    pub fn kind(&self) -> &'static str {
        match self {
            Finding::Normal => "normal",
            Finding::Cardiomegaly => "cardiomegaly",
            Finding::Effusion(_) => "effusion",
            Finding::Pneumothorax(_) => "pneumothorax",
            Finding::Consolidation(_) => "consolidation",
        }
    }

    pub fn side(&self) -> Option<Side> {
        match self {
            Finding::Effusion(s) | Finding::Pneumothorax(s) => Some(*s),
            Finding::Consolidation(l) => Some(l.side()),
            _ => None,
        }
    }

    pub fn lobe(&self) -> Option<Lobe> {
        match self {
            Finding::Consolidation(l) => Some(*l),
            _ => None,
        }
    }
}

/// One rendered phantom and its truth.
#[derive(Debug, Clone)]
pub struct Phantom {
    pub finding: Finding,
    /// The drawn cardiothoracic ratio: heart width / inner thoracic width.
    pub ctr: f64,
    /// `size`×`size` intensities in [0, 1], row-major.
    pub pixels: Vec<f32>,
    pub size: usize,
    pub findings_text: String,
    pub impression_text: String,
}

impl Phantom {
    pub fn to_u8(&self) -> Vec<u8> {
        self.pixels
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect()
    }
}
