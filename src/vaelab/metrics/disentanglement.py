"""Disentanglement of a latent code against known generative factors: MIG and DCI.

Both take the posterior means ``mu`` ``(N, D)`` of N images and their factor indices ``(N, K)``, and
follow the reference implementations of ``disentanglement_lib`` (Locatello et al. 2019) in how they
discretise and fit:

- **MIG**, mutual information gap (Chen, Li, Grosse & Duvenaud 2018, eq. 6): each latent dimension is
  discretised into ``bins`` equal-width bins; with ``I(z_j; v_k)`` the empirical mutual information
  (nats) of dimension ``j`` and factor ``k`` and ``H(v_k)`` the factor's entropy,

      MIG = (1/K) Σ_k [ I(z_{j(k)}; v_k) − max_{j ≠ j(k)} I(z_j; v_k) ] / H(v_k),   j(k) = argmax_j I(z_j; v_k)

  in [0, 1]: 1 when every factor is captured by one dimension alone.
- **DCI** (Eastwood & Williams 2018): for each factor a gradient-boosted tree classifier (scikit-learn,
  default settings, as disentanglement_lib) predicts the factor from the code; ``R[j, k]`` is the
  feature importance of dimension ``j`` for factor ``k``. With ``P_jk = R_jk / Σ_k R_jk``,

      disentanglement = Σ_j ρ_j (1 − H_K(P_j·)),   ρ_j = Σ_k R_jk / Σ_jk R_jk     (eq. 2, 3)
      completeness    = Σ_k ρ'_k (1 − H_D(P'_·k)),  P'_jk = R_jk / Σ_j R_jk,  ρ'_k = Σ_j R_jk / Σ_jk R_jk
      informativeness = mean over factors of the classifiers' accuracy on held-out codes

  with entropies in base K (factors) and D (dimensions), so each lies in [0, 1]. (The paper measures
  informativeness as a prediction error; disentanglement_lib and we report accuracy, higher is better.)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vaelab.errors import DataError

MIG_BINS = 20  # disentanglement_lib's default discretisation
DCI_TRAIN_FRACTION = 0.8
DCI_MAX_POINTS = 10_000  # codes used for DCI at most (disentanglement_lib: 10,000 train + 5,000 test)


def _check(codes: torch.Tensor, factors: torch.Tensor) -> None:
    if codes.ndim != 2 or factors.ndim != 2 or len(codes) != len(factors):
        raise DataError(f"codes must be (N, D) and factors (N, K) with the same N, got {tuple(codes.shape)} and "
                        f"{tuple(factors.shape)}")
    if len(codes) < 10:
        raise DataError(f"disentanglement metrics need at least 10 codes, got {len(codes)}")
    if not torch.isfinite(codes).all():
        raise DataError("the latent codes hold NaN or infinite values")


def discretize(codes: torch.Tensor, bins: int = MIG_BINS) -> np.ndarray:
    """Each column of ``codes`` ``(N, D)`` cut into ``bins`` equal-width bins over its range: ``(N, D)`` ints."""
    out = np.zeros(tuple(codes.shape), dtype=np.int64)
    x = codes.double().cpu().numpy()
    for j in range(x.shape[1]):
        edges = np.histogram_bin_edges(x[:, j], bins=bins)
        out[:, j] = np.digitize(x[:, j], edges[:-1])
    return out


def mutual_information(codes: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Empirical mutual information (nats) of every discrete code column and factor column: ``(D, K)``."""
    from sklearn.metrics import mutual_info_score

    return np.array([[mutual_info_score(factors[:, k], codes[:, j]) for k in range(factors.shape[1])]
                     for j in range(codes.shape[1])])


def mig(codes: torch.Tensor, factors: torch.Tensor, *, bins: int = MIG_BINS) -> dict:
    """Mutual information gap of ``codes`` ``(N, D)`` (posterior means) against ``factors`` ``(N, K)`` int.

    Returns:
        ``{"mig", "per_factor", "mutual_information_nats" (D x K), "factor_entropy_nats", "bins"}``;
        a factor with a single value (entropy 0) gets ``None`` and is left out of the mean.

    Raises:
        DataError: shapes that do not match, fewer than 10 codes, non-finite codes.
    """
    _check(codes, factors)
    f = factors.cpu().numpy()
    mi = mutual_information(discretize(codes, bins), f)
    entropy = mutual_information(f, f).diagonal()
    per_factor: list[float | None] = []
    for k in range(f.shape[1]):
        top = np.sort(mi[:, k])[::-1]
        gap = top[0] - (top[1] if len(top) > 1 else 0.0)
        per_factor.append(float(gap / entropy[k]) if entropy[k] > 0 else None)
    scored = [v for v in per_factor if v is not None]
    return {"mig": float(np.mean(scored)) if scored else None, "per_factor": per_factor,
            "mutual_information_nats": mi.tolist(), "factor_entropy_nats": entropy.tolist(), "bins": bins}


def _entropy(p: np.ndarray, base: int, axis: int) -> np.ndarray:
    p = p + 1e-11  # disentanglement_lib's guard against log 0
    p = p / p.sum(axis=axis, keepdims=True)
    return -(p * np.log(p)).sum(axis=axis) / math.log(base) if base > 1 else np.zeros(p.shape[1 - axis])


