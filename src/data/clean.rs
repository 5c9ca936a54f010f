//! Report cleaning (paper §3.1.2): the text a model is conditioned on.
//!
//! In order, per section: IU's anonymiser damage repaired where the word is certain (`x-XXXX` was
//! "x-ray") and the remaining `XXXX` tokens removed; template sentences dropped; comparison
//! clauses ("..., unchanged from prior") removed, since one image cannot show a change; list
//! numbering and measurement notations ("8 mm", "2.3 x 1.8 cm") removed; abbreviations expanded
//! from [`ABBREVIATIONS`]; punctuation and whitespace normalised. Findings and impression are then
//! joined. Truncation to the token limit is left to the tokenizer. docs/data.md lists the rules.

use std::sync::LazyLock;

use regex::Regex;

use crate::config::TextSections;

/// Abbreviation → expansion, matched as whole words with this exact case. Ambiguous ones are left
/// alone: "PA" is both posteroanterior and pulmonary artery, "AP" both a view and an artery.
pub const ABBREVIATIONS: &[(&str, &str)] = &[
    ("RUL", "right upper lobe"),
    ("RML", "right middle lobe"),
    ("RLL", "right lower lobe"),
    ("LUL", "left upper lobe"),
    ("LLL", "left lower lobe"),
    ("COPD", "chronic obstructive pulmonary disease"),
    ("CHF", "congestive heart failure"),
    ("ARDS", "acute respiratory distress syndrome"),
    ("CABG", "coronary artery bypass graft"),
    ("PICC", "peripherally inserted central catheter"),
    ("SVC", "superior vena cava"),
    ("IVC", "inferior vena cava"),
    ("IJ", "internal jugular"),
    ("ETT", "endotracheal tube"),
    ("NGT", "nasogastric tube"),
    ("NG", "nasogastric"),
    ("OG", "orogastric"),
    ("CVL", "central venous line"),
    ("CVC", "central venous catheter"),
    ("AICD", "automatic implantable cardioverter-defibrillator"),
    ("ICD", "implantable cardioverter-defibrillator"),
    ("DISH", "diffuse idiopathic skeletal hyperostosis"),
    ("TB", "tuberculosis"),
    ("CT", "computed tomography"),
    ("s/p", "status post"),
    ("w/o", "without"),
    ("w/", "with"),
    ("b/l", "bilateral"),
    ("T-spine", "thoracic spine"),
];

/// Sentences that carry no finding: IU's templates (with their `XXXX`) and recommendations.
static TEMPLATE_SENTENCES: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        r"^the heart and lungs have (xxxx\s*)+in the interval\.?$",
        r"^no (prior )?comparisons?( (study|studies|exam|examination|available))?\b",
        r"^comparisons?:?\s*(xxxx|none|\W)*$",
        r"^(recommend|please|findings (were )?(discussed|called)|these findings were)\b",
    ]
    .iter()
    .map(|p| Regex::new(&format!("(?i){p}")).expect("valid template regex"))
    .collect()
});

static COMPARISON_PREFIX: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)^comparisons?:?\s*(xxxx[\s,]*)+").unwrap());

static COMPARISON_CLAUSE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i),?\s*(and\s+)?(grossly\s+)?(unchanged|stable|similar)?\s*(when\s+)?(compared\s+(to|with)|from|since)\s+(the\s+|a\s+)?(prior|previous|recent|most recent)(\s+(chest\s+)?(examination|exam|study|studies|radiographs?|films?|x-ray|imaging|ct))?\b",
    )
    .unwrap()
});

