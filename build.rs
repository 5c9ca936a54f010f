//! With the `cuda` feature: compiles the fused kernels (src/model/kernels/*.cu) to PTX with nvcc,
//! for `CUDA_COMPUTE_CAP` (or the first GPU `nvidia-smi` reports), into OUT_DIR, where
//! src/model/kernels/mod.rs embeds them. nvcc is `$CUDA_HOME/bin/nvcc`, else the one on PATH
//! (scripts/build-cuda.sh sets both). Without the feature it does nothing.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNELS: &str = "src/model/kernels";

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed={KERNELS}");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if let Err(e) = compile_kernels() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn compile_kernels() -> Result<(), String> {
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let cap = compute_cap()?;
    let nvcc = env::var_os("CUDA_HOME")
        .map(|home| Path::new(&home).join("bin").join("nvcc"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir(KERNELS)
        .map_err(|e| format!("{KERNELS}: {e}"))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "cu" || ext == "cuh"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo::rerun-if-changed={}", src.display());
    }
    for src in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
    {
        let ptx = out.join(src.with_extension("ptx").file_name().expect("a file name"));
        let output = Command::new(&nvcc)
            .arg(format!("--gpu-architecture=sm_{cap}"))
            .args(["--ptx", "-O3", "-std=c++17", "-o"])
            .arg(&ptx)
            .arg(src)
            .output()
            .map_err(|e| format!("cannot run {} (set CUDA_HOME): {e}", nvcc.display()))?;
        if !output.status.success() {
            return Err(format!(
                "nvcc failed on {}:\n{}{}",
                src.display(),
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(())
}

/// CUDA_COMPUTE_CAP (89, or 8.9), else the first GPU's as `nvidia-smi` reports it.
fn compute_cap() -> Result<String, String> {
    let raw = match env::var("CUDA_COMPUTE_CAP") {
        Ok(v) => v,
        Err(_) => {
            let out = Command::new("nvidia-smi")
                .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
                .output()
                .map_err(|e| {
                    format!("set CUDA_COMPUTE_CAP (e.g. 89): no nvidia-smi to ask ({e})")
                })?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        }
    };
    let cap = raw.trim().replace('.', "");
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "CUDA_COMPUTE_CAP must be a number such as 89, not '{raw}'"
        ));
    }
    Ok(cap)
}
