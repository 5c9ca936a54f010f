#!/usr/bin/env python3
"""The table of scripts/gpu-check.sh, from the JSON files it wrote: python3 gpu-table.py OUT_DIR.

    python3 gpu-table.py --ratios OUT_DIR   # only cxrgen against PyTorch (scripts/cpu-peer.sh)

cxrgen's rows come from `cxrgen bench --json` (sample-f16.json, train-f16-ckpt.json, ...), the
PyTorch twins' from scripts/torch-peer.py (peer-*.json), joined on precision, batch and
checkpointing; the ratio is cxrgen's figure over PyTorch's (below 1: cxrgen is faster or smaller).
"""
import json, pathlib, sys

ratios_only = sys.argv[1:2] == ["--ratios"]
out = pathlib.Path(sys.argv[-1])
missing = {}  # step name → "failed", "skipped (time budget)", ...


def load(n):
    path = out / f"{n}.json"
    if not path.exists():  # not a step of this run
        return {}
    r = json.loads(path.read_text() or '{"failed": true}')
    if r.get("failed"):
        missing[n] = r.get("why") or ("skipped (time budget)" if r.get("skipped") else f"failed (see {n}.log)")
    elif r.get("interrupted"):
        missing[n] = f"cut at its time limit (see {n}.log)"
    return r


fmt = lambda v, f="{:.1f}": "—" if v is None else f.format(v)


def gpu_sections():
    print(f"# GPU results\n\nCard: {(out / 'gpu.txt').read_text().strip()} (name, driver, memory). "
          "Made by `scripts/gpu-check.sh`; raw JSON in its output folder.\n")
    print("## CUDA against the CPU (F32, `cxrgen check-device`)\n")
    print("| config | check | max abs diff | relative | tolerance | ok |\n|---|---|---|---|---|---|")
    for cfg in ["tiny", "paper"]:
        r = load(f"check-{cfg}")
        for c in r.get("checks", []):
            name = c['check'] + (f" ({c['error']})" if "error" in c else "")
            print(f"| {cfg} | {name} | {fmt(c['max_abs'], '{:.2e}')} | {fmt(c['relative'], '{:.2e}')} | {c['tolerance']:.0e} | {'yes' if c['ok'] else 'NO'} |")
        if r.get("failed"):
            print(f"| {cfg} | (run failed) | | | | NO |")
    print("\n## Generation: DDIM-50 at 256×256 with guidance (`cxrgen bench --config paper`)\n")
    print("| precision | batch | ms per step | ms per image | images/s | peak MiB |\n|---|---|---|---|---|---|")
    for p in ["f16", "f32"]:
        for s in load(f"sample-{p}").get("sampling", []):
            print(f"| {p} | {s['batch']} | {fmt(s['ms_per_step'])} | {fmt(s['ms_per_image'])} | {fmt(s['images_per_s'], '{:.2f}')} | {fmt(s['peak_mib'], '{:.0f}')} |")
    print("\nThe paper: 663 ms per image (RTX 4060, DDIM-50).\n")
    print("## The guided step replayed from a CUDA graph, F16 (`cxrgen bench --cuda-graph`)\n")
    print("| batch | ms per step | × the eager step | kernels per step | capture ms | graph MiB | max abs diff vs eager |\n|---|---|---|---|---|---|---|")
    for s in load("sample-f16").get("sampling", []):
        g = s.get("cuda_graph") or {"error": "not run"}
        if "error" in g:
            print(f"| {s['batch']} | not captured: {g['error']} | | | | | |")
            continue
        print(f"| {s['batch']} | {fmt(g['ms_per_step'], '{:.2f}')} | {fmt(g['speedup'], '{:.1f}')} | {fmt(g['kernels'], '{}')} | {fmt(g['capture_ms'], '{:.0f}')} | {fmt(g['graph_memory_mib'], '{:.0f}')} | {fmt(g['max_abs_vs_eager'], '{:.1e}')} |")
    print()
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
          "candle's allocations (CUDA memory pool), without the CUDA context (~0.5 GB).\n")


