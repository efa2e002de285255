"""Two-level Ladder VAE with top-down inference (Sønderby, Raiko, Maaløe, Sønderby & Winther 2016, "Ladder
Variational Autoencoders"); its config sits beside it.

Generative model: ``z2 ~ N(0, I)`` (``top_dim``), ``p(z1 | z2) = N(mu_p(z2), sigma_p^2(z2))`` (``latent_dim``,
an MLP), ``p(x | z1)`` the ``ConvVAE`` decoder. Inference shares the top-down path (sec. 2.2): a bottom-up
pass gives ``(mu_hat_1, sigma_hat_1)`` (``ConvVAE``'s encoder and heads) and ``q(z2 | x) = N(mu_hat_2,
sigma_hat_2^2)`` (an MLP on the encoder's features); then ``q(z1 | x, z2)`` is the precision-weighted
combination of the bottom-up and the top-down Gaussians (eqs. 17-19):

    sigma_q^2 = 1 / (sigma_hat^-2 + sigma_p^-2),     mu_q = (mu_hat sigma_hat^-2 + mu_p sigma_p^-2) sigma_q^2.

The ELBO, with one sample of ``z2 ~ q(z2 | x)`` and ``z1 ~ q(z1 | x, z2)``:

    -ELBO = -log p(x | z1) + KL(q(z1 | x, z2) || p(z1 | z2)) + KL(q(z2 | x) || N(0, I)) = recon + kl1 + kl2,

both KLs in closed form given ``z2`` (``kl = kl1 + kl2``; the two are reported per level). The run's ``beta``
weighs both. ``z = z1`` is the decoder's code: ``encode`` gives ``q(z1 | x, z2)`` at ``z2 = mu_hat_2``;
``sample_prior`` draws ``z2``, then ``z1 | z2``; the IWAE bound of ``vaelab evaluate`` samples both levels
(``importance_samples``). The marginal ``p(z1)`` has no closed form, so ``log_prior`` raises.

Every log-variance (bottom-up, ``q(z2 | x)`` and the learned prior ``p(z1 | z2)``) passes through a soft
bound ``LOGVAR_BOUND * tanh(logvar / LOGVAR_BOUND)`` (variances in [e^-8, e^8]): with an unbounded learned
prior variance the KL between two shrinking Gaussians overflowed after two epochs on MNIST at lr 1e-3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.errors import ConfigError, VaelabError
from vaelab.losses import LossOutput, log_normal, log_standard_normal
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

LOGVAR_BOUND = 8.0


def bounded_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """``LOGVAR_BOUND * tanh(logvar / LOGVAR_BOUND)``: smooth, ~identity near 0, within +-LOGVAR_BOUND."""
    return LOGVAR_BOUND * torch.tanh(logvar / LOGVAR_BOUND)


@dataclass
class LadderConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` (``latent_dim``: the size of ``z1``) plus the top level.

    Attributes:
        top_dim: size of ``z2`` (positive).
        ladder_hidden: width of the MLPs of ``q(z2 | x)`` and ``p(z1 | z2)`` (positive).
    """

    top_dim: int = 4
    ladder_hidden: int = 128
    model_type: str = field(default="ladder", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("top_dim", "ladder_hidden"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def precision_weighted(mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor,
                       logvar_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised product of two diagonal Gaussians (Sønderby et al. 2016, eqs. 17-19): ``(mu, logvar)``
    with ``1/var = 1/var_a + 1/var_b`` and ``mu = (mu_a/var_a + mu_b/var_b) * var``; any equal shapes."""
    prec_a, prec_b = torch.exp(-logvar_a), torch.exp(-logvar_b)
    var = 1 / (prec_a + prec_b)
    return (mu_a * prec_a + mu_b * prec_b) * var, var.log()


def kl_gaussians(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """Closed-form ``KL(N(mu_q, var_q) || N(mu_p, var_p))`` per dimension, nats."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) / logvar_p.exp() - 1)


class LadderVAE(ConvVAE):
    """A ``ConvVAE`` with a second latent level ``z2`` above ``z1`` and top-down inference.

    Shapes as ``ConvVAE`` (``z`` is ``z1``, ``(B, latent_dim)``); ``draw_noise(n)`` gives ``{"eps": (n, latent_dim),
    "eps_top": (n, top_dim)}``.
    """

    EXTRA_TERMS = {"kl1": "KL(q(z1 | x, z2) || p(z1 | z2)) at one z2 ~ q(z2 | x), nats per image",
                   "kl2": "KL(q(z2 | x) || N(0, I)), nats per image (kl = kl1 + kl2)"}
    NOT_APPLICABLE = {"latent": "z1's prior p(z1 | z2) is not N(0, I): the KL per dimension to N(0, I) does not apply; "
                                "kl1, kl2 and active units are in summary.json"}

    def __init__(self, config: LadderConfig):
        super().__init__(config)
        head, hid = self.fc_mu.in_features, config.ladder_hidden
        self.q_top = nn.Sequential(nn.Linear(head, hid), nn.ReLU(inplace=True), nn.Linear(hid, 2 * config.top_dim))
        self.p_z1 = nn.Sequential(nn.Linear(config.top_dim, hid), nn.ReLU(inplace=True),
                                  nn.Linear(hid, 2 * config.latent_dim))

    @property
    def PRIOR(self) -> str:  # noqa: N802 - the contract's name
        return f"z2 ~ N(0, I) ({self.config.top_dim} dims), z1 | z2 ~ N(mu_p(z2), sigma_p^2(z2)) (a Ladder VAE's two levels)"

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """``{"eps": (n, latent_dim), "eps_top": (n, top_dim)}`` standard normals, float32 (``z1``'s and ``z2``'s)."""
        device = device or next(self.parameters()).device
        return {"eps": torch.randn((n, self.config.latent_dim), device=device, generator=generator),
                "eps_top": torch.randn((n, self.config.top_dim), device=device, generator=generator)}

    def bottom_up(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(mu_hat_1, logvar_hat_1, mu_q2, logvar_q2)``: the bottom-up Gaussian of ``z1`` and ``q(z2 | x)``."""
        h = self.encoder(x)
        mu2, logvar2 = self.q_top(h).chunk(2, dim=1)
        return self.fc_mu(h), bounded_logvar(self.fc_logvar(h)), mu2, bounded_logvar(logvar2)

    def prior_z1(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``p(z1 | z2)``: ``(mu_p, logvar_p)``, each ``(N, latent_dim)``."""
        mu, logvar = self.p_z1(z2).chunk(2, dim=1)
        return mu, bounded_logvar(logvar)

    def top_down(self, mu1: torch.Tensor, logvar1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(mu_q1, logvar_q1, mu_p, logvar_p)``: ``q(z1 | x, z2)`` (precision-weighted) and ``p(z1 | z2)``."""
        mu_p, logvar_p = self.prior_z1(z2)
        return (*precision_weighted(mu1, logvar1, mu_p, logvar_p), mu_p, logvar_p)

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z1 | x, z2)`` at ``z2 = mu_hat_2`` (the mean of ``q(z2 | x)``): ``(mu, logvar)``, each ``(B, latent_dim)``."""
        mu1, logvar1, mu2, _ = self.bottom_up(x)
        return self.top_down(mu1, logvar1, mu2)[:2]

    def log_prior(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """Not available: the marginal ``p(z1) = E_{z2} p(z1 | z2)`` has no closed form (``importance_samples``
        gives the IWAE bound both levels instead).

        Raises:
            VaelabError: always.
        """
        raise VaelabError("a Ladder VAE's marginal prior p(z1) has no closed form; use importance_samples for "
                          "log p(z1, z2) - log q(z1, z2 | x)")

    @torch.no_grad()
    def sample_prior(self, n: int, *, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes ``z1``: ``z2 ~ N(0, I)``, then ``z1 ~ p(z1 | z2)``; ``(n, latent_dim)`` float32 on the model's
        device, drawn with ``generator`` on its device (``y`` ignored)."""
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        z2 = torch.randn(n, self.config.top_dim, device=gen_device, generator=generator).to(device)
        eps = torch.randn(n, self.config.latent_dim, device=gen_device, generator=generator).to(device)
        mu_p, logvar_p = self.prior_z1(z2)
        return mu_p + (0.5 * logvar_p).exp() * eps

    def importance_samples(self, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` draws ``z2 ~ q(z2 | x)``, ``z1 ~ q(z1 | x, z2)`` per image: ``z1`` ``(B, k, latent_dim)`` and
        ``log p(z2) + log p(z1 | z2) - log q(z2 | x) - log q(z1 | x, z2)`` ``(B, k)`` float32 nats (``y`` ignored)."""
        mu1, logvar1, mu2, logvar2 = (t.float() for t in self.bottom_up(x))
        b, d1, d2 = len(x), self.config.latent_dim, self.config.top_dim
        eps2 = torch.randn((b, k, d2), device=x.device, generator=generator)
        eps1 = torch.randn((b, k, d1), device=x.device, generator=generator)
        z2 = (mu2[:, None] + (0.5 * logvar2).exp()[:, None] * eps2).reshape(b * k, d2)
        rep = lambda t: t.repeat_interleave(k, 0)  # noqa: E731
        mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in self.top_down(rep(mu1), rep(logvar1), z2))
        z1 = mu_q + (0.5 * logvar_q).exp() * eps1.reshape(b * k, d1)
        log_ratio = (log_standard_normal(z2) + log_normal(z1, mu_p, logvar_p).sum(1)
                     - log_normal(z2, rep(mu2), rep(logvar2)).sum(1) - log_normal(z1, mu_q, logvar_q).sum(1))
        return z1.reshape(b, k, d1), log_ratio.reshape(b, k)

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """Negative beta-ELBO of the two-level model, one sample per level (nats per image).

        Steps: 1. bottom-up pass; 2. ``z2 = mu_q2 + sigma_q2 * eps_top``; 3. top-down: ``p(z1 | z2)`` and the
        precision-weighted ``q(z1 | x, z2)``; 4. ``z1 = mu_q1 + sigma_q1 * eps``, decode, recon NLL; 5. ``kl1``,
        ``kl2`` in closed form; 6. ``loss = mean(recon + beta * (kl1 + kl2))``. ``mu``/``logvar`` of the output
        are ``q(z1 | x, z2)`` at the sampled ``z2``.
        """
        noise = noise or self.draw_noise(len(x), generator, x.device)
        mu1, logvar1, mu2, logvar2 = self.bottom_up(x)
        z2 = self.reparameterize(mu2, logvar2, noise["eps_top"].to(mu2.dtype))
        mu_q, logvar_q, mu_p, logvar_p = self.top_down(mu1, logvar1, z2)
        z1 = self.reparameterize(mu_q, logvar_q, noise["eps"].to(mu_q.dtype))
        recon, mse = self.recon_terms(x, self.decode_logits(z1, y=y))
        mu_q, logvar_q = mu_q.float(), logvar_q.float()
        kl1 = kl_gaussians(mu_q, logvar_q, mu_p.float(), logvar_p.float()).sum(1)
        kl2 = kl_gaussians(mu2.float(), logvar2.float(), torch.zeros_like(mu2.float()), torch.zeros_like(mu2.float())).sum(1)
        kl = kl1 + kl2
        return LossOutput(loss=(recon + beta * kl).mean(), recon=recon, kl=kl, mse=mse, mu=mu_q, logvar=logvar_q,
                          extra={"kl1": kl1, "kl2": kl2})
