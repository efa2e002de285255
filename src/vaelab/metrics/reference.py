"""Reference statistics of real images in a feature space, computed once and cached.

A reference set (the real test split, or the N random real train images of a floor) gives its
features, their mean and covariance (the FID statistics) and the k-nearest-neighbour radii of
precision/recall and density/coverage. Computing them in the Inception space costs about as much as
the model's own samples (11 images/s on 2 CPU cores), so they are cached under
``vaelab.data.cache_dir()/reference-stats/`` keyed by the dataset, the split, N, how the N images
were chosen, a content hash of the pixels and labels, the feature space (weights hash and
preprocessing) and ``VERSION``: another dataset, subset, binarisation, seed or network gives another
file. Files are written to a temporary name and renamed, so a cached file is complete or absent; one
damaged later (a cut copy) is computed again after a warning.
Numbers derived from two reference sets only (the train-vs-test floors) are cached beside them
(``cached_values``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from vaelab.data import ImageSplit, cache_dir
from vaelab.io import atomic_path, read_cache, write_json
from vaelab.metrics.distances import psd_sqrt
from vaelab.metrics.features import extract_features
from vaelab.metrics.manifold import K_DENSITY_COVERAGE, K_PRECISION_RECALL, knn_radii

VERSION = 1
KS = (K_PRECISION_RECALL, K_DENSITY_COVERAGE)


@dataclass
class Reference:
    """Statistics of a set of real images in one feature space.

    Attributes:
        features: ``(N, F)`` float64 features, in the order of the images.
        labels: ``(N,)`` int64 class labels of the images.
        mean, cov: ``(F,)`` and ``(F, F)`` float64: the FID statistics (``cov`` with N - 1 in the denominator).
        cov_sqrt: ``(F, F)`` float64 symmetric square root of ``cov`` (``fid_from_statistics`` reuses
            it), or ``None`` when N < F (FID then comes from the features).
        radii: ``{k: (N,) float64}`` k-th nearest-neighbour distances within the set, for ``KS``.
        info: what the set is (``dataset``, ``split``, ``num_images``, ``selection``, ``feature_space``),
            its ``key`` hash, cache ``path``, ``cached`` (loaded instead of computed) and ``seconds``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor
    cov: torch.Tensor
    cov_sqrt: torch.Tensor | None
    radii: dict[int, torch.Tensor]
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.info["key"]


