"""Importance-weighted autoencoder (Burda, Grosse & Salakhutdinov 2016, "Importance Weighted
Autoencoders"); its config sits beside it.

The networks are ``ConvVAE``'s (the same fields, so ``iwae-mnist`` is ``mnist-small`` layer for layer);
only the training objective differs: the k-sample bound of eq. 8,

    L_k(x) = E_{z_1..z_k ~ q(z|x)} [ log (1/k) sum_i p(x, z_i) / q(z_i | x) ],

estimated with k reparameterised samples per image. ``L_1`` is the ELBO; ``L_k`` rises towards
``log p(x)`` with ``k`` (Burda et al., theorem 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput, kl_normal, log_normal
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class IWAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus ``k``: importance samples per image in the training bound (positive;
    the decoder runs ``k`` times per image, so a step costs about ``k`` times a VAE's decoder pass)."""

    k: int = 5
    model_type: str = field(default="iwae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ConfigError(f"k must be a positive integer (importance samples per image), got {self.k!r}")


class IWAE(ConvVAE):
    """A ``ConvVAE`` trained on the k-sample importance-weighted bound.

    Shapes as ``ConvVAE``; ``draw_noise(n)`` gives ``{"eps": (n, k, latent_dim)}``.
    """

    EXTRA_TERMS = {"neg_iwae": "-L_k: the negative k-sample importance-weighted bound (Burda et al. 2016, eq. 8), "
                               "nats per image"}

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """``{"eps": (n, k, latent_dim)}`` standard normals, float32: ``k`` samples of ``z`` per image."""
        device = device or next(self.parameters()).device
        return {"eps": torch.randn((n, self.config.k, self.config.latent_dim), device=device, generator=generator)}

    def log_weights(self, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, *,
                    y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pieces of ``log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x)`` for ``z_i = mu + sigma * eps_i``.

        Args:
            x: ``(B, C, H, W)`` images; ``mu``, ``logvar``: ``(B, D)``; ``eps``: ``(B, k, D)``.

        Returns:
            ``(recon, log_ratio, mse)``, each ``(B, k)`` float32: ``-log p(x | z_i)`` and ``log p(z_i) - log q(z_i | x)``
            in nats, and the MSE per pixel of each decoder mean.
        """
        b, k, d = eps.shape
        z = self.reparameterize(mu[:, None], logvar[:, None], eps.to(mu.dtype))  # (B, k, D)
        yk = None if y is None else y.repeat_interleave(k)
        logits = self.decode_logits(z.reshape(b * k, d), y=yk)
        recon, mse = self.recon_terms(x.repeat_interleave(k, dim=0), logits)
        z = z.float()
        log_q = log_normal(z, mu.float()[:, None], logvar.float()[:, None]).sum(2)
        log_p = self.log_prior(z.reshape(b * k, d), y=yk).reshape(b, k)
        return recon.reshape(b, k), log_p - log_q, mse.reshape(b, k)

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """Negative k-sample bound ``-L_k`` (Burda et al. 2016, eq. 8) of a batch, in nats per image.

        Steps: 1. encode to ``mu, logvar``; 2. ``k`` samples ``z_i = mu + sigma * eps_i`` (``eps`` from
        ``noise`` or drawn with ``generator``); 3. decode all ``B * k``; 4. ``log w_i = log p(x | z_i) +
        beta * (log p(z_i) - log q(z_i | x))`` (``beta = 1``: the paper's weights; another ``beta`` weighs the
        prior-to-posterior ratio, as the KL weight of a beta-VAE does); 5. ``objective = -(logsumexp_i log w_i
        - log k)``. Reported beside it: ``recon`` (mean over the ``k`` samples), the closed-form ``kl`` (so
        ``recon + kl`` is the usual -ELBO) and ``extra["neg_iwae"]``, ``-L_k`` at ``beta = 1``.
        """
        mu, logvar = self.encode(x, y=y)
        eps = (noise or self.draw_noise(len(x), generator, x.device))["eps"]
        recon, log_ratio, mse = self.log_weights(x, mu, logvar, eps, y=y)
        k = log_ratio.shape[1]
        objective = -(torch.logsumexp(-recon + beta * log_ratio, 1) - math.log(k))
        neg_iwae = objective if beta == 1.0 else -(torch.logsumexp(-recon + log_ratio, 1) - math.log(k)).detach()
        mu, logvar = mu.float(), logvar.float()
        return LossOutput(loss=objective.mean(), recon=recon.mean(1), kl=kl_normal(mu, logvar).sum(1), mse=mse.mean(1),
                          mu=mu, logvar=logvar, objective=objective, extra={"neg_iwae": neg_iwae})
