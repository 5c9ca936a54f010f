#!/usr/bin/env python3
"""The table of scripts/gpu-check.sh, from the JSON files it wrote: python3 gpu-table.py OUT_DIR."""
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
missing = {}  # step name → "failed" or "skipped (time budget)"
def load(n):
    r = json.loads((out / f"{n}.json").read_text() or '{"failed": true}')
    if r.get("failed"):
        missing[n] = "skipped (time budget)" if r.get("skipped") else f"failed (see {n}.log)"
    return r
fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)
print(f"# GPU results\n\nCard: {(out / 'gpu.txt').read_text().strip()} (name, driver, memory). "
      "Made by `scripts/gpu-check.sh`; raw JSON in its output folder.\n")
print("## CUDA against the CPU (F32, `cxrgen check-device`)\n")
print("| config | check | max abs diff | relative | tolerance | ok |\n|---|---|---|---|---|---|")
for cfg in ["tiny", "paper"]:
    r = load(f"check-{cfg}")
    for c in r.get("checks", []):
        print(f"| {cfg} | {c['check']} | {c['max_abs']:.2e} | {c['relative']:.2e} | {c['tolerance']:.0e} | {'yes' if c['ok'] else 'NO'} |")
    if r.get("failed"):
        print(f"| {cfg} | (run failed) | | | | NO |")
print("\n## Generation: DDIM-50 at 256×256 with guidance (`cxrgen bench --config paper`)\n")
print("| precision | batch | ms per step | ms per image | images/s | peak MiB |\n|---|---|---|---|---|---|")
for p in ["f16", "f32"]:
    for s in load(f"sample-{p}").get("sampling", []):
        print(f"| {p} | {s['batch']} | {fmt(s['ms_per_step'])} | {fmt(s['ms_per_image'])} | {fmt(s['images_per_s'], '{:.2f}')} | {fmt(s['peak_mib'], '{:.0f}')} |")
print("\nThe paper: 663 ms per image (RTX 4060, DDIM-50).\n")
print("## 3×3 convolution, forward + backward, F16 (`cxrgen bench --kernels`)\n")
print("| shape | candle ms | cxrgen ms | speed-up |\n|---|---|---|---|")
for k in load("kernels").get("kernels") or []:
    print(f"| {k['shape']} | {fmt(k['candle_ms'], '{:.2f}')} | {fmt(k['cxrgen_ms'], '{:.2f}')} | {fmt(k['speedup'], '{:.2f}')}× |")
print()
print("## Training: the paper's step, batch 4 × accumulation 4 (`cxrgen bench --train`)\n")
print("| precision | checkpointing | ms per optimizer step | peak device MiB |\n|---|---|---|---|")
for lever in ["f16-ckpt", "bf16-ckpt", "f32-ckpt", "f16-plain", "f32-plain"]:
    t = load(f"train-{lever}").get("training") or {}
    print(f"| {lever.split('-')[0]} | {'yes' if lever.endswith('ckpt') else 'no'} | {fmt(t.get('ms_per_optimizer_step'))} | {fmt(t.get('peak_mib'), '{:.0f}')} |")
print("\n## VAE training, F16, 256×256 (`cxrgen bench --train-vae`)\n")
print("| batch × accumulation | checkpointing | ms per optimizer step | peak device MiB |\n|---|---|---|---|")
for lever in ["16x2-ckpt", "32x1-ckpt", "16x2-plain"]:
    t = load(f"train-vae-{lever}").get("training_vae") or {}
    print(f"| {lever.split('-')[0].replace('x', ' × ')} | {'yes' if lever.endswith('ckpt') else 'no'} | {fmt(t.get('ms_per_optimizer_step'))} | {fmt(t.get('peak_mib'), '{:.0f}')} |")
print("\nThe paper: 7.2 GB peak on an 8 GB RTX 4060. Peak device memory is the high-water mark of "
      "candle's allocations (CUDA memory pool), without the CUDA context (~0.5 GB).")
if missing:
    print("\nSteps without figures (—): " + "; ".join(f"{n}: {why}" for n, why in missing.items()) + ".")