def dci_scores(importance: np.ndarray) -> tuple[float, float]:
    """``(disentanglement, completeness)`` of an importance matrix ``R`` ``(D, K)`` (Eastwood & Williams 2018)."""
    r = np.abs(importance)
    weights = r if r.sum() > 0 else np.ones_like(r)
    d_code = 1.0 - _entropy(r, r.shape[1], axis=1)
    c_factor = 1.0 - _entropy(r, r.shape[0], axis=0)
    return (float((d_code * weights.sum(1) / weights.sum()).sum()),
            float((c_factor * weights.sum(0) / weights.sum()).sum()))


def dci(codes: torch.Tensor, factors: torch.Tensor, *, seed: int = 0, max_points: int = DCI_MAX_POINTS,
        train_fraction: float = DCI_TRAIN_FRACTION, n_estimators: int = 100) -> dict:
    """DCI disentanglement, completeness and informativeness of ``codes`` ``(N, D)`` against ``factors`` ``(N, K)``.

    At most ``max_points`` codes (a seeded random draw) are split ``train_fraction`` / rest; one
    ``GradientBoostingClassifier(n_estimators)`` per factor is fitted on the first part; its
    ``feature_importances_`` fill column ``k`` of ``R`` and its accuracy on the rest is the factor's
    informativeness. Factors with a single value are left out.

    Raises:
        DataError: shapes that do not match, fewer than 10 codes, non-finite codes, no factor with two values.
    """
    from sklearn.ensemble import GradientBoostingClassifier

    _check(codes, factors)
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(codes), generator=gen)[:max_points]
    x, f = codes[index].double().cpu().numpy(), factors[index].cpu().numpy()
    n_train = max(1, min(len(x) - 1, round(train_fraction * len(x))))
    varying = [k for k in range(f.shape[1]) if len(np.unique(f[:n_train, k])) > 1]
    if not varying:
        raise DataError("DCI needs at least one factor with two or more values among the codes")
    importance = np.zeros((x.shape[1], len(varying)))
    train_acc, test_acc = [], []
    for col, k in enumerate(varying):
        model = GradientBoostingClassifier(n_estimators=n_estimators, random_state=seed)
        model.fit(x[:n_train], f[:n_train, k])
        importance[:, col] = np.abs(model.feature_importances_)
        train_acc.append(float(model.score(x[:n_train], f[:n_train, k])))
        test_acc.append(float(model.score(x[n_train:], f[n_train:, k])))
    disentanglement, completeness = dci_scores(importance)
    return {"disentanglement": disentanglement, "completeness": completeness,
            "informativeness": float(np.mean(test_acc)), "informativeness_train": float(np.mean(train_acc)),
            "per_factor_accuracy": test_acc, "factors_scored": varying, "importance": importance.tolist(),
            "points": {"train": n_train, "test": len(x) - n_train}, "regressor":
            f"sklearn GradientBoostingClassifier(n_estimators={n_estimators}), one per factor"}


def disentanglement_metrics(model, test, *, device, seed: int = 0, max_points: int = DCI_MAX_POINTS) -> dict:
    """MIG and DCI of a VAE's posterior means on ``test`` (an ``ImageSplit`` with ``factors``).

    Raises:
        DataError: the split has no factors, or the codes are not finite.
    """
    from vaelab.metrics.latent import encode_means

    if test.factors is None:
        raise DataError(f"{test.source} has no ground-truth factors")
    mu = encode_means(model, test, device=device)
    factors = test.factors.cpu()
    return {
        "metric": "disentanglement of the posterior means against the ground-truth factors",
        "split": f"{test.source} test split, {len(test):,} images", "factor_names": list(test.factor_names),
        "latent_dim": mu.shape[1], "mig": mig(mu, factors), "dci": dci(mu, factors, seed=seed, max_points=max_points),
        "definitions": {"mig": "Chen et al. 2018 eq. 6, latent means in 20 equal-width bins",
                        "dci": "Eastwood & Williams 2018, importances of gradient-boosted trees (disentanglement_lib's "
                               "recipe); informativeness = held-out accuracy"},
    }


def estimate_seconds(model, test, *, device, max_points: int = DCI_MAX_POINTS) -> float:
    """Seconds ``disentanglement_metrics`` is expected to take: encoding plus the tree fits, from one timed
    fit on 200 codes (a multi-class fit costs about one binary fit per class)."""
    import time

    from sklearn.ensemble import GradientBoostingClassifier

    from vaelab.metrics.latent import encode_means

    small = test.subset(slice(0, 200))
    start = time.perf_counter()
    x = encode_means(model, small, device=device).double().numpy()
    encode = (time.perf_counter() - start) * len(test) / len(small)
    start = time.perf_counter()
    GradientBoostingClassifier(n_estimators=100).fit(x, np.arange(len(x)) % 2)
    fit = time.perf_counter() - start
    n = min(len(test), max_points) * DCI_TRAIN_FRACTION
    classes = sum(len(torch.unique(test.factors[:, k])) for k in range(test.factors.shape[1]))
    return encode + fit * n / len(small) * classes
