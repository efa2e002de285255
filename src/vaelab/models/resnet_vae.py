"""Residual convolutional VAE: the ``ConvVAE`` contract with residual blocks at every resolution; its
config sits beside it.

Encoder: a stride-2 Conv2d(k=4) stem to ``channels[0]``; at every level ``blocks`` residual blocks
(pre-activation: BatchNorm, SiLU, 3x3 conv, twice, added to the input; He et al. 2016, "Identity
Mappings in Deep Residual Networks"), then a stride-2 Conv2d(k=4) to the next width; flatten,
(optional Linear ``fc_hidden``), ``fc_mu`` / ``fc_logvar``. Decoder: the mirror image, with
nearest-neighbour upsampling and a 3x3 conv instead of strided transposed convs (no checkerboard
artefacts; Odena et al. 2016), and a final 3x3 conv to the likelihood's logits. Spatial sizes follow
the encoder exactly, so odd sides (28 -> 14 -> 7 -> 3) come back (3 -> 7 -> 14 -> 28).

The preset ``resnet-cifar`` is the stronger CIFAR-10 network (see ``vaelab.models.PRESETS``);
``cifar-seed`` stays the seeds' 4-layer ``ConvVAE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.errors import ConfigError
from vaelab.losses import DECODER_PARAMS
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class ResNetVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` whose ``channels`` are the widths of the resolution levels (the stem halves the
    input to the first level, each further level halves again: ``len(channels)`` halvings in all) plus
    ``blocks``, the residual blocks per level (positive)."""

    channels: tuple[int, ...] = (32, 64, 128)
    blocks: int = 2
    model_type: str = field(default="resnet_vae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.blocks, int) or isinstance(self.blocks, bool) or self.blocks < 1:
            raise ConfigError(f"blocks must be a positive integer, got {self.blocks!r}")


class ResidualBlock(nn.Module):
    """``x + conv(act(norm(conv(act(norm(x))))))`` with 3x3 convs at constant width ``(B, C, H, W)``."""

    def __init__(self, channels: int, batch_norm: bool = True):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else nn.Identity
        self.body = nn.Sequential(norm(), nn.SiLU(), nn.Conv2d(channels, channels, 3, 1, 1),
                                  norm(), nn.SiLU(), nn.Conv2d(channels, channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetVAE(ConvVAE):
    """Gaussian-latent VAE with residual encoder and decoder; the same contract, loss and shapes as
    ``ConvVAE`` (images ``(B, C, H, W)`` in ``config.pixel_range``; ``z``, ``mu``, ``logvar``
    ``(B, latent_dim)``; labels ``y`` accepted and ignored)."""

    def __init__(self, config: ResNetVAEConfig):
        nn.Module.__init__(self)
        self.config = config
        ch, sizes = config.channels, config.spatial_sizes()  # sizes: [H, H/2, ..., H/2^len(ch)]
        bn = config.batch_norm
        self.feature_shape = (ch[-1], sizes[-1], sizes[-1])
        flat = ch[-1] * sizes[-1] ** 2

        enc: list[nn.Module] = [nn.Conv2d(config.in_channels, ch[0], 4, 2, 1)]
        for i, width in enumerate(ch):
            enc += [ResidualBlock(width, bn) for _ in range(config.blocks)]
            if i + 1 < len(ch):
                enc.append(nn.Conv2d(width, ch[i + 1], 4, 2, 1))
        enc += [*([nn.BatchNorm2d(ch[-1])] if bn else []), nn.SiLU(), nn.Flatten()]
        head = flat
        if config.fc_hidden:
            enc += [nn.Linear(flat, config.fc_hidden), nn.SiLU()]
            head = config.fc_hidden
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(head, config.latent_dim)
        self.fc_logvar = nn.Linear(head, config.latent_dim)

        fc: list[nn.Module] = []
        if config.fc_hidden:
            fc += [nn.Linear(config.latent_dim, config.fc_hidden), nn.SiLU()]
        fc.append(nn.Linear(config.fc_hidden or config.latent_dim, flat))
        self.decoder_input = nn.Sequential(*fc)
        dec: list[nn.Module] = []
        rev = ch[::-1]
        for i, width in enumerate(rev):
            dec += [ResidualBlock(width, bn) for _ in range(config.blocks)]
            out = rev[i + 1] if i + 1 < len(rev) else ch[0]
            # upsample to the encoder's size at this level (exact for odd sides), then a 3x3 conv
            dec += [nn.Upsample(size=sizes[-2 - i], mode="nearest"), nn.Conv2d(width, out, 3, 1, 1)]
        dec += [*([nn.BatchNorm2d(ch[0])] if bn else []), nn.SiLU(),
                nn.Conv2d(ch[0], config.in_channels * DECODER_PARAMS[config.recon_likelihood], 3, 1, 1)]
        self.decoder = nn.Sequential(*dec)
        self._init_log_sigma()
