//! Patient-level train / validation / test splits, deterministic from a seed, kept in a split file
//! (`split.csv`: patient_id, split) that every later stage and `eval` reuse.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::record::Record;
use crate::config::SplitConfig;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.name() == s)
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Patient → split.
pub type Assignment = BTreeMap<String, Split>;

/// Assigns every patient of `records` to a split so that each split's share of *images* is close
/// to the configured fractions: patients are shuffled with the seed, then each goes to the split
/// furthest below its target. Same records and seed, same assignment.
pub fn assign(records: &[Record], cfg: &SplitConfig) -> Assignment {
    let mut images: BTreeMap<&str, usize> = BTreeMap::new();
    for r in records {
        *images.entry(r.patient_id.as_str()).or_default() += 1;
    }
    let mut patients: Vec<(&str, usize)> = images.into_iter().collect();
    let mut rng = Rng::new(cfg.seed);
    for i in (1..patients.len()).rev() {
        patients.swap(i, rng.below(i + 1));
    }
    let targets = [cfg.train, cfg.val, cfg.test];
    let mut assigned = [0usize; 3];
    let mut out = Assignment::new();
    for (patient, n) in patients {
        let total = assigned.iter().sum::<usize>() + n;
        let k = (0..3)
            .max_by(|&a, &b| {
                let deficit = |k: usize| targets[k] * total as f64 - assigned[k] as f64;
                deficit(a).total_cmp(&deficit(b)).then(b.cmp(&a))
            })
            .expect("three splits");
        assigned[k] += n;
        out.insert(patient.to_string(), Split::ALL[k]);
    }
    out
}

/// Writes `patient_id,split` rows, sorted by patient.
pub fn write(path: &Path, assignment: &Assignment) -> Result<()> {
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("cannot write {}", path.display()))?;
    w.write_record(["patient_id", "split"])?;
    for (patient, split) in assignment {
        w.write_record([patient.as_str(), split.name()])?;
    }
    w.flush()?;
    Ok(())
}

pub fn read(path: &Path) -> Result<Assignment> {
    let mut r = csv::Reader::from_path(path)
        .with_context(|| format!("cannot open split file {}", path.display()))?;
    let mut out = Assignment::new();
    for (i, row) in r.records().enumerate() {
        let row = row.with_context(|| format!("{} line {}", path.display(), i + 2))?;
        let (patient, split) = (row.get(0).unwrap_or(""), row.get(1).unwrap_or(""));
        let Some(split) = Split::parse(split) else {
            bail!(
                "{} line {}: split {split:?} is not train, val or test",
                path.display(),
                i + 2
            );
        };
        if out.insert(patient.to_string(), split).is_some() {
            bail!(
                "{} line {}: patient {patient} appears twice",
                path.display(),
                i + 2
            );
        }
    }
    Ok(out)
}

/// The split of each record, from an assignment that must cover every patient.
pub fn of_records(records: &[Record], assignment: &Assignment, origin: &str) -> Result<Vec<Split>> {
    let mut missing: HashMap<&str, ()> = HashMap::new();
    let splits: Vec<Split> = records
        .iter()
        .map(|r| {
            assignment.get(&r.patient_id).copied().unwrap_or_else(|| {
                missing.insert(&r.patient_id, ());
                Split::Train
            })
        })
        .collect();
    if !missing.is_empty() {
        let mut some: Vec<&str> = missing.into_keys().collect();
        some.sort();
        bail!(
            "{origin} has no split for {} patient(s), e.g. {}",
            some.len(),
            some.iter().take(5).copied().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(splits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Projection;

    fn records(patients: &[(&str, usize)]) -> Vec<Record> {
        patients
            .iter()
            .flat_map(|(p, n)| {
                (0..*n).map(move |i| Record {
                    dataset: "t".into(),
                    uid: format!("{p}-{i}"),
                    patient_id: p.to_string(),
                    image: format!("{p}-{i}.png").into(),
                    projection: Projection::Frontal,
                    label: String::new(),
                    findings: String::new(),
                    impression: String::new(),
                })
            })
            .collect()
    }

    #[test]
    fn deterministic_patient_level_and_close_to_targets() {
        let ps: Vec<(String, usize)> = (0..500).map(|i| (format!("p{i}"), 1 + i % 4)).collect();
        let ps: Vec<(&str, usize)> = ps.iter().map(|(p, n)| (p.as_str(), *n)).collect();
        let recs = records(&ps);
        let cfg = SplitConfig {
            train: 0.7,
            val: 0.1,
            test: 0.2,
            seed: 3,
        };
        let a = assign(&recs, &cfg);
        assert_eq!(a, assign(&recs, &cfg));
        let other = assign(
            &recs,
            &SplitConfig {
                seed: 4,
                ..cfg.clone()
            },
        );
        assert_ne!(a, other);
        let splits = of_records(&recs, &a, "test").unwrap();
        for (k, target) in [(Split::Train, 0.7), (Split::Val, 0.1), (Split::Test, 0.2)] {
            let share = splits.iter().filter(|&&s| s == k).count() as f64 / recs.len() as f64;
            assert!((share - target).abs() < 0.01, "{k}: {share}");
        }
    }

    #[test]
    fn split_file_round_trips_and_rejects_bad_rows() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let recs = records(&[("a", 1), ("b", 2), ("c", 1)]);
        let cfg = SplitConfig {
            train: 0.5,
            val: 0.25,
            test: 0.25,
            seed: 0,
        };
        let a = assign(&recs, &cfg);
        let path = dir.join("split.csv");
        write(&path, &a).unwrap();
        assert_eq!(read(&path).unwrap(), a);
        std::fs::write(&path, "patient_id,split\na,train\nb,holdout\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("line 3") && err.contains("holdout"), "{err}");
        let partial: Assignment = [("a".to_string(), Split::Train)].into_iter().collect();
        let err = of_records(&recs, &partial, "split.csv")
            .unwrap_err()
            .to_string();
        assert!(err.contains("2 patient(s)") && err.contains('b'), "{err}");
    }
}
