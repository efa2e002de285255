"""Conditional VAE (Sohn, Lee & Yan 2015, "Learning Structured Output Representation using Deep
Conditional Generative Models"); its config sits beside it.

The class label ``y`` conditions both networks, as in the paper's CVAE for image generation:

- recognition network ``q(z | x, y)``: the one-hot label is appended to the image as ``num_classes``
  constant channels before the first convolution;
- generation network ``p(x | z, y)``: the one-hot label is concatenated to ``z`` at the decoder input;
- prior ``p(z | y) = N(0, I)`` (the paper's simplest choice; the label enters through the decoder).

The conv stacks are those of ``ConvVAE`` with the same fields, so ``cvae-mnist`` / ``cvae-cifar``
mirror ``mnist-small`` / ``cifar-seed`` layer for layer except the two widened input layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class CVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus ``num_classes``: the number of labels ``y`` (filled from the dataset)."""

    num_classes: int = 10
    model_type: str = field(default="cvae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")


class CVAE(ConvVAE):
    """Class-conditional Gaussian-latent VAE.

    Shapes: images ``(B, C, H, W)`` float in ``config.pixel_range``; ``y`` int64 ``(B,)`` in
    ``0..num_classes-1``; ``z``, ``mu``, ``logvar`` ``(B, latent_dim)`` float32.
    """

    conditional = True

    def __init__(self, config: CVAEConfig):
        super().__init__(config)
        k = config.num_classes
        # widen the two input layers of the ConvVAE skeleton to take the one-hot label
        self.encoder[0] = nn.Conv2d(config.in_channels + k, config.channels[0], 4, 2, 1)
        self.decoder_input[0] = nn.Linear(config.latent_dim + k, self.decoder_input[0].out_features)

    def one_hot(self, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """``(n,)`` int64 labels -> ``(n, num_classes)`` float one-hot.

        Raises:
            ConfigError: ``y`` is missing or not an integer tensor of shape ``(n,)``.
        """
        if y is None:
            raise ConfigError("this conditional VAE needs class labels y (int64 tensor of shape (B,))")
        if y.shape != (n,) or y.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"y must be an int64 tensor of shape ({n},), got {y.dtype} {tuple(y.shape)}")
        return F.one_hot(y.long(), self.config.num_classes).float()

    # ------------------------------------------------------------------ model contract

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x, y)``: ``(B, C, H, W)`` images and ``(B,)`` labels -> ``(mu, logvar)``, each ``(B, latent_dim)``."""
        onehot = self.one_hot(y, x.shape[0])
        planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        h = self.encoder(torch.cat([x, planes], dim=1))
        return self.fc_mu(h), self.fc_logvar(h)

    def decoder_in(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``p(x | z, y)`` takes ``[z, one_hot(y)]``: ``(B, latent_dim + num_classes)`` (``decode_logits``)."""
        return torch.cat([z, self.one_hot(y, z.shape[0])], dim=1)

    @torch.no_grad()
    def sample(self, n: int, *, y: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images of classes ``y``: ``z ~ N(0, I)``, return the decoder means ``(n, C, H, W)``.

        Args:
            n: number of images.
            y: int64 ``(n,)`` class indices; ``None`` draws the classes in turn (``arange(n) % num_classes``),
                a class-balanced sample of the model's marginal.

        Raises:
            ConfigError: ``y`` has the wrong shape or holds a class outside ``0..num_classes-1``.
        """
        device = next(self.parameters()).device
        k = self.config.num_classes
        if y is None:
            y = torch.arange(n, device=device) % k
        y = y.to(device)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ConfigError(f"class labels must lie in 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
        z = torch.randn(n, self.config.latent_dim, device=device, generator=generator)
        return self.decode(z, y=y)
