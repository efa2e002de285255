"""Latent-space diagnostics of a VAE: active units (Burda et al. 2015), KL per dimension, collapse."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaelab import plots
from vaelab.data import ImageSplit, to_pixels
from vaelab.losses import kl_normal

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015), section 5.2
COLLAPSE_KL_NATS = 0.1


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dims whose posterior mean varies across data: ``Var_x(mu_i) > threshold``.

    Args:
        mu: ``(N, latent_dim)`` posterior means over a dataset (N >= 2).
    """
    return int((mu.float().var(dim=0) > threshold).sum().item())


@torch.no_grad()
def encode_means(model, split: ImageSplit, *, device, batch_size: int = 500) -> torch.Tensor:
    """Posterior means ``mu`` of every image of ``split``: ``(N, latent_dim)`` float32 on the CPU."""
    mus = []
    for start in tqdm(range(0, len(split), batch_size), desc="encoding", unit="batch", leave=False):
        x = to_pixels(split.images[start : start + batch_size].to(device), model.config.pixel_range)
        mus.append(model.encode(x, y=split.labels[start : start + batch_size].to(device))[0].float().cpu())
    return torch.cat(mus)


@torch.no_grad()
def latent_metrics(model, test: ImageSplit, run_dir: Path, *, device, batch_size: int = 500) -> dict:
    pixel_range = model.config.pixel_range
    mus, kls = [], []
    for start in tqdm(range(0, len(test), batch_size), desc="encoding", unit="batch", leave=False):
        x = to_pixels(test.images[start : start + batch_size].to(device), pixel_range)
        y = test.labels[start : start + batch_size].to(device)
        mu, logvar = model.encode(x, y=y)
        mus.append(mu.float().cpu())
        kls.append(kl_normal(mu, logvar).double().sum(0).cpu())
    mu = torch.cat(mus)
    kl_dim = (torch.stack(kls).sum(0) / len(test)).tolist()
    variance = mu.var(0).tolist()
    au = active_units(mu)
    total_kl = sum(kl_dim)
    collapsed = au < 1 or total_kl < COLLAPSE_KL_NATS
    plots.kl_per_dim(kl_dim, variance, run_dir / "kl_per_dim.png", threshold=ACTIVE_UNIT_THRESHOLD, source=test.source)
    return {
        "metric": "latent diagnostics", "split": f"{test.source} test split, {len(test):,} images",
        "latent_dim": mu.shape[1], "active_units": au,
        "active_unit_definition": f"dims with Cov_x(E_q[z_i]) > {ACTIVE_UNIT_THRESHOLD} (Burda et al. 2015)",
        "kl_nats": total_kl, "kl_per_dim_nats": kl_dim, "mu_variance_per_dim": variance,
        "posterior_collapse": collapsed,
        "collapse_definition": f"fewer than 1 active unit or total KL below {COLLAPSE_KL_NATS} nats per image",
    }
