"""Feature spaces for FID/KID and precision/recall: the evaluator classifier's penultimate layer, or
the FID Inception-v3 (``vaelab.metrics.inception``).

Every extractor maps ``uint8`` ``(B, C, H, W)`` images to float32 ``(B, F)`` features and has a
``name`` (written next to every number measured in it), ``num_features``, ``preprocessing`` (a dict
for eval.json), ``batch_size`` and ``cache_id`` (identifies the network weights and preprocessing in
cached reference statistics).
"""

from __future__ import annotations

import hashlib
import os

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from vaelab.data import cache_dir, to_pixels
from vaelab.io import atomic_path, read_cache

CACHE_VERSION = 1
CACHE_MAX_BYTES = 4 * 2**30


def weights_hash(module: nn.Module) -> str:
    """SHA-1 of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ClassifierFeatures(nn.Module):
    """FID/KID feature extractor: the evaluator's penultimate features of ``uint8`` images.

    ``forward``: ``uint8`` ``(B, C, H, W)`` 0..255 -> float32 ``(B, F)``.
    """

    batch_size = 500
    precision = "fp32"

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.name = f"classifier (evaluator penultimate layer, {self.num_features}-d)"
        self.preprocessing = {"steps": "uint8 / 255 in [0, 1] at the dataset's resolution",
                              "features": f"global-average-pooled last stage, {self.num_features}-d"}
        self.cache_id = f"classifier|sha1:{weights_hash(classifier)}|{self.preprocessing['steps']}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_pixels(x)).float()


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
                     batch_size: int | None = None, desc: str = "features", progress: bool = True) -> torch.Tensor:
    """``uint8`` ``(N, C, H, W)`` images -> float64 ``(N, F)`` features (on CPU), in batches of
    ``batch_size`` (default the extractor's), with a progress bar."""
    batch_size = batch_size or getattr(extractor, "batch_size", 500)
    out = []
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            out.append(extractor(images[start : start + batch_size].to(device)).double().cpu())
            bar.update(len(out[-1]))
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)


def cached_features(extractor: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
                    desc: str = "features", progress: bool = True, use_cache: bool = True) -> tuple[torch.Tensor, bool]:
    """``extract_features`` of generated images, cached by their content.

    The key is a SHA-1 of the images' shape, dtype and bytes and of the extractor's ``cache_id`` (weights,
    preprocessing, precision), so the same samples evaluated again — a study that shares a run with
    another, an evaluation rerun after an interruption — cost a hash instead of a network pass, and any
    change in the samples (weights, sampler, seed, code) is a different key. Files live under
    ``vaelab.data.cache_dir()/generated-features/`` (float32, 8 KiB per image in the 2048-d Inception
    space); the least recently used are removed beyond ``CACHE_MAX_BYTES`` (4 GiB). A damaged file is
    computed again after one warning.

    Args:
        images: ``uint8`` ``(N, C, H, W)`` in 0..255.
        use_cache: ``False`` always computes and writes nothing.

    Returns:
        ``(features, cached)``: float64 ``(N, F)`` features on CPU and whether they were read from the
        cache. Computed ones equal ``extract_features(extractor, images)``; cached ones are those of the
        extractor that first computed them — the same key, so the same weights, preprocessing and
        precision (fp32 features of the torch and OpenVINO engines agree to 1e-5 and share keys, as they
        share the reference statistics).

    Raises:
        what the extractor raises; a damaged or vanished cache file is never an error (recomputed).
    """
    if not use_cache or len(images) == 0:
        return extract_features(extractor, images, device=device, desc=desc, progress=progress), False
    images = images.contiguous().cpu()
    h = hashlib.sha1(f"{CACHE_VERSION}|{extractor.cache_id}|{tuple(images.shape)}|{images.dtype}".encode())
    h.update(images.reshape(-1).view(torch.uint8).numpy().tobytes())
    path = cache_dir() / "generated-features" / f"{h.hexdigest()[:24]}.safetensors"
    if path.is_file():
        stored = read_cache(path, lambda p: load_file(str(p))["features"], redo="extracting the features again")
        if stored is not None and tuple(stored.shape) == (len(images), extractor.num_features):
            try:
                os.utime(path)  # most recently used
            except FileNotFoundError:  # another process pruned it meanwhile; the features are read
                pass
            return stored.double(), True
    features = extract_features(extractor, images, device=device, desc=desc, progress=progress)
    with atomic_path(path) as tmp:
        save_file({"features": features.float().contiguous()}, str(tmp))
    _prune(path.parent, CACHE_MAX_BYTES)
    return features, False


def _prune(folder, max_bytes: int) -> None:
    """Remove the least recently used files of ``folder`` until the rest fit in ``max_bytes``."""
    def mtime(p) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    files = sorted(folder.glob("*.safetensors"), key=mtime, reverse=True)
    total = 0
    for p in files:
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        if total > max_bytes:
            p.unlink(missing_ok=True)
