"""Reference numbers for the metric tests in src/eval/ (SSIM, PSNR, MSE, MS-SSIM, FID).

The images are computed from a formula (no files): `image` and `distorted` below are mirrored by
`test_image` / `test_distorted` in src/eval/pixel.rs, bit for bit up to the final 8-bit
quantisation. The references come from implementations independent of cxrgen:

- SSIM, PSNR, MSE: scikit-image 0.26.0 (`structural_similarity` with gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=1; `peak_signal_noise_ratio`;
  `mean_squared_error`), in float64.
- MS-SSIM: pytorch-msssim 1.0.0 (`ms_ssim` with its standard 5-scale weights 0.0448, 0.2856,
  0.3001, 0.2363, 0.1333), on float64 tensors with its Gaussian window (11 taps, sigma 1.5) made in
  float64 (its own is float32); and with a 7-tap window (`ms_ssim_7`), the largest its size check
  lets through at 128x128, on the images of 97 pixels or more a side.
- FID of two Gaussians: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy.linalg.sqrtm.

    python -m venv /tmp/ref && /tmp/ref/bin/pip install numpy scipy scikit-image==0.26.0 \
        torch pytorch-msssim==1.0.0
    /tmp/ref/bin/python scripts/reference/eval_metrics.py
"""
import math

import numpy as np
import scipy.linalg
import torch
from pytorch_msssim import ms_ssim
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

M64 = (1 << 64) - 1


def hash01(seed, i, j):
    """SplitMix64's finaliser over (seed, i, j): uniform in [0, 1) with 53 bits."""
    z = (seed * 0x9E3779B97F4A7C15 + i * 0xBF58476D1CE4E5B9 + j * 0x94D049BB133111EB) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def quantise(v):
    return math.floor(min(max(v, 0.0), 1.0) * 255.0 + 0.5) / 255.0


def image(h, w, seed):
    """A smooth pattern plus pixel noise, 8-bit levels in [0, 1]."""
    return np.array([[quantise(0.5 + 0.3 * math.sin(0.11 * i + seed) * math.cos(0.07 * j)
                               + 0.2 * (hash01(seed, i, j) - 0.5))
                      for j in range(w)] for i in range(h)])


def distorted(a, seed):
    """`a` with added noise and a ripple."""
    h, w = a.shape
    return np.array([[quantise(a[i, j] + 0.15 * (hash01(seed, i, j) - 0.5)
                               + 0.05 * math.cos(0.2 * j + 0.3 * i))
                      for j in range(w)] for i in range(h)])


def fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def gaussian(taps, sigma=1.5):
    """pytorch-msssim's window (its own is float32) in float64: [1, 1, 1, taps]."""
    x = torch.arange(taps, dtype=torch.float64) - taps // 2
    window = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (window / window.sum()).reshape(1, 1, 1, taps)


def main():
    pairs = {
        "small_distorted": lambda: (image(64, 48, 1), distorted(image(64, 48, 1), 2)),
        "small_unrelated": lambda: (image(64, 48, 3), image(64, 48, 4)),
        "odd_distorted": lambda: (image(200, 177, 5), distorted(image(200, 177, 5), 6)),
        "large_distorted": lambda: (image(256, 256, 7), distorted(image(256, 256, 7), 8)),
        "mid_distorted": lambda: (image(128, 128, 9), distorted(image(128, 128, 9), 10)),
    }

    for name, make in pairs.items():
        a, b = make()
        ssim = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, data_range=1.0)
        psnr = peak_signal_noise_ratio(a, b, data_range=1.0)
        mse = mean_squared_error(a, b)
        line = f"{name}: ssim {ssim:.10f} psnr {psnr:.10f} mse {mse:.12f}"
        t = lambda x: torch.from_numpy(x)[None, None].double()
        if min(a.shape) > 160:
            ms = ms_ssim(t(a), t(b), data_range=1.0, win=gaussian(11)).item()
            line += f" ms_ssim {ms:.10f}"
        if min(a.shape) > 96:
            ms = ms_ssim(t(a), t(b), data_range=1.0, win_size=7, win=gaussian(7)).item()
            line += f" ms_ssim_7 {ms:.10f}"
        # A few pixels, to check the image formula itself.
        line += f" a[3,5] {a[3, 5] * 255:.0f} b[3,5] {b[3, 5] * 255:.0f} a[-1,-1] {a[-1, -1] * 255:.0f}"
        print(line)

    # Two non-commuting 3-d Gaussians (the covariances are B B^T for fixed B).
    b1 = np.array([[1.0, 0.2, 0.0], [0.3, 0.8, 0.1], [0.0, -0.4, 0.5]])
    b2 = np.array([[0.6, 0.0, 0.3], [-0.2, 1.1, 0.0], [0.1, 0.2, 0.9]])
    mu1 = np.array([0.1, -0.2, 0.3])
    mu2 = np.array([0.4, 0.0, -0.1])
    print(f"fid_3d: {fid(mu1, b1 @ b1.T, mu2, b2 @ b2.T):.12f}")


if __name__ == "__main__":
    main()
