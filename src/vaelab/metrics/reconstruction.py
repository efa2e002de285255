"""Reconstruction quality of a VAE on test images: per-pixel MSE, PSNR and SSIM (torchmetrics)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vaelab.data import ImageSplit, to_pixels, to_uint8


@torch.no_grad()
def recon_metrics(model, test: ImageSplit, *, device, batch_size: int = 500) -> dict:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    pixel_range = model.config.pixel_range
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    sse, n = 0.0, 0
    for start in tqdm(range(0, len(test), batch_size), desc="reconstructing", unit="batch", leave=False):
        x = to_pixels(test.images[start : start + batch_size].to(device), pixel_range)
        y = test.labels[start : start + batch_size].to(device)
        x01 = to_pixels(to_uint8(x, pixel_range))  # both sides on the [0, 1] scale
        r01 = to_pixels(to_uint8(model.reconstruct(x, y=y).float(), pixel_range))
        sse += float((r01 - x01).pow(2).sum())
        n += x01.numel()
        psnr.update(r01, x01)
        ssim.update(r01, x01)
    return {"metric": "reconstruction at z = mu (decoder mean, quantised to 8 bits)",
            "split": f"{test.source} test split, {len(test):,} images",
            "mse_per_pixel": sse / n, "psnr_db": float(psnr.compute()), "ssim": float(ssim.compute()),
            "units": "pixels on the [0, 1] scale; PSNR (data range 1) averaged over images; SSIM (Gaussian 11x11) averaged over images"}