def content_hash(split: ImageSplit) -> str:
    """SHA-1 of a split's shape, pixels and labels (independent of where the files live)."""
    h = hashlib.sha1(json.dumps(list(split.images.shape)).encode())
    h.update(split.images.contiguous().cpu().numpy().tobytes())
    h.update(split.labels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def reference_key(extractor: nn.Module, split: ImageSplit, *, split_name: str, selection: str) -> tuple[dict, str]:
    """The fields that identify a reference set and their hash (the cache key)."""
    fields = {"version": VERSION, "dataset": split.name, "source": split.source, "split": split_name,
              "num_images": len(split), "classes": list(split.classes), "selection": selection, "content_sha1": content_hash(split),
              "feature_space": extractor.cache_id, "ks": list(KS)}
    return fields, hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def reference_path(extractor: nn.Module, split: ImageSplit, *, split_name: str, selection: str):
    """``(cache file, key fields, key)`` of a reference set (see ``reference_key``); the file may not exist yet."""
    fields, key = reference_key(extractor, split, split_name=split_name, selection=selection)
    space = extractor.cache_id.split("|")[0]
    name = f"{split.name or 'data'}-{split_name}-{len(split)}-{space}-{key}.safetensors"
    return cache_dir() / "reference-stats" / name, fields, key


def is_cached(extractor: nn.Module, split: ImageSplit, *, split_name: str, selection: str) -> bool:
    """Whether ``reference_statistics`` would load this set instead of computing it."""
    return reference_path(extractor, split, split_name=split_name, selection=selection)[0].is_file()


def reference_statistics(extractor: nn.Module, split: ImageSplit, *, split_name: str, selection: str,
                         device: torch.device | str = "cpu", use_cache: bool = True) -> Reference:
    """Features, mean, covariance and k-NN radii of the real images ``split`` in ``extractor``'s space.

    Args:
        extractor: a feature extractor with ``cache_id``, ``name`` and ``num_features`` (``vaelab.metrics.features``).
        split: the real images (``uint8`` ``(N, C, H, W)``) and labels, already selected.
        split_name: ``"test"`` or ``"train"`` (recorded and part of the key).
        selection: how the images were chosen, e.g. ``"all"`` or ``"random 10,000 of 60,000, seed 0"``.
        use_cache: read and write the cache (``False`` always computes and writes nothing).

    Returns:
        ``Reference``; ``info["cached"]`` says whether it was loaded.

    Raises:
        DataError: fewer than ``max(KS) + 1`` images (the k-NN radii need them).
    """
    path, fields, key = reference_path(extractor, split, split_name=split_name, selection=selection)
    info = {**fields, "key": key, "feature_space_name": extractor.name, "path": str(path)}
    if use_cache and path.is_file():
        loaded = _load(path, key)
        if loaded is not None:
            loaded.info.update(info, cached=True)
            return loaded
    start = time.perf_counter()
    features = extract_features(extractor, split.images, device=device, desc=f"features: real {split_name} ({len(split):,})")
    radii = knn_radii(features, KS, desc=f"k-NN radii: real {split_name}")
    cov = torch.cov(features.T)
    cov_sqrt = psd_sqrt(cov) if len(features) >= features.shape[1] else None
    ref = Reference(features, split.labels.cpu().long(), features.mean(0), cov, cov_sqrt, radii)
    ref.info = {**info, "cached": False, "seconds": time.perf_counter() - start}
    if use_cache:
        _save(ref, path)
    return ref


def _save(ref: Reference, path) -> None:
    tensors = {"features": ref.features.float(), "labels": ref.labels, "mean": ref.mean, "cov": ref.cov,
               **({"cov_sqrt": ref.cov_sqrt} if ref.cov_sqrt is not None else {}),
               **{f"radii_{k}": r for k, r in ref.radii.items()}}
    meta = {k: v for k, v in ref.info.items() if k not in ("cached", "path")}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"info": json.dumps(meta)})


def _load(path, key: str) -> Reference | None:
    """A cached reference, or ``None`` when the file holds another key or is damaged (after a warning)."""
    def read(p) -> Reference | None:
        with safe_open(str(p), framework="pt") as fh:
            info = json.loads(fh.metadata()["info"])
            if info.get("key") != key:
                return None
            t = {name: fh.get_tensor(name) for name in fh.keys()}
        radii = {k: t[f"radii_{k}"] for k in KS}
        return Reference(t["features"].double(), t["labels"], t["mean"], t["cov"], t.get("cov_sqrt"), radii, info)

    return read_cache(path, read, redo="computing the reference statistics again (they replace the file)")


def cached_values(fields: dict, compute: Callable[[], dict], *, use_cache: bool = True) -> dict:
    """``compute()`` (a JSON-able dict), cached under ``reference-stats/values/`` by a hash of ``fields``
    (e.g. the keys of two reference sets, a metric and its settings). The result says ``cached``."""
    key = hashlib.sha1(json.dumps({"version": VERSION, **fields}, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "reference-stats" / "values" / f"{key}.json"
    if use_cache and path.is_file():
        stored = read_cache(path, lambda p: json.loads(p.read_text()), redo="computing the values again")
        if isinstance(stored, dict) and stored.get("fields") == json.loads(json.dumps(fields)) and "values" in stored:
            return {**stored["values"], "cached": True}
    values = compute()
    if use_cache:
        write_json(path, {"fields": fields, "values": values})
    return {**values, "cached": False}