def peer_section():
    peers = sorted(out.glob("peer-*.json"))
    rows = {"sampling": [], "training": [], "training_vae": []}
    env, skipped = {}, []
    for f in peers:
        r = load(f.stem)
        for k in rows:
            rows[k] += r.get(k, [])
        env = env or r.get("environment", {})
        skipped += [f"{s['row']} ({s['why']})" for s in r.get("skipped_rows", [])]

    def peer(section, variant, **keys):
        return next((r for r in rows[section] if r.get("variant") == variant
                     and all(r.get(k) == v for k, v in keys.items())), {})

    def ours_sampling(precision, batch):
        return next((s for s in load(f"sample-{precision}").get("sampling", []) if s["batch"] == batch), {})

    lines = []  # (what, cxrgen, eager, compiled)
    for p in ["f16", "f32"]:
        for b in [1, 8]:
            ours, key = ours_sampling(p, b), dict(precision=p, batch=b)
            e, c = peer("sampling", "eager", **key), peer("sampling", "compiled", **key)
            for what, k in [("guided DDIM step", "ms_per_step"), ("DDIM-50 per image", "ms_per_image"),
                            ("VAE decode per image", "decode_ms_per_image"), ("sampling peak memory", "peak_mib")]:
                if k == "decode_ms_per_image" and b != 1:
                    continue  # both decode one image at a time
                unit = "MiB" if k == "peak_mib" else "ms"
                lines.append((f"{what}, batch {b}, {p.upper()} ({unit})", ours.get(k), e.get(k), c.get(k)))
            graph = ours.get("cuda_graph") or {}
            if graph.get("graph"):
                lines.append((f"guided DDIM step from a CUDA graph, batch {b}, {p.upper()} (ms)",
                              graph.get("ms_per_step"), e.get("ms_per_step"), c.get("ms_per_step")))
    for lever in ["f16-ckpt", "f16-plain", "bf16-ckpt", "f32-ckpt", "f32-plain"]:
        p, ckpt = lever.split("-")[0], lever.endswith("ckpt")
        t = load(f"train-{lever}").get("training") or {}
        e = peer("training", "eager", precision=p, checkpointing=ckpt)
        label = f"training micro-batch {t.get('batch') or e.get('batch') or 4}, {p.upper()}, {'checkpointing' if ckpt else 'no checkpointing'}"
        lines.append((f"{label} (ms)", t.get("ms_per_micro_batch"), e.get("ms_per_micro_batch"), None))
        lines.append((f"{label}, peak (MiB)", t.get("peak_mib"), e.get("peak_mib"), None))
    for lever in ["16x2-ckpt", "16x2-plain"]:
        ckpt = lever.endswith("ckpt")
        t = load(f"train-vae-{lever}").get("training_vae") or {}
        e = peer("training_vae", "eager", precision="f16", batch=16, accumulation=2, checkpointing=ckpt)
        label = f"VAE optimizer step 16 × 2, F16, {'checkpointing' if ckpt else 'no checkpointing'}"
        lines.append((f"{label} (ms)", t.get("ms_per_optimizer_step"), e.get("ms_per_optimizer_step"), None))
        lines.append((f"{label}, peak (MiB)", t.get("peak_mib"), e.get("peak_mib"), None))

    ratio = lambda a, b: "—" if a is None or not b else f"{a / b:.2f}×"
    print("## cxrgen against PyTorch (same call, same device)\n")
    print(f"PyTorch {env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}"
          f"{', ' + str(env['threads']) + ' threads' if env.get('device') == 'cpu' else ''}: "
          "`scripts/torch-peer.py`, the diffusers `UNet2DConditionModel` and a plain-PyTorch VAE "
          "with cxrgen's parameter counts. Ratio: cxrgen / PyTorch (below 1: cxrgen is faster or "
          "smaller). Compiled: the U-Net under `torch.compile(mode=\"reduce-overhead\")`. Rows with "
          "no figure on either side are left out.\n")
    print("| row | cxrgen | PyTorch eager | cxrgen / eager | PyTorch compiled | cxrgen / compiled |")
    print("|---|---|---|---|---|---|")
    shown = [l for l in lines if any(v is not None for v in l[1:])]
    for what, ours, e, c in shown:
        f = "{:.0f}" if "MiB" in what else "{:.1f}" if (ours or 0) >= 100 else "{:.2f}"
        print(f"| {what} | {fmt(ours, f)} | {fmt(e, f)} | {ratio(ours, e)} | {fmt(c, f)} | {ratio(ours, c)} |")
    if not shown:
        print("| (no row has a figure on either side) | | | | | |")
    if skipped:
        print("\nPyTorch rows skipped: " + "; ".join(skipped) + ".")


if ratios_only:
    peer_section()
else:
    gpu_sections()
    peer_section()
if missing:
    print("\nSteps without figures (—): " + "; ".join(f"{n}: {why}" for n, why in missing.items()) + ".")
