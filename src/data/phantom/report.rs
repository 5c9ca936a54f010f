//! The report a phantom comes with: IU-CXR-style findings and impression that say exactly what
//! was drawn, and [`read_finding`], which reads the finding back from such a report.

use std::collections::HashMap;
use std::sync::LazyLock;

use super::Finding;
use crate::rng::Rng;

// The wording: each report picks one sentence of each list it uses.
const HEART_NORMAL: [&str; 3] = [
    "The heart size is normal.",
    "Heart size is within normal limits.",
    "Normal cardiac silhouette.",
];
const LUNGS_CLEAR: [&str; 3] = [
    "The lungs are clear.",
    "Lungs are clear bilaterally.",
    "No focal airspace consolidation.",
];
const NO_PLEURAL: [&str; 2] = [
    "No pleural effusion or pneumothorax.",
    "There is no pleural effusion or pneumothorax.",
];
const NORMAL_IMPRESSION: [&str; 3] = [
    "No acute cardiopulmonary abnormality.",
    "Normal chest.",
    "No acute disease.",
];
const HEART_ENLARGED: [&str; 3] = [
    "The heart is enlarged.",
    "The cardiac silhouette is enlarged.",
    "Cardiac enlargement.",
];
const CARDIOMEGALY_IMPRESSION: [&str; 2] = [
    "Cardiomegaly.",
    "Cardiomegaly without acute pulmonary disease.",
];

/// Which sentence of each list a report uses (an index into it).
#[derive(Debug, Clone, Copy)]
struct Wording {
    heart_normal: usize,
    lungs_clear: usize,
    no_pleural: usize,
    heart_enlarged: usize,
    impression: usize,
}

/// Report text describing exactly what was drawn, in the style of IU-CXR reports.
pub(super) fn report(finding: Finding, rng: &mut Rng) -> (String, String) {
    // The draws in the order the phantoms of earlier versions made them: the same seed, the
    // same text.
    let heart_normal = rng.below(HEART_NORMAL.len());
    let lungs_clear = rng.below(LUNGS_CLEAR.len());
    let no_pleural = rng.below(NO_PLEURAL.len());
    let (heart_enlarged, impression) = match finding {
        Finding::Normal => (0, rng.below(NORMAL_IMPRESSION.len())),
        Finding::Cardiomegaly => {
            let h = rng.below(HEART_ENLARGED.len());
            (h, rng.below(CARDIOMEGALY_IMPRESSION.len()))
        }
        _ => (0, 0),
    };
    compose(
        finding,
        Wording {
            heart_normal,
            lungs_clear,
            no_pleural,
            heart_enlarged,
            impression,
        },
    )
}

fn compose(finding: Finding, w: Wording) -> (String, String) {
    let heart_normal = HEART_NORMAL[w.heart_normal];
    let lungs_clear = LUNGS_CLEAR[w.lungs_clear];
    let no_pleural = NO_PLEURAL[w.no_pleural];
    match finding {
        Finding::Normal => (
            format!("{heart_normal} {lungs_clear} {no_pleural}"),
            NORMAL_IMPRESSION[w.impression].to_string(),
        ),
        Finding::Cardiomegaly => (
            format!(
                "{} {lungs_clear} {no_pleural}",
                HEART_ENLARGED[w.heart_enlarged]
            ),
            CARDIOMEGALY_IMPRESSION[w.impression].to_string(),
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

/// Every report (findings, impression) the writer can give `finding`.
fn every_report(finding: Finding) -> Vec<(String, String)> {
    let impressions = match finding {
        Finding::Normal => NORMAL_IMPRESSION.len(),
        Finding::Cardiomegaly => CARDIOMEGALY_IMPRESSION.len(),
        _ => 1,
    };
    let mut out = Vec::new();
    for heart_normal in 0..HEART_NORMAL.len() {
        for lungs_clear in 0..LUNGS_CLEAR.len() {
            for no_pleural in 0..NO_PLEURAL.len() {
                for heart_enlarged in 0..HEART_ENLARGED.len() {
                    for impression in 0..impressions {
                        let w = Wording {
                            heart_normal,
                            lungs_clear,
                            no_pleural,
                            heart_enlarged,
                            impression,
                        };
                        out.push(compose(finding, w));
                    }
                }
            }
        }
    }
    // Findings that do not use a list give the same text for each of its sentences.
    out.sort();
    out.dedup();
    out
}

/// Every text a phantom report can be (as `cxrgen prepare` makes it under each `data.text`:
/// "findings impression", the findings or the impression alone; cleaning leaves the phantoms'
/// wording as it is) and the finding it states.
static REPORTS: LazyLock<HashMap<String, Finding>> = LazyLock::new(|| {
    Finding::all()
        .into_iter()
        .flat_map(|f| {
            every_report(f)
                .into_iter()
                .flat_map(move |(findings, impression)| {
                    [format!("{findings} {impression}"), findings, impression].map(|t| (t, f))
                })
        })
        .collect()
});

/// The finding a phantom report states, read back from its text (findings then impression, or
/// one of them alone, as the cache holds it; runs of whitespace count as one space). None when the text is not one
/// that `cxrgen phantom` writes: it is matched against every report the writer can give, so a
/// report that was edited, or a real one, is not read as a phantom's.
pub fn read_finding(text: &str) -> Option<Finding> {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    REPORTS.get(&text).copied()
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map_or(String::new(), |f| f.to_uppercase().chain(c).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TextSections;
    use crate::data::clean::clean_report;

    #[test]
    fn every_report_the_writer_gives_reads_back_as_its_finding() {
        let mut texts = 0;
        for finding in Finding::all() {
            let reports = every_report(finding);
            assert!(!reports.is_empty());
            for (findings, impression) in reports {
                // As the cache holds it: cleaned, findings then impression, or one of them.
                let cleaned = clean_report(&findings, &impression, TextSections::default());
                assert_eq!(cleaned, format!("{findings} {impression}"));
                for sections in [
                    TextSections::FindingsAndImpression,
                    TextSections::Findings,
                    TextSections::Impression,
                ] {
                    // A text two findings share would read back as one of them only.
                    let text = clean_report(&findings, &impression, sections);
                    assert_eq!(read_finding(&text), Some(finding), "{text}");
                }
                texts += 1;
            }
        }
        // Normal 3·3·2·3, cardiomegaly 3·3·2·2, each effusion and pneumothorax 3, each lobe 3·2.
        assert_eq!(texts, 54 + 36 + 4 * 3 + 5 * 6);
    }

    #[test]
    fn drawn_reports_read_back_and_other_texts_do_not() {
        for seed in 0..300 {
            let mut rng = Rng::new(seed);
            let finding = Finding::random(&mut rng);
            let (f, i) = report(finding, &mut rng);
            assert_eq!(read_finding(&format!(" {f}\n {i} ")), Some(finding));
            assert!(every_report(finding).contains(&(f, i)));
        }
        for text in [
            "",
            "The heart size is normal.",
            "The heart size is normal. The lungs are clear.",
            "Pleural effusion.",
            "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear. No acute disease.",
            "The heart size is normal. Blunting of the right costophrenic angle with a meniscus. No pneumothorax. Left pleural effusion.",
        ] {
            assert_eq!(read_finding(text), None, "{text}");
        }
    }
}
