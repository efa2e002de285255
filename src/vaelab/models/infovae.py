"""InfoVAE / MMD-VAE (Zhao, Song & Ermon 2019, "InfoVAE: Balancing Learning and Inference in Variational
Autoencoders") and the stochastic-encoder WAE-MMD (Tolstikhin, Bousquet, Gelly & Schoelkopf 2018,
"Wasserstein Auto-Encoders"); its config sits beside it.

The networks are ``ConvVAE``'s; the objective adds a maximum mean discrepancy between the aggregate
posterior ``q(z)`` and the prior ``p(z)`` (InfoVAE eq. 6 with the MMD divergence, sec. 4):

    loss = recon + (1 - alpha) * KL(q(z|x) || p(z)) + (alpha + lambda - 1) * MMD(q(z), p(z))
         = recon + beta * kl + mmd_weight * mmd,

so the run's KL weight ``beta`` is InfoVAE's ``1 - alpha`` and ``mmd_weight`` is ``alpha + lambda - 1``.
``beta = 0`` is the MMD-VAE (``alpha = 1``) and, with a reconstruction cost for ``recon``, the WAE-MMD
objective (Tolstikhin et al., algorithm 2, with ``lambda = mmd_weight``).

MMD is the unbiased estimate (Gretton et al. 2012, eq. 3) between the batch's codes ``z_i ~ q(z | x_i)``
and as many prior draws, with the inverse multiquadratic kernel ``k(a, b) = C / (C + ||a - b||^2)``,
``C = 2 * latent_dim * s`` summed over the scales ``s`` of ``kernel_scales`` (Tolstikhin et al., sec. 4:
``C = 2 d sigma_z^2`` for a prior of variance ``sigma_z^2 = 1``, summed over several scales in their code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig


@dataclass
class InfoVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus the MMD term.

    Attributes:
        mmd_weight: weight of MMD(q(z), p(z)) per image (>= 0; InfoVAE's ``alpha + lambda - 1``, WAE's
            ``lambda``; default 10, the WAE paper's lambda for MNIST).
        kernel_scales: the scales ``s`` of the kernel sum, each positive.
    """

    mmd_weight: float = 10.0
    kernel_scales: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
    model_type: str = field(default="infovae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.kernel_scales = tuple(float(s) for s in self.kernel_scales)
        if isinstance(self.mmd_weight, bool) or not isinstance(self.mmd_weight, (int, float)) or self.mmd_weight < 0:
            raise ConfigError(f"mmd_weight must be a non-negative number, got {self.mmd_weight!r}")
        if not self.kernel_scales or min(self.kernel_scales) <= 0:
            raise ConfigError(f"kernel_scales must be a non-empty list of positive numbers, got {list(self.kernel_scales)}")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["kernel_scales"] = list(self.kernel_scales)
        return d


def imq_kernel(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...]) -> torch.Tensor:
    """``(n, D)``, ``(m, D)`` -> ``(n, m)``: ``sum_s C_s / (C_s + ||a_i - b_j||^2)``, ``C_s = 2 * D * s``."""
    d2 = torch.cdist(a, b).pow(2)
    return sum(c / (c + d2) for c in (2.0 * a.shape[1] * s for s in scales))


def mmd(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] = (1.0,)) -> torch.Tensor:
    """Unbiased MMD^2 between samples ``a`` ``(n, D)`` and ``b`` ``(m, D)`` (Gretton et al. 2012, eq. 3),
    inverse multiquadratic kernel (``imq_kernel``); a 0-d float32 tensor, about 0 for samples of one
    distribution (it can be slightly negative).

    Raises:
        ConfigError: fewer than two samples on a side.
    """
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        raise ConfigError(f"MMD needs at least 2 samples on each side, got {n} and {m}")
    a, b = a.float(), b.float()
    k_aa, k_bb, k_ab = imq_kernel(a, a, scales), imq_kernel(b, b, scales), imq_kernel(a, b, scales)
    off = lambda k, size: (k.sum() - k.diagonal().sum()) / (size * (size - 1))  # noqa: E731
    return off(k_aa, n) + off(k_bb, m) - 2 * k_ab.mean()


class InfoVAE(ConvVAE):
    """A ``ConvVAE`` trained on ``recon + beta * kl + mmd_weight * MMD(q(z), p(z))`` (Zhao et al. 2019).

    Shapes as ``ConvVAE``; ``draw_noise(n)`` gives ``{"eps": (n, D), "prior": (n, D)}``: the posterior
    noise and ``n`` standard normals from which the prior draws of the MMD are made. Under data
    parallelism each rank computes the MMD of its own share of the global batch.
    """

    EXTRA_TERMS = {"mmd": "MMD^2(q(z), p(z)) of the batch (inverse multiquadratic kernel; Zhao et al. 2019, "
                          "Tolstikhin et al. 2018), the same value for every image of a batch"}

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """``{"eps": (n, latent_dim), "prior": (n, latent_dim)}`` standard normals, float32."""
        device = device or next(self.parameters()).device
        d = self.config.latent_dim
        return {"eps": torch.randn((n, d), device=device, generator=generator),
                "prior": torch.randn((n, d), device=device, generator=generator)}

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """``recon + beta * kl + mmd_weight * mmd`` per image, mean over the batch (nats per image for recon, kl).

        Steps: 1. encode; 2. ``z = mu + sigma * eps``; 3. decode, recon NLL, closed-form KL; 4. MMD between
        the batch's ``z`` and ``B`` prior draws ``noise["prior"]`` (``N(0, I)``); 5. the weighted sum.
        """
        noise = noise or self.draw_noise(len(x), generator, x.device)
        mu, logvar = self.encode(x, y=y)
        z = self.reparameterize(mu, logvar, noise["eps"].to(mu.dtype))
        out = self.loss_terms(x, self.decode_logits(z, y=y), mu, logvar, beta=beta)
        # a batch of one image (a last, short batch) has no MMD estimate: it adds nothing
        batch_mmd = (mmd(z.float(), noise["prior"].float(), self.config.kernel_scales) if len(x) > 1
                     else z.new_zeros((), dtype=torch.float32)).expand(len(x))
        out.objective = out.recon + beta * out.kl + self.config.mmd_weight * batch_mmd
        out.loss = out.objective.mean()
        out.extra = {"mmd": batch_mmd}
        return out
