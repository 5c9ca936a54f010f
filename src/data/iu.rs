//! The Indiana University chest X-ray collection (IU-CXR) in its two public layouts.
//!
//! - Kaggle: `indiana_reports.csv` (uid, MeSH, Problems, image, indication, comparison, findings,
//!   impression), `indiana_projections.csv` (uid, filename, projection), images
//!   `images/images_normalized/<uid>_IM-....dcm.png`.
//! - Open-i: `ecgen-radiology/<n>.xml` reports (or the `NLMCXR_reports.tgz` they ship in), images
//!   `NLMCXR_png/CXR<uid>_IM-....png`; the projection comes from `indiana_projections.csv` when it
//!   is beside them (the DICOM view tag is unreliable), else it is unknown.
//!
//! IU-CXR has no patient ids; each report is one patient's study, so the report uid is the patient.
//! A record's label is the report's Problems, or for phantoms (`cxrgen phantom`) the truth column
//! `finding` (normal, cardiomegaly, effusion, pneumothorax, consolidation).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::record::{Collection, Dropped, Projection, Record};

const REPORTS_CSV: &str = "indiana_reports.csv";
const PROJECTIONS_CSV: &str = "indiana_projections.csv";
const OPENI_XML_DIR: &str = "ecgen-radiology";
const OPENI_TGZ: &str = "NLMCXR_reports.tgz";

/// Loads IU-CXR from `dir`, telling the layout by its files: Kaggle when `indiana_reports.csv` is
/// there, else Open-i (`ecgen-radiology/` or `NLMCXR_reports.tgz`).
pub fn load(dir: &Path) -> Result<Collection> {
    if dir.join(REPORTS_CSV).is_file() {
        let images = first_dir(
            dir,
            &["images/images_normalized", "images_normalized", "images"],
        );
        return load_kaggle(&dir.join(REPORTS_CSV), &dir.join(PROJECTIONS_CSV), &images);
    }
    let reports = [dir.join(OPENI_XML_DIR), dir.join(OPENI_TGZ)]
        .into_iter()
        .find(|p| p.exists());
    let Some(reports) = reports else {
        bail!(
            "{} is not an IU-CXR folder: it has neither {REPORTS_CSV} (Kaggle layout) nor {OPENI_XML_DIR}/ or {OPENI_TGZ} (Open-i layout)",
            dir.display()
        );
    };
    let projections = Some(dir.join(PROJECTIONS_CSV)).filter(|p| p.is_file());
    let images = first_dir(dir, &["NLMCXR_png", "images"]);
    load_openi(&reports, &images, projections.as_deref())
}

/// The first of `candidates` under `dir` that exists, else the first one (so that errors name it).
fn first_dir(dir: &Path, candidates: &[&str]) -> PathBuf {
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| dir.join(candidates[0]))
}

#[derive(Deserialize)]
struct KaggleReport {
    uid: String,
    #[serde(rename = "Problems")]
    problems: String,
    findings: String,
    impression: String,
    /// The truth column of `cxrgen phantom` (data::phantom::TRUTH_COLUMNS); absent in IU-CXR.
    #[serde(default)]
    finding: String,
}

#[derive(Deserialize)]
struct KaggleProjection {
    uid: String,
    filename: String,
    projection: String,
}

fn read_csv<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("cannot open {}", path.display()))?;
    reader
        .deserialize()
        .enumerate()
        .map(|(i, row)| row.with_context(|| format!("{} line {}", path.display(), i + 2)))
        .collect()
}

/// The `IM-....` part of an image name, which both layouts share (Open-i `CXR1_1_IM-0001-3001`,
/// Kaggle `1_IM-0001-3001.dcm.png`); the prefixes differ for some reports.
fn image_key(name: &str) -> &str {
    let name = name.strip_suffix(".dcm.png").unwrap_or(name);
    let name = name.strip_suffix(".png").unwrap_or(name);
    name.find("IM-").map_or(name, |i| &name[i..])
}

fn load_projections(path: &Path) -> Result<HashMap<(String, String), Projection>> {
    Ok(read_csv::<KaggleProjection>(path)?
        .into_iter()
        .map(|p| {
            let key = (p.uid, image_key(&p.filename).to_string());
            (key, Projection::parse(&p.projection))
        })
        .collect())
}

pub fn load_kaggle(reports: &Path, projections: &Path, images: &Path) -> Result<Collection> {
    let reports: Vec<KaggleReport> = read_csv(reports)?;
    let rows: Vec<KaggleProjection> = read_csv(projections)?;
    let mut out = Collection {
        reports: reports.len(),
        ..Default::default()
    };
    let by_uid: HashMap<&str, &KaggleReport> =
        reports.iter().map(|r| (r.uid.as_str(), r)).collect();
    let mut with_images = std::collections::HashSet::new();
    for p in &rows {
        let image = images.join(&p.filename);
        match by_uid.get(p.uid.as_str()) {
            Some(r) => {
                with_images.insert(r.uid.as_str());
                out.records.push(Record {
                    dataset: "iu".into(),
                    uid: r.uid.clone(),
                    patient_id: r.uid.clone(),
                    image,
                    projection: Projection::parse(&p.projection),
                    // A phantom's drawn finding is its class; IU-CXR's own label is Problems.
                    label: if r.finding.is_empty() {
                        r.problems.clone()
                    } else {
                        r.finding.clone()
                    },
                    findings: r.findings.trim().to_string(),
                    impression: r.impression.trim().to_string(),
                });
            }
            None => out.dropped.push(Dropped {
                item: image.display().to_string(),
                reason: format!("no report with uid {} in the reports CSV", p.uid),
            }),
        }
    }
    for r in &reports {
        if !with_images.contains(r.uid.as_str()) {
            out.excluded.push(Dropped {
                item: format!("report {}", r.uid),
                reason: "report has no images".into(),
            });
        }
    }
    Ok(out)
}

