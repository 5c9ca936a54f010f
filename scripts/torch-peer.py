#!/usr/bin/env python3
"""PyTorch twins of cxrgen's networks, timed on the rows that `cxrgen bench` prints.

    python3 scripts/torch-peer.py [--config paper] [--device cuda|cpu] [--rows sample,train,...]

The twins are built from the config that `cxrgen info --config C --json` resolves (or from that
JSON saved in a file, --info) and must have exactly cxrgen's parameter counts:
- the U-Net: diffusers' `UNet2DConditionModel` with cxrgen's widths, layers per block, attention
  levels, heads of `head_dim` channels, GroupNorm groups and a GEGLU feed-forward of `ff_mult`×
  width (diffusers builds 4×; each block's feed-forward is replaced by diffusers' own
  `FeedForward` of the configured width);
- the text head: LayerNorm → Linear → LayerNorm;
- the VAE: written here in plain torch.nn after src/model/vae.rs (ResBlocks with a stride-2
  first convolution and an average-pooled shortcut going down, single-head self-attention,
  nearest upsampling going up).

Rows (--rows, in the order given; each over the precisions and batch sizes asked for):
- sample: one guided DDIM step (one U-Net forward on 2B latents and a 24-token context, guidance
  and the DDIM update), timed step by step; the VAE decode one image at a time (the median of
  --repeats decodes, as cxrgen bench's); DDIM-`steps` per image; peak memory of the steps and
  the decode. Sampling computes in the precision's weights (F16 weights for f16), as cxrgen's
  sampler does.
- sample-compiled: the same with the U-Net under torch.compile(mode="reduce-overhead") (CUDA
  graphs on CUDA); compile_s is the compilation and warm-up time.
- train: optimizer steps of the diffusion stage at the config's batch and accumulation: a frozen
  one-layer transformer encoder of the text width (cxrgen bench's random BERT), the text head,
  the U-Net, MSE on epsilon; F32 master weights with autocast F16 + GradScaler or BF16; gradient
  clipping and AdamW at the config's settings; with or without gradient checkpointing.
- train-vae: the same for the VAE stage on random images in [-1, 1]: MSE + kl_weight · KL.

Times: CUDA events on CUDA, perf_counter on the CPU; the median of --repeats after --warmup.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on the CPU the process's peak resident set
(VmHWM, reset through /proc/self/clear_refs), as cxrgen bench measures it.

Output: one JSON object on stdout with cxrgen bench's keys ("sampling", "training",
"training_vae" rows with batch, ms_per_step, decode_ms_per_image, ms_per_image, images_per_s,
peak_mib, ms_per_optimizer_step, ms_per_micro_batch ...), each row also naming its "precision"
and "variant" (eager or compiled), so that scripts/gpu-table.py can join the two. With
--budget-s, rows that would start after the budget is spent are listed under "skipped_rows"; a
SIGTERM (timeout) prints what was measured so far, marked "interrupted".
"""
import argparse
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

