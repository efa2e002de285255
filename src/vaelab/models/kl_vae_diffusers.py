"""The ``kl-f4`` first stage built from diffusers' ``AutoencoderKL`` (the network of Rombach et al. 2022 and
Stable Diffusion's VAE) instead of vaelab's plain conv stack; its config sits beside it.

``AutoencoderKL`` with ``len(channels) + 1`` blocks of widths ``(*channels, channels[-1])``: each of the
first ``len(channels)`` encoder blocks halves the side (``kl-f4-diffusers``: 28x28 -> 4x7x7, 32x32 ->
4x8x8, as ``kl-f4``), ResNet blocks with GroupNorm and SiLU, self-attention in the middle block, a 1x1
``quant_conv`` to ``mu`` and ``logvar``; the decoder mirrors it with nearest-neighbour upsampling and
outputs the likelihood's logits. Everything else is ``KLVAE``'s: the VAE family's loss, samplers and
likelihoods, codes flattened to ``latent_dim = latent_channels * h * w``, ``latent_shape`` for the LDM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL
from torch import nn

from vaelab.errors import ConfigError
from vaelab.losses import DECODER_PARAMS
from vaelab.models.kl_vae import KLVAE, KLVAEConfig


@dataclass
class DiffusersKLVAEConfig(KLVAEConfig):
    """A ``KLVAEConfig`` for ``AutoencoderKL``: ``channels`` are the widths of the downsampling blocks (one
    more block of the last width follows, without downsampling), ``layers_per_block`` ResNet blocks per
    encoder block (one more per decoder block, as diffusers builds it), ``norm_num_groups`` GroupNorm
    groups (must divide every width). The image side must be divisible by ``2 ** len(channels)``
    (nearest-neighbour upsampling cannot restore an odd side). ``batch_norm`` must stay false: the network
    normalises with GroupNorm only."""

    channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    batch_norm: bool = False
    model_type: str = field(default="kl_vae_diffusers", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % 2 ** len(self.channels):
            raise ConfigError(f"kl-f4-diffusers needs an image side divisible by {2 ** len(self.channels)} "
                              f"({len(self.channels)} downsampling blocks), got {self.image_size}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"norm_num_groups {self.norm_num_groups} must divide every width in channels; "
                              f"it does not divide {bad}")
        if self.batch_norm:
            raise ConfigError("kl-f4-diffusers has no BatchNorm (AutoencoderKL normalises with GroupNorm: set "
                              "norm_num_groups); batch_norm must be false")
        if self.layers_per_block < 1:
            raise ConfigError(f"layers_per_block must be >= 1, got {self.layers_per_block}")


class DiffusersKLVAE(KLVAE):
    """``KLVAE``'s contract on diffusers' ``AutoencoderKL`` (images ``(B, C, H, W)`` in
    ``config.pixel_range``; ``mu``, ``logvar``, ``z`` flattened to ``(B, latent_dim)``; labels ignored)."""

    def __init__(self, config: DiffusersKLVAEConfig):
        nn.Module.__init__(self)
        self.config = config
        side = config.spatial_sizes()[-1]
        self._latent_shape = (config.latent_channels, side, side)
        widths = (*config.channels, config.channels[-1])
        self.autoencoder = AutoencoderKL(
            in_channels=config.in_channels, out_channels=config.in_channels * DECODER_PARAMS[config.recon_likelihood],
            down_block_types=("DownEncoderBlock2D",) * len(widths), up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=widths, layers_per_block=config.layers_per_block,
            latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
            sample_size=config.image_size)
        self._init_log_sigma()

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(mu, logvar)``, each ``(B, latent_dim)``; ``logvar`` clamped to [-30, 20] as
        diffusers' ``DiagonalGaussianDistribution`` does."""
        ae = self.autoencoder
        mu, logvar = ae.quant_conv(ae.encoder(x)).chunk(2, dim=1)
        return mu.flatten(1), logvar.clamp(-30.0, 20.0).flatten(1)

    def decode_logits(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` flattened latent maps -> ``(B, C, H, W)`` decoder logits (see ``ConvVAE``)."""
        ae = self.autoencoder
        return self._with_log_sigma(ae.decoder(ae.post_quant_conv(z.reshape(len(z), *self._latent_shape))))
