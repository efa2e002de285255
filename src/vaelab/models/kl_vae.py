"""KL-regularised autoencoder with a spatial latent (Rombach et al. 2022, sec. 3.1, "KL-reg."): the
first stage of a latent diffusion model; its config sits beside it.

Encoder: per entry of ``channels`` a stride-2 Conv2d(k=4) and a 3x3 conv (BatchNorm + ReLU after
each), then a 3x3 conv to ``2 * latent_channels`` maps: ``mu`` and ``logvar`` of a ``(C, h, w)``
latent, ``h = H / 2^len(channels)`` (``kl-f4``: 28x28 -> 4x7x7, 32x32 -> 4x8x8). Decoder: a 3x3 conv
from the latent, then per level a 3x3 conv and a stride-2 ConvTranspose2d(k=4) back to the input size;
the last layer outputs the likelihood's logits.

It is a VAE of the family like any other (``ConvVAE``'s loss, sampling and likelihoods, trained with
``recon + beta * kl``; the paper's KL-reg. uses a small weight, e.g. ``--beta 0.01``). Its codes travel
flattened: ``encode`` returns ``(B, latent_dim)`` with ``latent_dim = C * h * w`` and ``decode`` takes
that, so the family's latent tools (PCA pictures, GMM and two-stage samplers, active units) see one
``latent_dim``-vector per image, an entry per latent-map position; ``latent_shape`` gives the map's
shape to whoever needs it (the latent diffusion UNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.errors import ConfigError
from vaelab.losses import DECODER_PARAMS
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class KLVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` for a spatial latent: ``channels`` are the widths of the downsampling levels,
    ``latent_channels`` the latent map's channels; ``latent_dim`` is derived (``latent_channels * h * w``;
    a given value must equal it); there is no fully connected layer (``fc_hidden`` must stay ``None``)."""

    sized_from_data = False  # image-folder defaults leave its widths alone (it has no fc_hidden to size)
    channels: tuple[int, ...] = (64, 128)
    latent_channels: int = 4
    latent_dim: int | None = None
    fc_hidden: int | None = None
    model_type: str = field(default="kl_vae", init=False)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if isinstance(self.latent_channels, bool) or not isinstance(self.latent_channels, int) or self.latent_channels < 1:
            raise ConfigError(f"latent_channels must be a positive integer, got {self.latent_channels!r}")
        if self.fc_hidden is not None:
            raise ConfigError(f"fc_hidden must be null for a spatial-latent autoencoder, got {self.fc_hidden}")
        if self.image_size >= 2 ** len(self.channels):
            side = self.spatial_sizes()[-1]
            d = self.latent_channels * side * side
            if self.latent_dim is not None and self.latent_dim != d:
                raise ConfigError(f"latent_dim {self.latent_dim} does not fit: the latent is a {self.latent_channels}x{side}x{side} "
                                  f"map ({d} values) for {self.image_size}x{self.image_size} images; set latent_channels "
                                  "instead of latent_dim")
            self.latent_dim = d
        super().__post_init__()


def _conv(c_in: int, c_out: int, k: int, s: int, p: int, batch_norm: bool, *, transpose: bool = False,
          output_padding: int = 0) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d(c_in, c_out, k, s, p, output_padding=output_padding) if transpose
            else nn.Conv2d(c_in, c_out, k, s, p))
    return [conv, *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.ReLU(inplace=True)]


class KLVAE(ConvVAE):
    """Gaussian-latent VAE whose latent is a ``(latent_channels, h, w)`` map; the ``ConvVAE`` contract
    with codes ``z``, ``mu``, ``logvar`` flattened to ``(B, latent_dim)`` (images ``(B, C, H, W)`` in
    ``config.pixel_range``; labels ``y`` accepted and ignored)."""

    def __init__(self, config: KLVAEConfig):
        nn.Module.__init__(self)
        self.config = config
        ch, sizes, bn = config.channels, config.spatial_sizes(), config.batch_norm
        self._latent_shape = (config.latent_channels, sizes[-1], sizes[-1])
        enc: list[nn.Module] = []
        for c_in, c_out in zip((config.in_channels, *ch[:-1]), ch):
            enc += _conv(c_in, c_out, 4, 2, 1, bn) + _conv(c_out, c_out, 3, 1, 1, bn)
        enc.append(nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, 1, 1))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = _conv(config.latent_channels, ch[-1], 3, 1, 1, bn)
        outs = (*ch[:-1][::-1], None)
        for i, (c_in, c_out) in enumerate(zip(ch[::-1], outs)):
            s_in, s_out = sizes[-1 - i], sizes[-2 - i]
            dec += _conv(c_in, c_in, 3, 1, 1, bn)
            if c_out is None:  # the last layer: logits, no norm or activation
                dec.append(nn.ConvTranspose2d(c_in, config.in_channels * DECODER_PARAMS[config.recon_likelihood], 4, 2, 1,
                                              output_padding=s_out - 2 * s_in))
            else:
                dec += _conv(c_in, c_out, 4, 2, 1, bn, transpose=True, output_padding=s_out - 2 * s_in)
        self.decoder = nn.Sequential(*dec)
        self._init_log_sigma()

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(latent_channels, h, w)``: the map a flattened code ``z`` of ``latent_dim`` values reshapes to."""
        return self._latent_shape

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x)``: ``(B, C, H, W)`` images -> ``(mu, logvar)``, each ``(B, latent_dim)``, the flattened
        ``(latent_channels, h, w)`` maps (``y`` ignored)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu.flatten(1), logvar.flatten(1)

    def decode_logits(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` flattened latent maps -> ``(B, C, H, W)`` decoder logits (see ``ConvVAE``)."""
        return self._with_log_sigma(self.decoder(z.reshape(len(z), *self._latent_shape)))