REPO = pathlib.Path(__file__).resolve().parent.parent
NORM_EPS = 1e-6  # GroupNorm (src/model/resnet.rs)
LAYER_NORM_EPS = 1e-5  # the transformer block's and the text head's LayerNorms
GUIDANCE = 3.0  # cxrgen bench's guidance scale
LATENT_RANGE = 4.0  # cxrgen bench clips clean estimates to [-4, 4]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="paper", help="cxrgen config (file or preset)")
    p.add_argument("--info", help="JSON of `cxrgen info --json` (default: run --cxrgen)")
    p.add_argument("--cxrgen", default=str(REPO / "target/release/cxrgen"),
                   help="the cxrgen binary that resolves --config")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rows", default="sample,train,train-vae",
                   help="comma-separated, in order: sample, sample-compiled, train, train-vae")
    p.add_argument("--precision", help="comma-separated f16, bf16, f32 "
                   "(default: f16 on CUDA, f32 on the CPU)")
    p.add_argument("--batch-sizes", default="1,8", help="sampling batch sizes")
    p.add_argument("--steps", type=int, default=50, help="sampling steps per image figure")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed sampling steps and decodes per batch size")
    p.add_argument("--train-repeats", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed sampling steps first")
    p.add_argument("--checkpointing", default="config",
                   help="training rows: config, yes, no or yes,no")
    p.add_argument("--context-tokens", type=int, default=24,
                   help="text tokens (cxrgen bench's prompt: 24)")
    p.add_argument("--vae-batch", type=int, help="VAE micro-batch (default: the config's)")
    p.add_argument("--vae-accumulation", type=int, help="default: the config's")
    p.add_argument("--budget-s", type=float, help="start no row after this many seconds")
    p.add_argument("--compile-min-s", type=float, default=150.0,
                   help="sample-compiled starts only with this much budget left")
    a = p.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    for r in a.rows:
        if r not in ROWS:
            p.error(f"--rows: unknown row {r!r} (known: {', '.join(ROWS)})")
    default = "f16" if a.device == "cuda" else "f32"
    a.precision = [x for x in (a.precision or default).split(",") if x]
    for x in a.precision:
        if x not in DTYPES:
            p.error(f"--precision: unknown {x!r} (f16, bf16, f32)")
    try:
        a.batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes: {a.batch_sizes!r} is not a list of integers")
    if any(b < 1 for b in a.batch_sizes) or min(a.repeats, a.train_repeats, a.steps) < 1:
        p.error("--batch-sizes, --repeats, --train-repeats and --steps must be ≥ 1")
    if a.checkpointing not in ("config", "yes", "no", "yes,no", "no,yes"):
        p.error(f"--checkpointing: {a.checkpointing!r} (config, yes, no, yes,no)")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no CUDA device")
    return a


def load_info(a):
    """cxrgen's resolved config and parameter counts."""
    if a.info:
        return json.loads(pathlib.Path(a.info).read_text())
    if not pathlib.Path(a.cxrgen).exists():
        sys.exit(f"torch-peer.py: no cxrgen binary at {a.cxrgen}: build it (cargo build --release) "
                 "or pass --cxrgen or --info")
    run = subprocess.run([a.cxrgen, "info", "--config", a.config, "--device", "cpu", "--json"],
                         capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"torch-peer.py: `{a.cxrgen} info --config {a.config}` failed: {run.stderr.strip()}")
    return json.loads(run.stdout)


def count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The twins


def unet_twin(info):
    """diffusers' UNet2DConditionModel configured as cxrgen's U-Net (src/model/unet.rs)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention import FeedForward
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its advice on casting pretrained weights
    cfg, u = info["config"], info["config"]["unet"]
    if not u["mid_attention"]:
        sys.exit("torch-peer.py: the diffusers twin needs unet.mid_attention: true")
    c0 = u["base_channels"]
    widths = [c0 * m for m in u["channel_mult"]]
    levels = range(len(widths))
    attn = set(u["attention_levels"])
    latent = cfg["vae"]["latent_channels"]
    model = UNet2DConditionModel(
        sample_size=info["latent_shape"][1],
        in_channels=latent,
        out_channels=latent,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in attn else "UpBlock2D"
                             for i in reversed(levels)),
        block_out_channels=tuple(widths),
        layers_per_block=u["res_blocks"],
        norm_num_groups=u["norm_groups"],
        norm_eps=NORM_EPS,
        cross_attention_dim=cfg["text"]["context_dim"],
        # diffusers reads this argument as the number of heads per level (its own naming issue).
        attention_head_dim=tuple(w // u["head_dim"] for w in widths),
        use_linear_projection=True,
        time_embedding_dim=c0 * u["time_embed_mult"],
        flip_sin_to_cos=True,  # cosines first, as src/model/unet.rs
        freq_shift=0,
    )
    for block in model.modules():
        if hasattr(block, "attn2") and hasattr(block, "ff"):
            dim = block.norm3.normalized_shape[0]
            block.ff = FeedForward(dim, mult=u["ff_mult"], activation_fn="geglu")
    return model


class TextHead(nn.Module):
    """LayerNorm → Linear → LayerNorm (src/model/text.rs)."""

    def __init__(self, hidden, context):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden, eps=LAYER_NORM_EPS), nn.Linear(hidden, context),
                                 nn.LayerNorm(context, eps=LAYER_NORM_EPS))

    def forward(self, x):
        return self.net(x)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → 3×3 conv, twice, plus a shortcut (src/model/resnet.rs)."""

    def __init__(self, cin, cout, groups, down=False):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, 2 if down else 1, 1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.down = down

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(F.avg_pool2d(x, 2) if self.down else x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over a feature map with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=NORM_EPS)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (f(t).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return self.to_out(o).transpose(1, 2).reshape(b, c, h, w) + x


class Stage(nn.Module):
    """A ResBlock, optionally followed by self-attention; each checkpointed on request."""

    def __init__(self, cin, cout, groups, down, attention):
        super().__init__()
        self.res = ResBlock(cin, cout, groups, down)
        self.attn = SelfAttention(cout, groups) if attention else None
        self.checkpointing = False

    def forward(self, x):
        for f in (self.res, self.attn):
            if f is None:
                continue
            x = checkpoint(f, x, use_reentrant=False) if self.checkpointing and self.training else f(x)
        return x


class Vae(nn.Module):
    """The KL VAE of src/model/vae.rs."""

    def __init__(self, v):
        super().__init__()
        g, ch = v["norm_groups"], v["encoder"]["stem_channels"]
        self.enc_in = nn.Conv2d(v["image_channels"], ch, 3, 1, 1)
        self.enc = nn.ModuleList()
        for b in v["encoder"]["blocks"]:
            self.enc.append(Stage(ch, b["channels"], g, b.get("down", False), b.get("attention", False)))
            ch = b["channels"]
        self.enc_norm = nn.GroupNorm(g, ch, eps=NORM_EPS)
        self.enc_out = nn.Conv2d(ch, 2 * v["latent_channels"], 3, 1, 1)
        ch = v["decoder"]["blocks"][0]["channels"]
        self.dec_in = nn.Conv2d(v["latent_channels"], ch, 3, 1, 1)
        self.dec, self.up = nn.ModuleList(), []
        for b in v["decoder"]["blocks"]:
            self.up.append(b.get("up", False))
            self.dec.append(Stage(ch, b["channels"], g, False, b.get("attention", False)))
            ch = b["channels"]
        self.dec_norm = nn.GroupNorm(g, ch, eps=NORM_EPS)
        self.dec_out = nn.Conv2d(ch, v["image_channels"], 3, 1, 1)

    def set_checkpointing(self, on):
        for s in list(self.enc) + list(self.dec):
            s.checkpointing = on

    def encode(self, x):
        """[B, 1, H, W] → mean, log-variance clamped to [-30, 20]."""
        h = self.enc_in(x)
        for s in self.enc:
            h = s(h)
        mean, logvar = self.enc_out(F.silu(self.enc_norm(h))).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z):
        h = self.dec_in(z)
        for up, s in zip(self.up, self.dec):
            if up:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = s(h)
        return self.dec_out(F.silu(self.dec_norm(h)))


def text_width(text):
    """The frozen encoder's width: the config's, a random BERT's, else BERT-base's (cxrgen bench's
    stand-in for a pretrained encoder)."""
    return text.get("hidden_size") or text["encoder"].get("random", {}).get("hidden_size") or 768


def build(info, device):
    cfg = info["config"]
    torch.manual_seed(0)
    unet = unet_twin(info)
    hidden = text_width(cfg["text"])
    head = TextHead(hidden, cfg["text"]["context_dim"])
    vae = Vae(cfg["vae"])
    params = {"unet": count(unet), "text_head": count(head), "vae": count(vae)}
    want = {"unet": info["unet_params"], "text_head": info.get("text_trainable_params"),
            "vae": info["vae_params"]}
    for k, n in want.items():
        if n is not None and params[k] != n:
            sys.exit(f"torch-peer.py: the {k} twin has {params[k]:,} parameters, cxrgen's {n:,}")
    return unet.to(device), head.to(device), vae.to(device), params


# ---------------------------------------------------------------------------------------------
# Measuring


class Clock:
    """Milliseconds of one call: CUDA events on CUDA, perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def time(self, f):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = f()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = f()
        return out, (time.perf_counter() - t0) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: VmHWM restarts at the current resident set.
            pathlib.Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.monotonic(), seconds

    def left(self):
        return math.inf if self.seconds is None else self.seconds - (time.monotonic() - self.t0)


def median_ms(clock, f, repeats, budget):
    """Median of up to `repeats` timed calls of f; fewer once the budget is spent (at least one)."""
    times = []
    for _ in range(repeats):
        times.append(clock.time(f)[1])
        if budget.left() <= 0:
            break
    return statistics.median(times), len(times)


def alphas_cumprod(d, device):
    if d["schedule"] != "linear":
        sys.exit(f"torch-peer.py: schedule {d['schedule']!r}: only linear is written here")
    betas = torch.linspace(d["beta_start"], d["beta_end"], d["timesteps"], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device=device, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Rows


class Peer:
    def __init__(self, a, info):
        self.a, self.info, self.cfg = a, info, info["config"]
        self.device = torch.device(a.device)
        self.clock = Clock(self.device)
        self.budget = Budget(a.budget_s)
        self.unet, self.head, self.vae, self.params = build(info, self.device)
        self.hidden = text_width(self.cfg["text"])
        self.acp = alphas_cumprod(self.cfg["diffusion"], self.device)
        self.result = {"sampling": [], "training": [], "training_vae": [], "skipped_rows": []}

    def context(self, n, generator):
        """Text context of n rows: [n, T, context_dim] from the head, and the token mask [n, T]."""
        t = self.a.context_tokens
        with torch.no_grad():
            hidden = torch.randn(n, t, self.hidden, device=self.device, generator=generator)
            return self.head(hidden), torch.ones(n, t, device=self.device)

    # -- sampling

    def sample(self, precision, compiled):
        a, dev, dtype = self.a, self.device, DTYPES[precision]
        unet = self.unet.to(dtype).eval()
        vae = self.vae.to(dtype).eval()
        denoiser = torch.compile(unet, mode="reduce-overhead", dynamic=False) if compiled else unet
        g = torch.Generator(device=dev).manual_seed(0)
        lat = self.info["latent_shape"]
        stride = self.cfg["diffusion"]["timesteps"] // a.steps
        t, t_prev = stride * (a.steps // 2), stride * (a.steps // 2 - 1)
        at, ap = self.acp[t], self.acp[t_prev]
        for b in a.batch_sizes:
            name = f"{'sample-compiled' if compiled else 'sample'} {precision} batch {b}"
            if not self.may_start(name, a.compile_min_s if compiled else 0):
                continue
            ctx, mask = self.context(2, g)
            # The prompt's context, then the negative prompt's (2 of its tokens are real).
            mask[1, 2:] = 0
            ctx = ctx.repeat_interleave(b, 0).to(dtype)
            mask = mask.repeat_interleave(b, 0)
            ts = torch.full((2 * b,), float(t), device=dev)
            x = torch.randn(b, *lat, device=dev, generator=g)

            def step():
                if compiled:
                    torch.compiler.cudagraph_mark_step_begin()
                eps = denoiser(torch.cat([x, x]).to(dtype), ts, encoder_hidden_states=ctx,
                               encoder_attention_mask=mask, return_dict=False)[0].float()
                c, u = eps.chunk(2)
                e = u + GUIDANCE * (c - u)
                x0 = ((x - (1 - at).sqrt() * e) / at.sqrt()).clamp(-LATENT_RANGE, LATENT_RANGE)
                return ap.sqrt() * x0 + (1 - ap).sqrt() * e

            def decode():
                return [vae.decode(x[i:i + 1].to(dtype)).float().clamp(-1, 1) for i in range(b)]

            with torch.inference_mode():
                t0 = time.monotonic()
                for _ in range(a.warmup):
                    step()
                    if self.budget.left() <= 0:
                        break
                decode()
                self.clock.sync()
                warm_s = time.monotonic() - t0
                reset_peak(dev)
                step_ms, n = median_ms(self.clock, step, a.repeats, self.budget)
                decode_ms, _ = median_ms(self.clock, decode, a.repeats, self.budget)
                peak = peak_mib(dev)
            per_image = a.steps * step_ms / b + decode_ms / b
            row = {"variant": "compiled" if compiled else "eager", "precision": precision,
                   "batch": b, "ms_per_step": step_ms, "decode_ms_per_image": decode_ms / b,
                   "ms_per_image": per_image, "images_per_s": 1e3 / per_image, "peak_mib": peak,
                   "timed_steps": n}
            if compiled:
                row["compile_s"] = warm_s
            self.result["sampling"].append(row)
            log(f"{name}: {step_ms:.2f} ms per step, decode {decode_ms / b:.1f} ms per image, "
                f"peak {peak or float('nan'):.0f} MiB")
        self.unet.float()
        self.vae.float()

    # -- training

    def checkpointings(self, run):
        c = self.a.checkpointing
        return [run["grad_checkpointing"]] if c == "config" else [x == "yes" for x in c.split(",")]

    def train(self, precision):
        run = self.cfg["train_diffusion"]["run"]
        for ckpt in self.checkpointings(run):
            name = f"train {precision} checkpointing {'yes' if ckpt else 'no'}"
            if not self.may_start(name):
                continue
            torch.manual_seed(1)
            encoder = nn.TransformerEncoderLayer(self.hidden, max(1, self.hidden // 64), 4 * self.hidden,
                                                 dropout=0.0, activation="gelu", batch_first=True,
                                                 device=self.device).eval().requires_grad_(False)
            unet, head = self.unet.train(), self.head.train()
            if ckpt:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            lat, b = self.info["latent_shape"], run["batch_size"]
            steps = self.cfg["diffusion"]["timesteps"]

            def loss():
                x = torch.randn(b, *lat, device=self.device)
                noise = torch.randn_like(x)
                t = torch.randint(0, steps, (b,), device=self.device)
                a = self.acp[t].view(b, 1, 1, 1)
                noisy = a.sqrt() * x + (1 - a).sqrt() * noise
                with torch.no_grad():
                    hidden = encoder(torch.randn(b, self.a.context_tokens, self.hidden,
                                                 device=self.device))
                mask = torch.ones(b, self.a.context_tokens, device=self.device)
                eps = unet(noisy, t, encoder_hidden_states=head(hidden),
                           encoder_attention_mask=mask, return_dict=False)[0]
                return F.mse_loss(eps.float(), noise)

            params = list(unet.parameters()) + list(head.parameters())
            row = self.time_training(name, "diffusion", loss, params, precision, run,
                                     self.cfg["train_diffusion"]["optimizer"], ckpt)
            self.result["training"].append(row)
            unet.disable_gradient_checkpointing()
            unet.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)

    def train_vae(self, precision):
        t = self.cfg["train_vae"]
        run = dict(t["run"])
        run["batch_size"] = self.a.vae_batch or run["batch_size"]
        run["grad_accumulation"] = self.a.vae_accumulation or run["grad_accumulation"]
        v = self.cfg["vae"]
        size = self.cfg["data"]["image_size"]
        for ckpt in self.checkpointings(run):
            name = f"train-vae {precision} {run['batch_size']}×{run['grad_accumulation']} " \
                   f"checkpointing {'yes' if ckpt else 'no'}"
            if not self.may_start(name):
                continue
            vae = self.vae.train()
            vae.set_checkpointing(ckpt)
            b = run["batch_size"]

            def loss():
                x = torch.rand(b, v["image_channels"], size, size, device=self.device) * 2 - 1
                mean, logvar = vae.encode(x)
                mean, logvar = mean.float(), logvar.float()
                z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)
                recon = F.mse_loss(vae.decode(z).float(), x)
                kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
                return recon + t["kl_weight"] * kl

            row = self.time_training(name, "vae", loss, list(vae.parameters()), precision, run,
                                     t["optimizer"], ckpt)
            self.result["training_vae"].append(row)
            vae.set_checkpointing(False)
            vae.zero_grad(set_to_none=True)

    def time_training(self, name, stage, loss_fn, params, precision, run, opt_cfg, ckpt):
        """Optimizer steps as cxrgen's trainer takes them: `accumulation` micro-batches, their
        gradients clipped to the global norm `grad_clip`, then AdamW; one warm-up step."""
        dev, dtype = self.device, DTYPES[precision]
        opt = torch.optim.AdamW(params, lr=opt_cfg["lr"], betas=(opt_cfg["beta1"], opt_cfg["beta2"]),
                                eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"])
        scaler = torch.amp.GradScaler(dev.type, enabled=precision == "f16")
        k = run["grad_accumulation"]

        def step():
            for _ in range(k):
                with torch.autocast(dev.type, dtype=dtype, enabled=precision != "f32"):
                    loss = loss_fn()
                scaler.scale(loss / k).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, opt_cfg["grad_clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        step()
        reset_peak(dev)
        ms, n = median_ms(self.clock, step, self.a.train_repeats, self.budget)
        peak = peak_mib(dev)
        log(f"{name}: {ms:.1f} ms per optimizer step ({ms / k:.1f} per micro-batch), "
            f"peak {peak or float('nan'):.0f} MiB")
        return {"stage": stage, "variant": "eager", "precision": precision,
                "batch": run["batch_size"], "accumulation": k, "checkpointing": ckpt,
                "ms_per_optimizer_step": ms, "ms_per_micro_batch": ms / k, "peak_mib": peak,
                "timed_steps": n}

    def may_start(self, name, need_s=0):
        left = self.budget.left()
        if left > max(need_s, 0) and left > 0:
            return True
        why = f"time budget: {max(left, 0):.0f} s left, {need_s:.0f} s needed"
        self.result["skipped_rows"].append({"row": name, "why": why})
        log(f"{name}: skipped ({why})")
        return False


ROWS = {
    "sample": lambda p, x: p.sample(x, compiled=False),
    "sample-compiled": lambda p, x: p.sample(x, compiled=True),
    "train": lambda p, x: p.train(x),
    "train-vae": lambda p, x: p.train_vae(x),
}


def log(msg):
    print(f"torch-peer: {msg}", file=sys.stderr, flush=True)


def environment(a, device):
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": a.device,
           "threads": torch.get_num_threads(), "argv": sys.argv[1:],
           "cpu": platform.processor() or platform.machine()}
    try:
        import diffusers
        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(),
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
    return env


def main(argv):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    info = load_info(a)
    peer = Peer(a, info)
    out = {"peer": "pytorch", "config": a.config, "device": a.device,
           "image_size": info["config"]["data"]["image_size"], "sampling_steps": a.steps,
           "environment": environment(a, peer.device), "params": peer.params, **peer.result}

    def dump(*_):
        print(json.dumps(out, indent=1))
        sys.stdout.flush()

    def interrupted(*_):
        out["interrupted"] = True
        dump()
        os._exit(124)

    signal.signal(signal.SIGTERM, interrupted)
    log(f"{a.config}: U-Net {peer.params['unet']:,}, text head {peer.params['text_head']:,}, "
        f"VAE {peer.params['vae']:,} parameters (cxrgen's counts); {a.device}, "
        f"{torch.get_num_threads()} threads")
    for row in a.rows:
        for precision in a.precision:
            ROWS[row](peer, precision)
    dump()


if __name__ == "__main__":
    main(sys.argv[1:])
