"""Feature spaces for FID/KID and precision/recall: the evaluator classifier's penultimate layer, or
the FID Inception-v3 (``vaelab.metrics.inception``).

Every extractor maps ``uint8`` ``(B, C, H, W)`` images to float32 ``(B, F)`` features and has a
``name`` (written next to every number measured in it), ``num_features``, ``preprocessing`` (a dict
for eval.json), ``batch_size`` and ``cache_id`` (identifies the network weights and preprocessing in
cached reference statistics).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn
from tqdm.auto import tqdm

from vaelab.data import to_pixels


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
