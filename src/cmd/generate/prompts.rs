//! `--prompts-file`: what to generate, a prompt a line or a CSV with `prompt,n,seed` columns.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// One prompt of a prompts file and the images it asks for: seeds `seed .. seed + n`.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub prompt: String,
    pub n: usize,
    pub seed: u64,
    /// Line of the file it came from (1-based); names its images, so that they stay the same
    /// when lines are added below.
    pub line: usize,
}

/// Reads a prompts file. A `.csv` file has a header naming a `prompt` column and optionally `n`
/// and `seed` (the defaults fill what a row leaves out); any other file holds one prompt a line,
/// each with the default `n` and `seed`. Blank lines are skipped. Errors name the file and line:
/// bytes that are not UTF-8, a bad number, an empty prompt (allowed with `allow_empty`).
pub fn read(
    path: &Path,
    default_n: usize,
    default_seed: u64,
    allow_empty: bool,
) -> Result<Vec<Job>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("--prompts-file {}: cannot read it", path.display()))?;
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = std::str::from_utf8(raw).map_err(|e| {
            anyhow::anyhow!(
                "--prompts-file {} line {}: not UTF-8 (byte {} of the line)",
                path.display(),
                i + 1,
                e.valid_up_to() + 1
            )
        })?;
        lines.push(line.strip_suffix('\r').unwrap_or(line));
    }
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let jobs = if is_csv {
        read_csv(path, &lines.join("\n"), default_n, default_seed)?
    } else {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| Job {
                prompt: l.trim().to_string(),
                n: default_n,
                seed: default_seed,
                line: i + 1,
            })
            .collect()
    };
    if jobs.is_empty() {
        bail!("--prompts-file {}: no prompts in it", path.display());
    }
    for job in &jobs {
        if job.prompt.is_empty() && !allow_empty {
            bail!(
                "--prompts-file {} line {}: empty prompt (pass --unconditional to allow unconditional samples)",
                path.display(),
                job.line
            );
        }
        if job.n == 0 {
            bail!(
                "--prompts-file {} line {}: n is 0",
                path.display(),
                job.line
            );
        }
        if job.seed.checked_add(job.n as u64 - 1).is_none() {
            bail!(
                "--prompts-file {} line {}: seed + n overflows",
                path.display(),
                job.line
            );
        }
    }
    Ok(jobs)
}

fn read_csv(path: &Path, text: &str, default_n: usize, default_seed: u64) -> Result<Vec<Job>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .with_context(|| {
            format!(
                "--prompts-file {}: cannot read the CSV header",
                path.display()
            )
        })?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let Some(prompt_col) = column("prompt") else {
        bail!(
            "--prompts-file {}: the CSV header ({}) has no `prompt` column",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(",")
        );
    };
    let (n_col, seed_col) = (column("n"), column("seed"));
    let mut jobs = Vec::new();
    for record in reader.records() {
        let record = record.with_context(|| format!("--prompts-file {}", path.display()))?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let field = |col: Option<usize>| {
            col.and_then(|c| record.get(c))
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        let number = |col, name: &str| -> Result<Option<u64>> {
            field(col)
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        anyhow::anyhow!(
                            "--prompts-file {} line {line}: {name} '{v}' is not a whole number ≥ 0",
                            path.display()
                        )
                    })
                })
                .transpose()
        };
        jobs.push(Job {
            prompt: field(Some(prompt_col)).unwrap_or("").to_string(),
            n: number(n_col, "n")?.map_or(default_n, |n| n as usize),
            seed: number(seed_col, "seed")?.unwrap_or(default_seed),
            line,
        });
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn plain_lines_skip_blanks_and_keep_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            &dir,
            "a.txt",
            b"Left pleural effusion.\r\n\n  Cardiomegaly.  \n",
        );
        let jobs = read(&p, 2, 7, false).unwrap();
        assert_eq!(
            jobs,
            vec![
                Job {
                    prompt: "Left pleural effusion.".into(),
                    n: 2,
                    seed: 7,
                    line: 1
                },
                Job {
                    prompt: "Cardiomegaly.".into(),
                    n: 2,
                    seed: 7,
                    line: 3
                },
            ]
        );
    }

    #[test]
    fn csv_rows_fill_missing_values_from_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(
            &dir,
            "b.csv",
            b"prompt,n,seed\n\"Effusion, right.\",3,100\nNo acute disease.,,\n",
        );
        let jobs = read(&p, 1, 5, false).unwrap();
        assert_eq!(
            jobs[0],
            Job {
                prompt: "Effusion, right.".into(),
                n: 3,
                seed: 100,
                line: 2
            }
        );
        assert_eq!(
            jobs[1],
            Job {
                prompt: "No acute disease.".into(),
                n: 1,
                seed: 5,
                line: 3
            }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(&file(&dir, "c.txt", b"ok\n\xff\xfebad\n"), 1, 0, false).unwrap_err();
        assert!(e.to_string().contains("line 2: not UTF-8"), "{e}");
        let e = read(&file(&dir, "d.csv", b"prompt,n\nx,two\n"), 1, 0, false).unwrap_err();
        assert!(e.to_string().contains("line 2: n 'two'"), "{e}");
        let e = read(&file(&dir, "e.csv", b"text\nx\n"), 1, 0, false).unwrap_err();
        assert!(e.to_string().contains("no `prompt` column"), "{e}");
        let e = read(&file(&dir, "f.csv", b"prompt,seed\n,3\n"), 1, 0, false).unwrap_err();
        assert!(e.to_string().contains("line 2: empty prompt"), "{e}");
        assert_eq!(
            read(&file(&dir, "f.csv", b"prompt,seed\n,3\n"), 1, 0, true).unwrap()[0].seed,
            3
        );
        let e = read(&file(&dir, "g.txt", b"\n\n"), 1, 0, false).unwrap_err();
        assert!(e.to_string().contains("no prompts"), "{e}");
    }
}
