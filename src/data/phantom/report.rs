//! The report a phantom comes with: IU-CXR-style findings and impression that say exactly what
//! was drawn.

use super::Finding;
use crate::rng::Rng;

/// Report text describing exactly what was drawn, in the style of IU-CXR reports.
pub(super) fn report(finding: Finding, rng: &mut Rng) -> (String, String) {
    let pick = |rng: &mut Rng, xs: &[&str]| xs[rng.below(xs.len())].to_string();
    let heart_normal = pick(
        rng,
        &[
            "The heart size is normal.",
            "Heart size is within normal limits.",
            "Normal cardiac silhouette.",
        ],
    );
    let lungs_clear = pick(
        rng,
        &[
            "The lungs are clear.",
            "Lungs are clear bilaterally.",
            "No focal airspace consolidation.",
        ],
    );
    let no_pleural = pick(
        rng,
        &[
            "No pleural effusion or pneumothorax.",
            "There is no pleural effusion or pneumothorax.",
        ],
    );
    match finding {
        Finding::Normal => (
            format!("{heart_normal} {lungs_clear} {no_pleural}"),
            pick(
                rng,
                &[
                    "No acute cardiopulmonary abnormality.",
                    "Normal chest.",
                    "No acute disease.",
                ],
            ),
        ),
        Finding::Cardiomegaly => (
            format!(
                "{} {lungs_clear} {no_pleural}",
                pick(
                    rng,
                    &[
                        "The heart is enlarged.",
                        "The cardiac silhouette is enlarged.",
                        "Cardiac enlargement."
                    ]
                )
            ),
            pick(
                rng,
                &[
                    "Cardiomegaly.",
                    "Cardiomegaly without acute pulmonary disease.",
                ],
            ),
        ),
        Finding::Effusion(side) => {
            let s = side.name();
            (
                format!(
                    "{heart_normal} Blunting of the {s} costophrenic angle with a meniscus. No pneumothorax."
                ),
                format!("{} pleural effusion.", capitalise(s)),
            )
        }
        Finding::Pneumothorax(side) => {
            let s = side.name();
            (
                format!(
                    "{heart_normal} A {s} pleural line is seen with no lung markings beyond it. No pleural effusion."
                ),
                format!("{} pneumothorax.", capitalise(s)),
            )
        }
        Finding::Consolidation(lobe) => {
            let l = lobe.name();
            (
                format!("{heart_normal} Focal airspace consolidation in the {l}. {no_pleural}"),
                format!("{} pneumonia.", capitalise(l)),
            )
        }
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}