static XRAY: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)\bx-XXXX\b").unwrap());
/// An anonymiser run with the hyphens, slashes and clitics glued to it ("dual-XXXX", "XXXX's",
/// "4XXXX", "XXXX/granulomas"): IU's runs are always upper-case X, four or more.
static ANONYMISED: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[-/]*\d*X{4,}(?:'s|'t|[-/'])*").unwrap());
static EMPTY_BRACKETS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\(\s*\)|<\s*>|\[\s*\]").unwrap());
static MEASUREMENT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(an?\s+)?\d+(\.\d+)?\s*(mm|cm)?\s*(x|×)\s*\d+(\.\d+)?\s*(mm|cm)\b|\b(an?\s+)?\d+(\.\d+)?\s*(mm|cm)\b")
        .unwrap()
});
/// "1. Fractures" at a sentence start; "effusions 2." where the next item's number was left at the
/// end of a sentence.
static LEADING_NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^\d{1,2}[.)]\s+").unwrap());
static TRAILING_NUMBER: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+\d{1,2}[.)]$").unwrap());
static SENTENCE_END: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"([.!?])\s+").unwrap());
static SPACE_BEFORE_PUNCT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+([.,;:])").unwrap());
static REPEATED_PUNCT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([.,;:])[\s.,;:]*([.,;:])").unwrap());
static LEADING_PUNCT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[\s.,;:-]+").unwrap());
static SPACES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\s+").unwrap());
static ABBREVIATION_RES: LazyLock<Vec<(Regex, &str)>> = LazyLock::new(|| {
    ABBREVIATIONS
        .iter()
        .map(|(short, long)| {
            // `\b` cannot anchor a trailing '/': use explicit non-word boundaries.
            let re =
                Regex::new(&format!(r"(^|[^\w/]){}($|[^\w/-])", regex::escape(short))).unwrap();
            (re, *long)
        })
        .collect()
});

/// The conditioning text of one report: the cleaned sections `sections` names, findings first.
pub fn clean_report(findings: &str, impression: &str, sections: TextSections) -> String {
    let chosen: &[&str] = match sections {
        TextSections::FindingsAndImpression => &[findings, impression],
        TextSections::Findings => &[findings],
        TextSections::Impression => &[impression],
    };
    let parts: Vec<String> = chosen
        .iter()
        .map(|s| clean_section(s))
        .filter(|s| !s.is_empty())
        .collect();
    parts.join(" ")
}

/// Cleans one report section.
pub fn clean_section(text: &str) -> String {
    let text = SPACES.replace_all(text.trim(), " ");
    let text = XRAY.replace_all(&text, "x-ray");
    let sentences: Vec<String> = split_sentences(&text)
        .into_iter()
        .filter(|s| !TEMPLATE_SENTENCES.iter().any(|re| re.is_match(s)))
        .map(|s| clean_sentence(&s))
        .filter(|s| s.chars().any(char::is_alphabetic))
        .collect();
    sentences.join(" ")
}

fn split_sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    for m in SENTENCE_END.find_iter(text) {
        // Keep decimals ("1.5 cm") together: a sentence ends at a mark followed by whitespace.
        out.push(text[start..m.start() + 1].trim().to_string());
        start = m.end();
    }
    out.push(text[start..].trim().to_string());
    out.retain(|s| !s.is_empty());
    out
}

fn clean_sentence(sentence: &str) -> String {
    let s = COMPARISON_PREFIX.replace(sentence, "");
    let s = COMPARISON_CLAUSE.replace_all(&s, "");
    let s = ANONYMISED.replace_all(&s, "");
    let s = EMPTY_BRACKETS.replace_all(&s, "");
    let s = MEASUREMENT.replace_all(&s, |c: &regex::Captures| {
        // "an 8 mm nodule" → "a nodule": keep an article that stood before the number.
        if c.get(1).or(c.get(7)).is_some() {
            "a".to_string()
        } else {
            String::new()
        }
    });
    let s = LEADING_NUMBER.replace(&s, "");
    let s = TRAILING_NUMBER.replace(&s, ".");
    let mut s = s.into_owned();
    for (re, long) in ABBREVIATION_RES.iter() {
        s = re
            .replace_all(&s, format!("${{1}}{long}${{2}}"))
            .into_owned();
    }
    let s = SPACES.replace_all(&s, " ");
    let s = SPACE_BEFORE_PUNCT.replace_all(&s, "$1");
    let s = REPEATED_PUNCT.replace_all(&s, "$2");
    let s = LEADING_PUNCT.replace(&s, "");
    let s = s.trim();
    capitalise(s)
}