/// One parsed Open-i report.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenIReport {
    pub uid: String,
    pub findings: String,
    pub impression: String,
    /// MeSH major terms, joined by `;` (the Kaggle "Problems" column has the same terms).
    pub mesh: String,
    /// Image ids such as `CXR1_1_IM-0001-3001`.
    pub images: Vec<String>,
}

pub fn parse_openi_xml(text: &str, origin: &str) -> Result<OpenIReport> {
    let doc = roxmltree::Document::parse(text).with_context(|| format!("{origin}: not XML"))?;
    let uid = doc
        .descendants()
        .find(|n| n.has_tag_name("IUXRId"))
        .and_then(|n| n.attribute("id"))
        .with_context(|| format!("{origin}: no <IUXRId id=...>"))?
        .to_string();
    let section = |label: &str| {
        doc.descendants()
            .find(|n| n.has_tag_name("AbstractText") && n.attribute("Label") == Some(label))
            .and_then(|n| n.text())
            .unwrap_or("")
            .trim()
            .to_string()
    };
    let mesh: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("major"))
        .filter_map(|n| n.text())
        .collect();
    let images = doc
        .descendants()
        .filter(|n| n.has_tag_name("parentImage"))
        .filter_map(|n| n.attribute("id"))
        .map(str::to_string)
        .collect();
    Ok(OpenIReport {
        uid,
        findings: section("FINDINGS"),
        impression: section("IMPRESSION"),
        mesh: mesh.join(";"),
        images,
    })
}

/// The XML texts of `reports`: a folder of `*.xml`, or a `.tgz` holding them.
fn read_openi_xmls(reports: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    if reports.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(reports)
            .with_context(|| format!("cannot list {}", reports.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            out.push((p.display().to_string(), text));
        }
    } else {
        let file = std::fs::File::open(reports)
            .with_context(|| format!("cannot open {}", reports.display()))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let entries = archive
            .entries()
            .with_context(|| format!("{} is not a .tgz archive", reports.display()))?;
        for entry in entries {
            let mut entry =
                entry.with_context(|| format!("{}: damaged archive", reports.display()))?;
            let name = entry.path()?.display().to_string();
            if !name.ends_with(".xml") {
                continue;
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .with_context(|| format!("{}: cannot read {name}", reports.display()))?;
            out.push((format!("{}:{name}", reports.display()), text));
        }
    }
    if out.is_empty() {
        bail!("{} holds no .xml reports", reports.display());
    }
    Ok(out)
}

pub fn load_openi(reports: &Path, images: &Path, projections: Option<&Path>) -> Result<Collection> {
    let xmls = read_openi_xmls(reports)?;
    let projections = projections.map(load_projections).transpose()?;
    let mut out = Collection {
        reports: xmls.len(),
        ..Default::default()
    };
    for (origin, text) in &xmls {
        let report = parse_openi_xml(text, origin)?;
        if report.images.is_empty() {
            out.excluded.push(Dropped {
                item: format!("report {}", report.uid),
                reason: "report has no images".into(),
            });
        }
        for id in &report.images {
            let projection = match &projections {
                Some(map) => map
                    .get(&(report.uid.clone(), image_key(id).to_string()))
                    .copied()
                    .unwrap_or(Projection::Unknown),
                None => Projection::Unknown,
            };
            out.records.push(Record {
                dataset: "iu".into(),
                uid: report.uid.clone(),
                patient_id: report.uid.clone(),
                image: images.join(format!("{id}.png")),
                projection,
                label: report.mesh.clone(),
                findings: report.findings.clone(),
                impression: report.impression.clone(),
            });
        }
    }
    out.records.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_keys_match_across_layouts() {
        assert_eq!(image_key("CXR1_1_IM-0001-3001"), "IM-0001-3001");
        assert_eq!(image_key("1_IM-0001-3001.dcm.png"), "IM-0001-3001");
        assert_eq!(
            image_key("CXR2084_IM-0715-1001-0002.png"),
            "IM-0715-1001-0002"
        );
    }

    #[test]
    fn parses_an_openi_report() {
        let xml = r#"<?xml version="1.0"?><eCitation><IUXRId id="7"/>
            <Abstract><AbstractText Label="FINDINGS">Heart size normal.</AbstractText>
            <AbstractText Label="IMPRESSION"> No acute disease. </AbstractText></Abstract>
            <MeSH><major>normal</major></MeSH>
            <parentImage id="CXR7_IM-2263-1001"/><parentImage id="CXR7_IM-2263-2001"/></eCitation>"#;
        let r = parse_openi_xml(xml, "7.xml").unwrap();
        assert_eq!(r.uid, "7");
        assert_eq!(r.findings, "Heart size normal.");
        assert_eq!(r.impression, "No acute disease.");
        assert_eq!(r.mesh, "normal");
        assert_eq!(r.images, ["CXR7_IM-2263-1001", "CXR7_IM-2263-2001"]);
    }
}
