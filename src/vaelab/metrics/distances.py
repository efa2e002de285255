"""Distances between sets of features: FID and KID (via torchmetrics), with their train-vs-test floors."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from vaelab.data import ImageSplit
from vaelab.errors import DataError
from vaelab.metrics.features import extract_features

KID_SUBSETS = 100


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID run on features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (Heusel et al. 2017): ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` of two
    ``(N, F)`` feature sets, computed by torchmetrics' ``FrechetInceptionDistance``.

    Raises:
        DataError: fewer than 2 rows in either set, or different feature sizes.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake, minimum=2)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = KID_SUBSETS,
                      subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    ``(x.y / F + 1)^3``, mean and std over ``subsets`` random subsets (torchmetrics'
    ``KernelInceptionDistance``). ``subset_size`` is capped at the smaller set.

    Returns:
        ``(kid_mean, kid_std, subset_size_used)``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake, minimum=2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its "features are kept in memory" notice: they are, and they are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    state = torch.get_rng_state()
    torch.manual_seed(seed)  # torchmetrics draws the subsets with the global generator
    try:
        mean, std = metric.compute()
    finally:
        torch.set_rng_state(state)
    return float(mean), float(std), size


def _check_features(real: torch.Tensor, fake: torch.Tensor, *, minimum: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"feature sets must be (N, F) with one F, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise DataError(f"FID/KID need at least {minimum} images per set, got {len(real)} real and {len(fake)} generated")


def fid_sample_warning(n: int, num_features: int, what: str = "samples") -> str | None:
    """A warning text when ``n`` images are too few for a full-rank ``num_features``-d covariance."""
    if n > num_features:
        return None
    return (f"FID with {n} {what} in a {num_features}-d feature space: the covariance is rank-deficient and the "
            f"value unstable; use more than {num_features} (10,000 is the usual number)")


def fid_kid_metrics(wanted: list[str], extractor: nn.Module, fake: torch.Tensor, fake_y: torch.Tensor | None,
             train: ImageSplit, test: ImageSplit, *, device, seed: int, notes: list[str]) -> dict:
    """FID/KID of ``fake`` vs the test split, their train-vs-test floors, and per-class FID."""
    n = len(fake)
    gen = torch.Generator().manual_seed(seed)
    floor_idx = torch.randperm(len(train), generator=gen)[:n]
    real_f = extract_features(extractor, test.images, device=device, desc="features: real test")
    floor_f = extract_features(extractor, train.images[floor_idx], device=device, desc="features: real train (floor)")
    fake_f = extract_features(extractor, fake, device=device, desc="features: generated")
    space = extractor.name
    for warning in (fid_sample_warning(n, extractor.num_features), fid_sample_warning(len(test), extractor.num_features, "real images")):
        if warning:
            warnings.warn(warning)
            notes.append(warning)
    common = {"feature_space": space, "num_samples": n, "real": f"{test.source} test split, {len(test):,} images"}
    floor_def = f"the same metric between {len(floor_idx):,} random real train images and the real test split"
    out = {}
    if "fid" in wanted:
        out["fid"] = {"metric": "FID", "value": fid_from_features(real_f, fake_f), **common,
                      "floor": {"value": fid_from_features(real_f, floor_f), "definition": floor_def}}
        if fake_y is not None:
            per_class = []
            for c, name in enumerate(test.classes):
                rc, fc = real_f[test.labels.cpu() == c], fake_f[fake_y == c]
                tc = floor_f[train.labels[floor_idx].cpu() == c]
                if min(len(rc), len(fc), len(tc)) < 2:
                    per_class.append({"class": name, "value": None, "note": "fewer than 2 images"})
                    continue
                per_class.append({"class": name, "value": fid_from_features(rc, fc), "floor": fid_from_features(rc, tc),
                                  "num_samples": len(fc), "num_real": len(rc)})
            warning = fid_sample_warning(n // max(1, len(test.classes)), extractor.num_features, "samples per class")
            if warning:
                notes.append(warning)
            out["fid"]["per_class"] = per_class
            out["fid"]["per_class_definition"] = "FID of samples generated with label c vs real test images of class c"
    if "kid" in wanted:
        mean, std, size = kid_from_features(real_f, fake_f, seed=seed)
        fmean, fstd, _ = kid_from_features(real_f, floor_f, seed=seed)
        out["kid"] = {"metric": "KID (cubic polynomial kernel, unbiased MMD^2)", "value": mean, "std": std,
                      "subsets": KID_SUBSETS, "subset_size": size, **common,
                      "floor": {"value": fmean, "std": fstd, "definition": floor_def}}
    return out
