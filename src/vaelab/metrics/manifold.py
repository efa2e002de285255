"""k-nearest-neighbour manifold metrics of generated samples: improved precision and recall, density and coverage.

- Improved precision / recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", eq. 1-3; k = 3): each set's manifold is the union of balls around its
  points with radius the distance to the k-th nearest neighbour in the same set. Precision = share of
  generated samples inside the real manifold (fidelity), recall = share of real images inside the
  generated manifold (diversity). A point on a ball's boundary counts as inside (``<=``, as
  torch-fidelity's ``prc`` and the authors' code).
- Density / coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
  Models", eq. 3-4; k = 5), from real balls only: density = mean over generated samples of the number
  of real balls containing it, divided by k (1 for samples distributed like the real data, above 1
  when samples crowd dense regions); coverage = share of real balls containing at least one
  generated sample. Strict ``<`` as the authors' ``prdc`` package.

``tests/test_evaluation.py`` checks both against torch-fidelity's ``prc`` and the ``prdc`` package.
The computation runs in row chunks of the distance matrix (float64 Euclidean, ``torch.cdist``), so
10,000 x 10,000 samples of 2048-d features never hold the full matrix.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm

from vaelab.errors import DataError

K_PRECISION_RECALL = 3
K_DENSITY_COVERAGE = 5
CHUNK = 1000  # rows of the distance matrix at once: 1,000 x 10,000 float64 = 80 MB


def knn_radii(features: torch.Tensor, ks: Iterable[int] = (K_PRECISION_RECALL, K_DENSITY_COVERAGE), *,
              chunk: int = CHUNK, desc: str | None = None) -> dict[int, torch.Tensor]:
    """Distance of every point to its k-th nearest neighbour in the same set (itself excluded).

    Args:
        features: ``(N, F)`` float features, ``N > max(ks)``.
        ks: neighbourhood sizes.

    Returns:
        ``{k: (N,) float64}`` radii, in feature units.

    Raises:
        DataError: not 2-D, or ``N <= max(ks)``.
    """
    ks = sorted(set(ks))
    if features.ndim != 2 or len(features) <= ks[-1]:
        raise DataError(f"k-NN radii with k={ks[-1]} need an (N, F) feature set with N > {ks[-1]}, got {tuple(features.shape)}")
    x = features.double()
    rows = []
    for start in tqdm(range(0, len(x), chunk), desc=desc or "k-NN radii", unit="chunk", leave=False, disable=desc is None):
        # column 0 of the sorted distances is the point itself
        rows.append(torch.cdist(x[start : start + chunk], x).topk(ks[-1] + 1, dim=1, largest=False).values)
    dist = torch.cat(rows)
    return {k: dist[:, k].contiguous() for k in ks}


def precision_recall_density_coverage(real: torch.Tensor, fake: torch.Tensor, *,
                                      real_radii: dict[int, torch.Tensor] | None = None,
                                      fake_radii: dict[int, torch.Tensor] | None = None,
                                      k_pr: int = K_PRECISION_RECALL, k_dc: int = K_DENSITY_COVERAGE,
                                      chunk: int = CHUNK, desc: str | None = None) -> dict:
    """Improved precision / recall (k = ``k_pr``) and density / coverage (k = ``k_dc``) of ``fake``
    against ``real`` (module docstring for the definitions and papers).

    Args:
        real, fake: ``(N_real, F)`` and ``(N_fake, F)`` features (e.g. Inception pool3).
        real_radii, fake_radii: precomputed ``knn_radii`` (e.g. cached reference statistics); they
            must hold ``k_pr`` (and ``k_dc`` for the real set). Computed when ``None``.

    Returns:
        ``{"precision", "recall", "density", "coverage"}`` floats: precision, recall and coverage in
        [0, 1]; density in [0, N_real / k_dc] (about 1 for a perfect model).

    Raises:
        DataError: feature sets of another shape, fewer than ``k + 1`` points, or radii of the wrong length.
    """
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"feature sets must be (N, F) with one F, got {tuple(real.shape)} and {tuple(fake.shape)}")
    real_radii = real_radii if real_radii is not None else knn_radii(real, (k_pr, k_dc), chunk=chunk)
    fake_radii = fake_radii if fake_radii is not None else knn_radii(fake, (k_pr,), chunk=chunk,
                                                                     desc=desc and f"{desc}: k-NN radii of samples")
    if len(real_radii[k_pr]) != len(real) or len(real_radii[k_dc]) != len(real) or len(fake_radii[k_pr]) != len(fake):
        raise DataError("k-NN radii do not match the feature sets (stale cached reference statistics?)")
    real, fake = real.double(), fake.double()
    fake_r = fake_radii[k_pr].double()
    in_real_manifold = torch.zeros(len(fake), dtype=torch.bool)
    real_balls_containing = torch.zeros(len(fake), dtype=torch.float64)
    recalled, covered = [], []
    for start in tqdm(range(0, len(real), chunk), desc=desc or "precision/recall", unit="chunk", leave=False,
                      disable=desc is None):
        d = torch.cdist(real[start : start + chunk], fake)  # (chunk, N_fake)
        r_pr = real_radii[k_pr][start : start + chunk, None].double()
        r_dc = real_radii[k_dc][start : start + chunk].double()
        in_real_manifold |= (d <= r_pr).any(0)
        real_balls_containing += (d < r_dc[:, None]).sum(0)
        recalled.append((d <= fake_r[None]).any(1))
        covered.append(d.min(1).values < r_dc)
    return {
        "precision": float(in_real_manifold.double().mean()),
        "recall": float(torch.cat(recalled).double().mean()),
        "density": float(real_balls_containing.mean() / k_dc),
        "coverage": float(torch.cat(covered).double().mean()),
    }
