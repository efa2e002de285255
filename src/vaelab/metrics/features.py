"""Feature spaces for FID/KID: the evaluator classifier's penultimate layer, or the FID Inception-v3.

Every extractor maps ``uint8`` ``(B, C, H, W)`` images to float32 ``(B, F)`` features and has a
``name`` (written next to every number measured in it) and ``num_features``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from vaelab.data import to_pixels
from vaelab.errors import ConfigError, DataError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for pt_inception-2015-12-05


class ClassifierFeatures(nn.Module):
    """FID/KID feature extractor: the evaluator's penultimate features of ``uint8`` images.

    ``forward``: ``uint8`` ``(B, C, H, W)`` 0..255 -> float32 ``(B, F)``.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.name = f"classifier (evaluator penultimate layer, {self.num_features}-d)"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_pixels(x)).float()


class InceptionFeatures(nn.Module):
    """FID/KID feature extractor with the interface of the standard FID Inception-v3.

    ``net`` takes ``uint8`` ``(B, 3, H, W)`` RGB images and returns ``(B, 2048)`` pool features (it
    resizes to 299x299 itself, as torchmetrics' ``NoTrainInceptionV3`` does). Gray images are
    repeated to 3 channels first. ``forward``: ``uint8`` ``(B, C, H, W)`` -> float32 ``(B, 2048)``.
    """

    def __init__(self, net: nn.Module, *, name: str = "inception (FID Inception-v3 pt_inception-2015-12-05, pool3 2048-d)"):
        super().__init__()
        self.net = net.eval()
        self.num_features = 2048
        self.name = name

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise DataError(f"Inception features need uint8 images, got {x.dtype}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x).reshape(len(x), -1).float()


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """Where the FID Inception weights are: ``weights`` if given, else torch-fidelity's cache
    ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``.

    Raises:
        ConfigError: the file does not exist (nothing is downloaded); the message says how to
            provide it or to use ``--fid-features classifier``.
    """
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise ConfigError(
            f"the FID Inception-v3 weights (pt_inception-2015-12-05) are not at {path}. Offline they cannot be "
            f"downloaded: copy {INCEPTION_FILE} (from torch-fidelity's releases) there or pass --inception-weights PATH, "
            "or use --fid-features classifier (the evaluator's feature space; numbers not comparable with papers)"
        )
    return path


def load_inception(weights: str | Path | None = None) -> InceptionFeatures:
    """The standard FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, from torch-fidelity).

    Raises:
        ConfigError: weights missing (see ``inception_weights_path``) or torch-fidelity not installed.
    """
    path = inception_weights_path(weights)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--fid-features inception needs torch-fidelity: pip install torch-fidelity ({exc})") from exc
    return InceptionFeatures(net)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
                     batch_size: int = 500, desc: str = "features") -> torch.Tensor:
    """``uint8`` ``(N, C, H, W)`` images -> float64 ``(N, F)`` features (on CPU), in batches."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        out.append(extractor(images[start : start + batch_size].to(device)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)