fn capitalise(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real IU-CXR sentences (indiana_reports.csv, uid in the comment) and their cleaned form.
    #[test]
    fn anonymiser_tokens() {
        // uid 1
        assert_eq!(clean_section("Normal chest x-XXXX."), "Normal chest x-ray.");
        // uid 1
        assert_eq!(
            clean_section(
                "There are no XXXX of a pleural effusion. There is no evidence of pneumothorax."
            ),
            "There are no of a pleural effusion. There is no evidence of pneumothorax."
        );
        // uid 716
        assert_eq!(
            clean_section("Calcified hilar lymph XXXX."),
            "Calcified hilar lymph."
        );
        // Runs glued to other characters.
        assert_eq!(
            clean_section("Calcified XXXX/granulomas."),
            "Calcified granulomas."
        );
        assert_eq!(
            clean_section("Status post dual-XXXX pacemaker."),
            "Status post dual pacemaker."
        );
        assert_eq!(
            clean_section("The XXXX's contour (XXXX) is 4XXXX normal."),
            "The contour is normal."
        );
    }

    #[test]
    fn templates_and_comparisons() {
        assert_eq!(
            clean_section(
                "The heart and lungs have XXXX XXXX in the interval. Both lungs are clear."
            ),
            "Both lungs are clear."
        );
        assert_eq!(
            clean_section("No comparison chest x-XXXX. Heart size normal."),
            "Heart size normal."
        );
        assert_eq!(
            clean_section("Comparison XXXX, XXXX. Clear lungs."),
            "Clear lungs."
        );
        assert_eq!(
            clean_section("Comparison XXXX, XXXX Well-expanded and clear lungs."),
            "Well-expanded and clear lungs."
        );
        assert_eq!(
            clean_section("The cardiomediastinal silhouette is normal and unchanged compared to prior examination."),
            "The cardiomediastinal silhouette is normal."
        );
        assert_eq!(
            clean_section("There is biapical pleural thickening, unchanged from prior."),
            "There is biapical pleural thickening."
        );
        assert_eq!(
            clean_section("No XXXX acute abnormalities since the previous chest radiograph."),
            "No acute abnormalities."
        );
        assert_eq!(
            clean_section(
                "If none are available, recommend short-term XXXX in 3 to 4 months. Clear lungs."
            ),
            "If none are available, recommend short-term in 3 to 4 months. Clear lungs."
        );
        assert_eq!(
            clean_section("Recommend followup CT. Clear lungs."),
            "Clear lungs."
        );
    }

    #[test]
    fn measurements_numbering_abbreviations() {
        // uid 2386
        assert_eq!(
            clean_section("There is an 8 mm calcified nodule in the left midlung."),
            "There is a calcified nodule in the left midlung."
        );
        // uid 2119
        assert_eq!(
            clean_section("1 cm nodule within the lung base, seen only on the lateral view."),
            "Nodule within the lung base, seen only on the lateral view."
        );
        assert_eq!(
            clean_section("A 2.3 x 1.8 cm mass in the RUL."),
            "A mass in the right upper lobe."
        );
        // uid 2084 (impression), uid 2637
        assert_eq!(
            clean_section("1. Pathologic fractures seen at T5 and L2. 2. COPD."),
            "Pathologic fractures seen at T5 and L2. Chronic obstructive pulmonary disease."
        );
        assert_eq!(
            clean_section("Cardiomegaly and small bilateral pleural effusions 2."),
            "Cardiomegaly and small bilateral pleural effusions."
        );
        assert_eq!(clean_section("Left IJ catheter tip in the SVC, s/p CABG."), "Left internal jugular catheter tip in the superior vena cava, status post coronary artery bypass graft.");
        assert_eq!(
            clean_section("Enlarged PA. RLL opacity."),
            "Enlarged PA. Right lower lobe opacity."
        );
    }

    #[test]
    fn sections_are_joined_and_whitespace_normalised() {
        assert_eq!(
            clean_report(
                "  Heart size normal.\n\n Lungs   clear. ",
                "No acute disease.",
                TextSections::FindingsAndImpression
            ),
            "Heart size normal. Lungs clear. No acute disease."
        );
        let both = TextSections::FindingsAndImpression;
        assert_eq!(
            clean_report("", "No acute disease.", both),
            "No acute disease."
        );
        assert_eq!(clean_report("XXXX.", "", both), "");
    }

    #[test]
    fn one_section_alone_is_the_text_when_asked_for() {
        let (f, i) = (
            "Blunting of the left costophrenic angle.",
            "Left pleural effusion.",
        );
        assert_eq!(clean_report(f, i, TextSections::Impression), i);
        assert_eq!(clean_report(f, i, TextSections::Findings), f);
        assert_eq!(clean_report(f, "", TextSections::Impression), "");
    }
}
