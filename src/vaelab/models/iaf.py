"""VAE with an inverse autoregressive flow (IAF) posterior (Kingma, Salimans, Jozefowicz, Chen, Sutskever &
Welling 2016, "Improved Variational Inference with Inverse Autoregressive Flow"); its config sits beside it.

The networks are ``ConvVAE``'s; the encoder's Gaussian ``N(mu_0, sigma_0^2)`` is followed by ``T`` IAF steps
(sec. 4), each a MADE (Germain et al. 2015) that reads the current ``z`` and the encoder's context ``h``:

    z_0 = mu_0 + sigma_0 * eps,                 eps ~ N(0, I)
    z_t = mu_t(z_{t-1}, h) + sigma_t(z_{t-1}, h) * z_{t-1},     t = 1..T   (autoregressive mu_t, sigma_t)
    log q(z_T | x) = sum_i [ log N(eps_i; 0, 1) - log sigma_0,i - sum_t log sigma_t,i ]

Because ``mu_t,i`` and ``sigma_t,i`` depend on ``z_{t-1,<i}`` only, each step's Jacobian is triangular with
diagonal ``sigma_t``, hence the log-determinant above. The order of ``z`` is reversed between steps so that
every dimension depends on every other after two steps. The MADE's output layer starts at zero
(``mu_t = 0``, ``log sigma_t = 0``): the flow starts as the identity, i.e. as the plain VAE.

The KL term has no closed form: training uses the one-sample Monte Carlo estimate ``kl = log q(z_T | x) -
log p(z_T)`` at the ``z_T`` of the reconstruction term; the IWAE bound of ``vaelab evaluate`` uses the flow's
``log q`` (``importance_samples``).

``encode`` returns a Gaussian summary of the flow posterior (used by reconstructions, interpolations, the
fitted samplers and the latent plots): ``mu`` is ``z_T`` at ``eps = 0`` and ``logvar`` is
``logvar_0 + 2 * sum_t log sigma_t`` there, the Gaussian whose log-determinant equals the flow's at that point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

LOG_2PI = math.log(2 * math.pi)


@dataclass
class IAFConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus the flow.

    Attributes:
        flow_steps: ``T``, the number of IAF steps (positive; the paper's MNIST models use 2 to 8).
        made_hidden: width of each MADE's two hidden layers (positive).
    """

    flow_steps: int = 2
    made_hidden: int = 64
    model_type: str = field(default="iaf", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("flow_steps", "made_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


class MaskedLinear(nn.Linear):
    """``nn.Linear`` whose weight is multiplied by a fixed 0/1 ``mask`` ``(out, in)`` (MADE, Germain et al. 2015)."""

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Autoregressive network: ``(z (B, D), h (B, H_ctx)) -> (mu, log_sigma)``, each ``(B, D)``, where output ``i``
    depends on ``z_<i`` (and ``h``) only. Two masked hidden layers of ``hidden`` units; the context enters the
    first one through an unmasked linear map (Kingma et al. 2016, sec. 4 and appendix). The output layer starts
    at zero, so a fresh MADE gives ``mu = 0`` and ``log_sigma = 0``."""

    def __init__(self, dim: int, hidden: int, context: int):
        super().__init__()
        d_in = torch.arange(1, dim + 1)
        # hidden degrees in 1..D-1 (0 for D = 1: such units see the context only)
        d_hid = torch.arange(hidden) % max(1, dim - 1) + (1 if dim > 1 else 0)
        self.inp = MaskedLinear(dim, hidden, d_hid[:, None] >= d_in[None])
        self.ctx = nn.Linear(context, hidden)
        self.mid = MaskedLinear(hidden, hidden, d_hid[:, None] >= d_hid[None])
        self.out = MaskedLinear(hidden, 2 * dim, (d_in[:, None] > d_hid[None]).repeat(2, 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.elu(self.inp(z) + self.ctx(h))
        a = F.elu(self.mid(a))
        mu, log_sigma = self.out(a).chunk(2, dim=1)
        return mu, log_sigma


class IAFVAE(ConvVAE):
    """A ``ConvVAE`` whose posterior is the encoder's Gaussian followed by ``flow_steps`` IAF steps.

    Shapes as ``ConvVAE``; ``draw_noise(n)`` gives ``{"eps": (n, latent_dim)}`` (the noise of ``z_0``).
    """

    EXTRA_TERMS = {"log_det": "sum_t sum_i log sigma_t,i: how much the flow steps change the posterior's volume "
                              "(Kingma et al. 2016, sec. 4), nats per image"}
    NOT_APPLICABLE = {"latent": "the posterior is a flow, not a diagonal Gaussian: no closed-form KL per dimension; "
                                "active units are in summary.json"}

    def __init__(self, config: IAFConfig):
        super().__init__(config)
        context = config.fc_hidden or self.fc_mu.in_features
        self.flow = nn.ModuleList(MADE(config.latent_dim, config.made_hidden, context) for _ in range(config.flow_steps))

    def base(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder's Gaussian and context: ``(mu_0, logvar_0, h)``, ``(B, latent_dim)`` twice and ``(B, H_ctx)``."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h), h

    def flow_forward(self, z0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``T`` IAF steps from ``z_0`` ``(N, D)`` with context ``h`` ``(N, H_ctx)``: ``(z_T, log_sigma)``, both
        ``(N, D)`` in the encoder's order, ``log_sigma`` = ``sum_t log sigma_t`` per dimension (its row sum is the
        log-determinant of ``dz_T / dz_0``)."""
        z, log_sigma = z0, torch.zeros_like(z0)
        for t, made in enumerate(self.flow):
            if t:  # reverse the order between steps
                z, log_sigma = z.flip(1), log_sigma.flip(1)
            m, s = made(z, h)
            z, log_sigma = m + s.exp() * z, log_sigma + s
        if len(self.flow) % 2 == 0:  # back to the encoder's order (an even number of reversals)
            z, log_sigma = z.flip(1), log_sigma.flip(1)
        return z, log_sigma

    def posterior(self, mu0: torch.Tensor, logvar0: torch.Tensor, h: torch.Tensor,
                  eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z_T`` and ``log q(z_T | x)`` for the encoder's ``(mu_0, logvar_0, h)`` (``base``) and noise ``eps``
        ``(B, k, D)``: ``(z, log_q, log_det)`` of shapes ``(B, k, D)``, ``(B, k)``, ``(B, k)`` (the last two
        float32, nats)."""
        b, k, d = eps.shape
        eps = eps.to(mu0.dtype)
        z0 = mu0[:, None] + (0.5 * logvar0).exp()[:, None] * eps
        z, log_sigma = self.flow_forward(z0.reshape(b * k, d), h.repeat_interleave(k, 0))
        log_det = log_sigma.float().sum(1).reshape(b, k)
        log_q = (-0.5 * eps.float().pow(2) - 0.5 * LOG_2PI - 0.5 * logvar0.float()[:, None]).sum(2) - log_det
        return z.reshape(b, k, d), log_q, log_det

    def summary(self, mu0: torch.Tensor, logvar0: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian summary of the flow posterior (see ``encode``) from the encoder's outputs."""
        z, log_sigma = self.flow_forward(mu0, h)
        return z, logvar0 + 2 * log_sigma

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A Gaussian summary of the flow posterior: ``(z_T at eps = 0, logvar_0 + 2 * sum_t log sigma_t there)``,
        each ``(B, latent_dim)`` (``y`` ignored)."""
        return self.summary(*self.base(x))

    def importance_samples(self, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` flow samples ``z_T`` per image and ``log p(z_T) - log q(z_T | x)`` with the flow's ``log q``:
        ``(B, k, latent_dim)``, ``(B, k)`` (``y`` ignored)."""
        eps = torch.randn((len(x), k, self.config.latent_dim), device=x.device, generator=generator)
        z, log_q, _ = self.posterior(*self.base(x), eps)
        log_p = self.log_prior(z.reshape(-1, z.shape[2])).reshape(log_q.shape)
        return z, log_p - log_q

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """Negative beta-ELBO with the flow posterior, one sample per image (nats per image).

        Steps: 1. encode to ``mu_0, logvar_0, h``; 2. ``z_0 = mu_0 + sigma_0 * eps``; 3. the IAF steps to
        ``z_T`` and ``log q(z_T | x)``; 4. decode ``z_T``, recon NLL; 5. ``kl = log q(z_T | x) - log p(z_T)``
        (one-sample Monte Carlo); 6. ``loss = mean(recon + beta * kl)``. ``mu``/``logvar`` of the output are
        ``encode``'s Gaussian summary.
        """
        eps = (noise or self.draw_noise(len(x), generator, x.device))["eps"]
        mu0, logvar0, h = self.base(x)
        z, log_q, log_det = self.posterior(mu0, logvar0, h, eps[:, None])
        z, log_q, log_det = z[:, 0], log_q[:, 0], log_det[:, 0]
        recon, mse = self.recon_terms(x, self.decode_logits(z, y=y))
        kl = log_q - self.log_prior(z.float())
        with torch.no_grad():
            mu, logvar = self.summary(mu0, logvar0, h)
        return LossOutput(loss=(recon + beta * kl).mean(), recon=recon, kl=kl, mse=mse, mu=mu.float(),
                          logvar=logvar.float(), extra={"log_det": log_det})
