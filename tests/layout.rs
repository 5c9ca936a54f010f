//! The code's layers (docs/architecture.md, "How the code is laid out"): each top-level module of
//! the library imports only modules of a lower layer, so that there is no import loop and no
//! lower room reaches up into a higher one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules by layer, lowest first.
const LAYERS: [&[&str]; 7] = [
    &["config", "io", "rng", "interrupt", "opcount"],
    &["device", "cuda_graph"],
    &["data", "model", "eval"],
    &["checkpoint", "diffusion"],
    &["train"],
    &["cmd"],
    &["cli"],
];

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("src/{module}: a top-level module missing from LAYERS in tests/layout.rs (and from docs/architecture.md)"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_import_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<(String, String), String> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (at, _) in text.match_indices("crate::") {
            let name: String = text[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                edges
                    .entry((module.clone(), name))
                    .or_insert_with(|| rel.display().to_string());
            }
        }
    }
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| layer_of(to) >= layer_of(from))
        .map(|((from, to), file)| format!("{from} → {to} ({file})"))
        .collect();
    assert!(
        upward.is_empty(),
        "imports of the same or a higher layer: {upward:#?}"
    );
    // Every module has its layer, and the edges name only known modules.
    assert!(edges.len() > 10, "{edges:?}");
}
