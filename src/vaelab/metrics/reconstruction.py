"""Reconstruction quality of a VAE on test images: per-pixel MSE, PSNR and SSIM (torchmetrics), and rFID."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vaelab.data import ImageSplit, to_pixels, to_uint8


@torch.no_grad()
def reconstructions(model, test: ImageSplit, *, device, batch_size: int = 500):
    """Yield ``(images, recon)`` per batch of the test split: both ``uint8`` ``(B, C, H, W)`` on ``device``, the
    reconstruction being the decoder mean at ``z = mu`` quantised to 8 bits (what recon and rFID score)."""
    pixel_range = model.config.pixel_range
    for start in tqdm(range(0, len(test), batch_size), desc="reconstructing", unit="batch", leave=False):
        images = test.images[start : start + batch_size].to(device)
        y = test.labels[start : start + batch_size].to(device)
        yield images, to_uint8(model.reconstruct(to_pixels(images, pixel_range), y=y).float(), pixel_range)


@torch.no_grad()
def recon_metrics(model, test: ImageSplit, *, device, batch_size: int = 500) -> dict:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    sse, n = 0.0, 0
    for images, recon in reconstructions(model, test, device=device, batch_size=batch_size):
        x01, r01 = to_pixels(images), to_pixels(recon)  # both sides 8-bit, on the [0, 1] scale
        sse += float((r01 - x01).pow(2).sum())
        n += x01.numel()
        psnr.update(r01, x01)
        ssim.update(r01, x01)
    return {"metric": "reconstruction at z = mu (decoder mean, quantised to 8 bits)",
            "split": f"{test.source} test split, {len(test):,} images",
            "mse_per_pixel": sse / n, "psnr_db": float(psnr.compute()), "ssim": float(ssim.compute()),
            "units": "pixels on the [0, 1] scale; PSNR (data range 1) averaged over images; SSIM (Gaussian 11x11) averaged over images"}


@torch.no_grad()
def rfid_metrics(model, test: ImageSplit, extractors: dict, *, device, use_cache: bool = True, batch_size: int = 500) -> dict:
    """rFID: the FID of the model's reconstructions of the test split against the test split itself, in each
    feature space of ``extractors`` (``{space: extractor}``, headline first) — the first-stage metric of
    Rombach et al. 2022 (table 8: reconstructions of the validation images against those images). It bounds
    what a generator decoding through this autoencoder (latent diffusion, a GMM on its codes) can reach: even
    perfect latents give the decoder's reconstructions.

    Returns:
        ``{"value": headline rFID, "feature_space", "num_images", "definition", "source"}`` plus
        ``value_<space>`` for every other space; FID is unitless, lower is better, 0 for a perfect autoencoder.
    """
    from vaelab.metrics.distances import fid_to_reference
    from vaelab.metrics.features import cached_features
    from vaelab.metrics.reference import reference_statistics

    recon = torch.cat([r.cpu() for _, r in reconstructions(model, test, device=device, batch_size=batch_size)])
    out: dict = {}
    for i, (space, extractor) in enumerate(extractors.items()):
        ref = reference_statistics(extractor, test, split_name="test", selection="run test split", device=device,
                                   use_cache=use_cache)
        features, _ = cached_features(extractor, recon, device=device, desc=f"features: reconstructions ({space})",
                                      use_cache=use_cache)
        out["value" if i == 0 else f"value_{space}"] = fid_to_reference(ref, features)
        if i == 0:
            out["feature_space"] = space
    return {**out, "num_images": len(test),
            "definition": f"FID of the reconstructions at z = mu (decoder mean, 8 bits) of the {len(test):,} "
                          f"{test.source} test images against those test images",
            "source": "Rombach et al. 2022, 'High-Resolution Image Synthesis with Latent Diffusion Models', table 8 (rFID)"}
