"""VAE with a VampPrior (Tomczak & Welling 2018, "VAE with a VampPrior"); its config sits beside it.

The networks are ``ConvVAE``'s; the prior is the mixture of the encoder's own posteriors at ``K``
learned pseudo-inputs ``u_1..u_K`` (eq. 9):

    p(z) = (1/K) sum_k q(z | u_k),

trained with the rest. The KL term has no closed form: training uses its one-sample Monte Carlo estimate
``log q(z|x) - log p(z)`` at the ``z`` of the reconstruction term (the paper's eq. 11 estimator). Sampling
picks a component ``k`` uniformly, then ``z ~ q(z | u_k)``. The IWAE likelihood bound uses the same
``log p(z)`` (``log_prior``).

Pseudo-inputs are images of the data's shape, kept in the pixel range by a hardtanh of free parameters
(the authors' code clips them to [0, 1] the same way). The encoder's BatchNorm layers see the
pseudo-inputs with their running statistics (evaluation mode), so the prior does not move the statistics
of the data batches, and ``p(z)`` is the same mixture in training and evaluation.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput, log_normal
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class VampConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus the VampPrior's size.

    Attributes:
        num_pseudo: ``K``, the number of pseudo-inputs (positive; the paper's MNIST experiments: 500).
        pseudo_init_std: the pseudo-inputs start as ``mid-grey + N(0, pseudo_init_std^2)`` pixels (>= 0).
    """

    num_pseudo: int = 500
    pseudo_init_std: float = 0.01
    model_type: str = field(default="vamp", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_pseudo, int) or isinstance(self.num_pseudo, bool) or self.num_pseudo < 1:
            raise ConfigError(f"num_pseudo must be a positive integer (pseudo-inputs), got {self.num_pseudo!r}")
        if isinstance(self.pseudo_init_std, bool) or not isinstance(self.pseudo_init_std, (int, float)) or self.pseudo_init_std < 0:
            raise ConfigError(f"pseudo_init_std must be a non-negative number, got {self.pseudo_init_std!r}")


@contextmanager
def _batch_norm_frozen(module: nn.Module):
    """Run ``module``'s BatchNorm layers with their running statistics (and without updating them)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    modes = [m.training for m in norms]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


class VampVAE(ConvVAE):
    """A ``ConvVAE`` whose prior is a VampPrior over ``num_pseudo`` learned pseudo-inputs.

    Shapes as ``ConvVAE``; ``pseudo_raw``: ``(K, C, H, W)`` parameters, ``pseudo_inputs()`` the images in
    the pixel range.
    """

    def __init__(self, config: VampConfig):
        super().__init__(config)
        c, s = config.in_channels, config.image_size
        low, high = (0.0, 1.0) if config.pixel_range == "[0,1]" else (-1.0, 1.0)
        self.pseudo_raw = nn.Parameter((low + high) / 2 + config.pseudo_init_std * torch.randn(config.num_pseudo, c, s, s))

    @property
    def PRIOR(self) -> str:  # noqa: N802 - the contract's name
        return f"VampPrior: (1/K) sum_k q(z | u_k) over K = {self.config.num_pseudo} learned pseudo-inputs u_k"

    def pseudo_inputs(self) -> torch.Tensor:
        """``(K, C, H, W)`` pseudo-inputs in the model's pixel range (hardtanh of ``pseudo_raw``)."""
        low = 0.0 if self.config.pixel_range == "[0,1]" else -1.0
        return F.hardtanh(self.pseudo_raw, low, 1.0)

    def prior_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of the ``K`` mixture components ``q(z | u_k)``, each ``(K, latent_dim)`` float32."""
        with _batch_norm_frozen(self.encoder):
            mu, logvar = self.encode(self.pseudo_inputs())
        return mu.float(), logvar.float()

    def log_prior(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z) = logsumexp_k log q(z | u_k) - log K`` (Tomczak & Welling 2018, eq. 9): ``(B, D)`` -> ``(B,)``
        nats (``y`` ignored)."""
        mu, logvar = self.prior_components()
        log_q = log_normal(z.float()[:, None, :], mu[None], logvar[None]).sum(2)  # (B, K)
        return torch.logsumexp(log_q, 1) - math.log(len(mu))

    @torch.no_grad()
    def sample_prior(self, n: int, *, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes from the VampPrior: a component ``k`` uniform in ``0..K-1``, then ``z ~ q(z | u_k)``;
        ``(n, latent_dim)`` float32 on the model's device, drawn with ``generator`` on its device."""
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        mu, logvar = self.prior_components()
        k = torch.randint(len(mu), (n,), device=gen_device, generator=generator).to(device)
        eps = torch.randn(n, self.config.latent_dim, device=gen_device, generator=generator).to(device)
        return mu[k] + (0.5 * logvar[k]).exp() * eps

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """Negative beta-ELBO with the VampPrior, one reparameterised ``z`` per image (nats per image).

        Steps: 1. encode; 2. ``z = mu + sigma * eps``; 3. decode, recon NLL; 4. ``kl = log q(z|x) - log p(z)``,
        the one-sample Monte Carlo KL to the VampPrior; 5. ``loss = mean(recon + beta * kl)``.
        """
        mu, logvar = self.encode(x, y=y)
        eps = (noise or self.draw_noise(len(x), generator, x.device))["eps"]
        z = self.reparameterize(mu, logvar, eps.to(mu.dtype))
        recon, mse = self.recon_terms(x, self.decode_logits(z, y=y))
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        kl = log_normal(z, mu, logvar).sum(1) - self.log_prior(z)
        return LossOutput(loss=(recon + beta * kl).mean(), recon=recon, kl=kl, mse=mse, mu=mu, logvar=logvar)
