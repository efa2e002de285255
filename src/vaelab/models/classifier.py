"""Small ResNet-style image classifier: the evaluator behind FID/KID, confidence metrics and CAS.

Architecture (airbench-style, Jordan 2024; residual blocks as in He et al. 2016): per entry of
``widths``: Conv3x3 -> MaxPool2 -> BatchNorm -> ReLU -> residual block (two Conv3x3 + BN with an
identity skip). Global average pooling gives the ``widths[-1]``-dimensional penultimate features;
a Linear layer maps them to class logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vaelab.errors import ConfigError


@dataclass
class ClassifierConfig:
    """Architecture of a ``ResNetClassifier``.

    Attributes:
        in_channels: image channels ``C`` (1 gray, 3 RGB).
        image_size: square image side ``H = W`` in pixels; at least ``2 ** len(widths)``.
        num_classes: number of classes ``K`` (at least 2).
        widths: channels of each stage; each stage halves the resolution. The feature dimension
            ``F`` of ``features()`` is ``widths[-1]``.
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    widths: tuple[int, ...] = (32, 64, 128)
    model_type: str = field(default="classifier", init=False)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths must be a non-empty list of positive integers, got {list(self.widths)}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be positive, got {self.in_channels}")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.image_size < 2 ** len(self.widths):
            raise ConfigError(
                f"image_size {self.image_size} is too small for {len(self.widths)} pooling stages "
                f"(needs at least {2 ** len(self.widths)})"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]


class _ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(width, width), nn.ReLU(inplace=True), *_conv_bn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResNetClassifier(nn.Module):
    """Image classifier; inputs ``x`` float32 ``(B, C, H, W)`` with pixels in ``[0, 1]``.

    ``forward(x)`` gives logits ``(B, K)``; ``features(x)`` the penultimate ``(B, F)`` features
    (global-average-pooled last stage, ``F = widths[-1]``) used as the FID/KID feature space.
    """

    conditional = False
    kind = "classifier"

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        for c_in, c_out in zip((config.in_channels, *config.widths[:-1]), config.widths):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                _ResidualBlock(c_out),
            ]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(config.widths[-1], config.num_classes)

    @property
    def num_features(self) -> int:
        """``F``, the size of ``features(x)``."""
        return self.config.widths[-1]

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
            raise ConfigError(f"the classifier expects (B, {c}, {s}, {s}) images, got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float pixels in ``[0, 1]`` -> ``(B, F)`` float32 penultimate features."""
        self._check(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float pixels in ``[0, 1]`` -> ``(B, K)`` class logits."""
        return self.head(self.features(x))
