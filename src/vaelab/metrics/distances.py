"""Distances between sets of features: FID (from means and covariances; checked against torchmetrics),
KID (torchmetrics), precision/recall/density/coverage
(``vaelab.metrics.manifold``), each with its train-vs-test floor."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from vaelab.errors import DataError
from vaelab.metrics.manifold import K_DENSITY_COVERAGE, K_PRECISION_RECALL, precision_recall_density_coverage

if TYPE_CHECKING:
    from vaelab.metrics.reference import Reference

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID run on features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite ``(F, F)`` matrix (eigenvalues below 0 from
    rounding are set to 0), float64."""
    w, v = torch.linalg.eigh(sigma.double())
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid_from_statistics(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor, *,
                        sqrt_sigma1: torch.Tensor | None = None) -> float:
    """FID (Heusel et al. 2017) of two Gaussians: ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``.

    ``Tr (S1 S2)^(1/2)`` is computed as ``Tr (R S2 R)^(1/2)`` with ``R = S1^(1/2)`` (the matrices are
    similar): symmetric eigendecompositions, several times faster on CPU than the general
    eigenvalues of ``S1 S2`` that torchmetrics uses, and ``R`` of a cached reference is computed once.
    ``tests/test_evaluation.py`` checks it against torchmetrics' ``FrechetInceptionDistance`` and scipy.

    Args:
        mu1, mu2: ``(F,)`` means; sigma1, sigma2: ``(F, F)`` covariances (float64 preferred).
        sqrt_sigma1: ``psd_sqrt(sigma1)`` if already known.
    """
    r = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1.double()
    m = r @ sigma2.double() @ r
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1.double() - mu2.double()).square().sum() + sigma1.double().trace() + sigma2.double().trace() - 2 * cross)


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (Heusel et al. 2017) of two ``(N, F)`` feature sets (``fid_from_statistics`` of their means
    and covariances, N - 1 in the denominator).

    With fewer images than feature dimensions (a per-class FID, a test) the same number comes from the
    centred features ``A1``, ``A2``: ``Tr (S1 S2)^(1/2)`` is the sum of the singular values of
    ``A1 A2^T / sqrt((N1 - 1)(N2 - 1))`` (the nonzero eigenvalues of ``S1 S2`` are their squares).

    Raises:
        DataError: fewer than 2 rows in either set, or different feature sizes.
    """
    _check_features(real, fake, minimum=2)
    real, fake = real.double(), fake.double()
    n1, n2 = len(real), len(fake)
    if min(n1, n2) >= real.shape[1]:
        return fid_from_statistics(real.mean(0), torch.cov(real.T), fake.mean(0), torch.cov(fake.T))
    a1, a2 = real - real.mean(0), fake - fake.mean(0)
    cross = torch.linalg.svdvals(a1 @ a2.T).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    traces = a1.square().sum() / (n1 - 1) + a2.square().sum() / (n2 - 1)
    return float((real.mean(0) - fake.mean(0)).square().sum() + traces - 2 * cross)


def fid_to_reference(ref: Reference, fake: torch.Tensor) -> float:
    """FID of ``(N, F)`` features against a reference set: from its cached mean, covariance and
    covariance square root when both sets have at least F images, else ``fid_from_features``."""
    if ref.cov_sqrt is not None and len(fake) >= fake.shape[1]:
        return fid_from_statistics(ref.mean, ref.cov, fake.mean(0), torch.cov(fake.double().T), sqrt_sigma1=ref.cov_sqrt)
    return fid_from_features(ref.features, fake)


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
    # torchmetrics draws the subsets with the global CPU generator (the features are on the CPU): seed only
    # that one, inside a fork that restores it, so KID leaves the caller's random streams (CUDA's too) as they were
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        mean, std = metric.compute()
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


METRIC_NAMES = {
    "fid": "FID (Heusel et al. 2017)",
    "kid": f"KID (Binkowski et al. 2018; cubic polynomial kernel, unbiased MMD^2, {KID_SUBSETS} subsets)",
    "prdc": f"improved precision and recall (Kynkaanniemi et al. 2019, k={K_PRECISION_RECALL}); "
            f"density and coverage (Naeem et al. 2020, k={K_DENSITY_COVERAGE})",
}
PRDC_DEFINITION = ("precision: share of samples within the k-NN ball of some real image; recall: share of real "
                   "images within the k-NN ball of some sample; density: mean number of real k-NN balls holding "
                   "a sample / k (about 1 when samples are distributed like real images); coverage: share of real "
                   "images whose k-NN ball holds a sample")


def metric_values(name: str, test: Reference, features: torch.Tensor, *, seed: int,
                  radii: dict[int, torch.Tensor] | None = None, desc: str | None = None) -> dict:
    """``"fid"``, ``"kid"`` or ``"prdc"`` of ``(N, F)`` features against the test reference set.

    Returns:
        fid: ``{"value"}``; kid: ``{"value", "std", "subset_size"}`` (subsets drawn with ``seed``);
        prdc: ``{"precision", "recall", "density", "coverage"}`` (``radii``: the features' own k-NN
        radii if known).
    """
    if name == "fid":
        return {"value": fid_to_reference(test, features)}
    if name == "kid":
        mean, std, size = kid_from_features(test.features, features, subset_size=KID_SUBSET_SIZE, seed=seed)
        return {"value": mean, "std": std, "subset_size": size}
    return precision_recall_density_coverage(test.features, features, real_radii=test.radii, fake_radii=radii, desc=desc)


def floor_metrics(wanted: list[str], test: Reference, floor: Reference, *, seed: int, use_cache: bool = True) -> dict:
    """The floors: ``metric_values`` of the floor's real train images against the test split (the value
    a perfect model would get at this N), cached by the two reference sets' keys, the metric and seed.

    Returns:
        ``{metric: {...values, "cached", "definition", "num_images"}}`` for the metrics wanted.
    """
    from vaelab.metrics.reference import cached_values  # it imports this module

    info = {"definition": f"the same metric between {len(floor.features):,} real train images ({floor.info['selection']}) "
                          "and the real test split", "num_images": len(floor.features)}
    fields = {"test": test.key, "floor": floor.key, "seed": seed, "kid": [KID_SUBSETS, KID_SUBSET_SIZE],
              "k": [K_PRECISION_RECALL, K_DENSITY_COVERAGE]}
    return {name: {**cached_values({**fields, "metric": name}, lambda name=name: metric_values(
        name, test, floor.features, seed=seed, radii=floor.radii), use_cache=use_cache), **info} for name in wanted}


def distance_metrics(wanted: list[str], extractor: nn.Module, fake: torch.Tensor, fake_y: torch.Tensor | None,
                     test: Reference, floor: Reference, *, seed: int, notes: list[str], use_cache: bool = True) -> dict:
    """FID, KID and precision/recall/density/coverage of generated samples against the real test split
    in one feature space, each with its floor (``floor_metrics``).

    Args:
        wanted: any of ``"fid"``, ``"kid"``, ``"prdc"``.
        extractor: the feature space (its ``name`` and ``preprocessing`` are recorded).
        fake: ``(N, F)`` float64 features of the generated samples; ``fake_y`` their labels
            (conditional models: adds a per-class FID) or ``None``.
        test, floor: reference statistics of the real test split and of the floor's train images.
        seed: KID subsets (the floor's images were chosen with it too).
        notes: warnings are appended here (e.g. a rank-deficient covariance).

    Returns:
        ``{"fid": ..., "kid": ..., "prdc": ...}`` for the metrics wanted, each naming its definition,
        feature space, preprocessing, number of samples, real split and reference statistics.
    """
    for warning in (fid_sample_warning(len(fake), extractor.num_features),
                    fid_sample_warning(len(test.features), extractor.num_features, "real images")):
        if warning:
            warnings.warn(warning)
            notes.append(warning)
    common = {"feature_space": extractor.name, "feature_precision": extractor.precision,
              "preprocessing": extractor.preprocessing, "num_samples": len(fake),
              "real": f"{test.info['source']} test split, {len(test.features):,} images",
              "reference_statistics": {"path": test.info["path"], "cached": test.info["cached"]}}
    extra = {"kid": {"subsets": KID_SUBSETS}, "prdc": {"k_precision_recall": K_PRECISION_RECALL,
                                                       "k_density_coverage": K_DENSITY_COVERAGE, "definition": PRDC_DEFINITION}}
    floors = floor_metrics(wanted, test, floor, seed=seed, use_cache=use_cache)
    out = {name: {"metric": METRIC_NAMES[name], **metric_values(name, test, fake, seed=seed, desc="precision/recall"),
                  **extra.get(name, {}), **common, "floor": floors[name]} for name in wanted}
    if "fid" in out and fake_y is not None:
        out["fid"].update(per_class_fid(fake, fake_y, test, floor, extractor.num_features, notes))
    return out


def per_class_fid(fake: torch.Tensor, fake_y: torch.Tensor, test: Reference, floor: Reference, num_features: int,
                  notes: list[str]) -> dict:
    """FID of the samples generated with label c vs the real test images of class c, with the floor
    (train images of class c among the floor's), for every class."""
    rows = []
    for c, name in enumerate(test.info["classes"]):
        rc, fc, tc = test.features[test.labels == c], fake[fake_y.cpu() == c], floor.features[floor.labels == c]
        if min(len(rc), len(fc), len(tc)) < 2:
            rows.append({"class": name, "value": None, "note": "fewer than 2 images"})
            continue
        rows.append({"class": name, "value": fid_from_features(rc, fc), "floor": fid_from_features(rc, tc),
                     "num_samples": len(fc), "num_real": len(rc)})
    warning = fid_sample_warning(len(fake) // max(1, len(rows)), num_features, "samples per class")
    if warning:
        notes.append(warning)
    return {"per_class": rows, "per_class_definition": "FID of samples generated with label c vs real test images of class c"}
