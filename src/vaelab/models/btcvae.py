"""beta-TC-VAE (Chen, Li, Grosse & Duvenaud 2018, "Isolating Sources of Disentanglement in Variational
Autoencoders"); its config sits beside it.

The networks are ``ConvVAE``'s; the objective splits the ELBO's KL term (eq. 2) into

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                        index-code mutual information
                           + KL(q(z) || prod_j q(z_j))        total correlation (TC)
                           + sum_j KL(q(z_j) || p(z_j))       dimension-wise KL

and weighs them ``alpha``, ``beta`` and ``gamma`` (eq. 4; the paper's beta-TC-VAE: ``alpha = gamma = 1``,
the TC weight ``beta`` > 1). The aggregate posterior ``q(z) = (1/N) sum_n q(z | x_n)`` is estimated on the
minibatch, for ``z_i ~ q(z | x_i)`` in a batch of ``M`` images out of ``N``, as
``log q(z_i) ~ logsumexp_j [log w_ij + log q(z_i | x_j)]`` (and the same for each dimension alone), with

- ``mws``, minibatch-weighted sampling (sec. 4.1, the default): ``w_ij = 1 / (N M)`` for every ``j``;
- ``mss``, minibatch stratified sampling (described in the paper's appendix): ``w_ii = 1 / N`` for the image's own posterior,
  ``(N - M + 1) / (N (M - 1))`` for one other image of the batch (the next one, cyclically) and
  ``1 / (M - 1)`` for the rest; the weights of a row sum to 1.

MWS gives the other images of the batch the weight ``1 / (N M)``, so where posteriors overlap its
``log q(z)`` is low by up to ``log N`` (``mi`` reads high, ``dim_kl`` low by that much); MSS has no such
offset (identical posteriors give ``log q(z) = log p(z)`` exactly). The offset of MWS is a constant and
leaves the gradients alone.

With one sample per image, per image: ``mi = log q(z|x) - log q(z)``, ``tc = log q(z) - sum_j log q(z_j)``,
``dim_kl = sum_j log q(z_j) - log p(z)``; the three sum to ``log q(z|x) - log p(z)``, the one-sample
estimate of the KL term, whatever the weights. Training sets ``N`` to the size of the run's train split
(``dataset_size``); under ``mws`` it only shifts the three terms by constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vaelab.errors import ConfigError
from vaelab.losses import LossOutput, kl_normal, log_normal
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

ESTIMATORS = ("mws", "mss")


@dataclass
class BTCVAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus the weights of the decomposed KL (the TC weight is the run's ``beta``).

    Attributes:
        alpha: weight of the index-code mutual information (>= 0; the paper's beta-TC-VAE: 1).
        gamma: weight of the dimension-wise KL (>= 0; the paper's beta-TC-VAE: 1).
        dataset_size: ``N`` of the estimator, the number of training images (positive; filled from the
            run's train split by ``vaelab train``).
        estimator: ``"mws"`` (minibatch-weighted sampling) or ``"mss"`` (minibatch stratified sampling).
    """

    alpha: float = 1.0
    gamma: float = 1.0
    dataset_size: int = 60000
    estimator: str = "mws"
    model_type: str = field(default="btcvae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"{name} must be a non-negative number, got {v!r}")
        if not isinstance(self.dataset_size, int) or isinstance(self.dataset_size, bool) or self.dataset_size < 1:
            raise ConfigError(f"dataset_size must be a positive integer (training images), got {self.dataset_size!r}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}")


def log_weights(m: int, dataset_size: int, estimator: str = "mws", device=None) -> torch.Tensor:
    """``(M, M)`` log weights ``log w_ij`` of the aggregate-posterior estimate (see the module docstring).

    ``mss`` needs ``M >= 2`` and ``N >= M``; a one-image batch falls back to ``mws``.
    """
    n = dataset_size
    if estimator == "mws" or m < 2:
        return torch.full((m, m), -math.log(n * m), device=device)
    w = torch.full((m, m), 1.0 / (m - 1), device=device)
    idx = torch.arange(m, device=device)
    w[idx, (idx + 1) % m] = (n - m + 1) / (n * (m - 1))  # the stratified one: the next image, cyclically
    w[idx, idx] = 1.0 / n
    return w.log()


def mws_terms(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, log_pz: torch.Tensor,
              dataset_size: int, estimator: str = "mws") -> dict[str, torch.Tensor]:
    """The KL decomposition of Chen et al. (2018), eq. 2, per image, estimated on the minibatch
    (``estimator``: ``"mws"`` minibatch-weighted or ``"mss"`` minibatch stratified sampling).

    Args:
        z: ``(M, D)`` one sample per image, ``z_i ~ q(z | x_i)``; ``mu``, ``logvar``: ``(M, D)`` of ``q(z | x_i)``.
        log_pz: ``(M,)`` ``log p(z_i)``.
        dataset_size: ``N``, the number of training images (``>= M`` for ``mss``).

    Returns:
        ``{"mi", "tc", "dim_kl", "log_qz_x", "log_qz", "log_qz_prod"}``, each ``(M,)`` float32 in nats.
    """
    m = z.shape[0]
    mat = log_normal(z[:, None, :], mu[None], logvar[None])  # (M, M, D): log q(z_i,d | x_j)
    log_w = log_weights(m, max(dataset_size, m), estimator, z.device)
    log_qz_x = mat.diagonal(dim1=0, dim2=1).sum(0)  # log q(z_i | x_i)
    log_qz = torch.logsumexp(log_w + mat.sum(2), 1)
    log_qz_prod = torch.logsumexp(log_w[:, :, None] + mat, 1).sum(1)
    return {"mi": log_qz_x - log_qz, "tc": log_qz - log_qz_prod, "dim_kl": log_qz_prod - log_pz,
            "log_qz_x": log_qz_x, "log_qz": log_qz, "log_qz_prod": log_qz_prod}


class BTCVAE(ConvVAE):
    """A ``ConvVAE`` trained on ``recon + alpha * mi + beta * tc + gamma * dim_kl`` (Chen et al. 2018, eq. 4).

    Shapes as ``ConvVAE``. The estimated terms of an image depend on the other images of its batch (and, in
    evaluation, of its block of ``vaelab.families.base.EVAL_BLOCK`` images); under data parallelism, of its
    rank's share of the global batch.
    """

    EXTRA_TERMS = {
        "mi": "index-code mutual information I_q(x; z), minibatch estimate (Chen et al. 2018, eq. 2), nats per image",
        "tc": "total correlation KL(q(z) || prod_j q(z_j)), minibatch estimate, nats per image",
        "dim_kl": "dimension-wise KL sum_j KL(q(z_j) || p(z_j)), minibatch estimate, nats per image",
    }

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """``recon + alpha * mi + beta * tc + gamma * dim_kl`` per image, mean over the batch (nats per image).

        Steps: 1. encode; 2. one ``z = mu + sigma * eps`` per image; 3. decode, recon NLL; 4. the three terms
        estimated on the batch (``mws_terms``); 5. the weighted sum. ``kl`` is the closed-form KL(q(z|x) || N(0, I)), so
        ``recon + kl`` is the usual -ELBO.
        """
        cfg = self.config
        mu, logvar = self.encode(x, y=y)
        eps = (noise or self.draw_noise(len(x), generator, x.device))["eps"]
        z = self.reparameterize(mu, logvar, eps.to(mu.dtype))
        recon, mse = self.recon_terms(x, self.decode_logits(z, y=y))
        mu, logvar, z = mu.float(), logvar.float(), z.float()
        t = mws_terms(z, mu, logvar, self.log_prior(z, y=y), cfg.dataset_size, cfg.estimator)
        objective = recon + cfg.alpha * t["mi"] + beta * t["tc"] + cfg.gamma * t["dim_kl"]
        return LossOutput(loss=objective.mean(), recon=recon, kl=kl_normal(mu, logvar).sum(1), mse=mse, mu=mu,
                          logvar=logvar, objective=objective, extra={k: t[k] for k in self.EXTRA_TERMS})
