"""VAE loss terms in nats per image, and the beta (KL weight) schedules.

The negative ELBO of Kingma & Welling (2013), eq. 10, with a weight on the KL term as in
beta-VAE (Higgins et al. 2017):

    loss = recon + beta * kl,   recon = -log p(x | z) summed over pixels,
                                kl    = KL(q(z | x) || N(0, I)) summed over latent dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vaelab.errors import ConfigError

RECON_LIKELIHOODS = ("bernoulli", "gaussian")
BETA_SCHEDULES = ("constant", "linear", "cyclical")


@dataclass
class LossOutput:
    """Per-batch loss terms.

    Attributes:
        loss: scalar, mean over the batch of ``recon + beta * kl`` (nats per image); backprop this.
        recon: ``(B,)`` reconstruction negative log-likelihood, nats per image.
        kl: ``(B,)`` KL(q(z|x) || p(z)), nats per image.
        mse: ``(B,)`` mean squared error per pixel between ``x`` and the decoder mean, in the
            data's pixel units (``[0, 1]`` data gives values in ``[0, 1]``).
        mu: ``(B, latent_dim)`` posterior means.
        logvar: ``(B, latent_dim)`` posterior log-variances.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    mse: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor

    @property
    def elbo(self) -> torch.Tensor:
        """``(B,)`` evidence lower bound ``-(recon + kl)`` in nats per image (beta = 1)."""
        return -(self.recon + self.kl)


def kl_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Closed-form KL(N(mu, diag(exp(logvar))) || N(0, I)) per latent dimension.

    Kingma & Welling (2013), appendix B: ``-0.5 * (1 + logvar - mu^2 - exp(logvar))``.

    Args:
        mu, logvar: ``(B, D)`` float tensors.

    Returns:
        ``(B, D)`` KL in nats; sum over ``D`` for nats per image.
    """
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def recon_nll(
    logits: torch.Tensor, x: torch.Tensor, likelihood: str, *, sigma: float = 1.0, pixel_range: str = "[0,1]"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction negative log-likelihood ``-log p(x | z)`` and decoder mean.

    Args:
        logits: ``(B, C, H, W)`` raw decoder output.
        x: ``(B, C, H, W)`` data in ``pixel_range``.
        likelihood: ``"bernoulli"`` (binary cross-entropy on ``sigmoid(logits)``; needs ``[0,1]`` data,
            exact for binary pixels, the usual surrogate for gray digits) or ``"gaussian"``
            (fixed standard deviation ``sigma`` around the mean, including the ``0.5*log(2*pi*sigma^2)``
            constant so the result is a true NLL; ``sigma = sqrt(0.5)`` makes it ``SSE + const``, the
            seeds' summed-MSE loss).
        sigma: Gaussian standard deviation in pixel units.
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``.

    Returns:
        ``(nll, mean)``: ``(B,)`` nats per image and the ``(B, C, H, W)`` decoder mean in ``pixel_range``.

    Raises:
        ConfigError: unknown likelihood, or Bernoulli with ``[-1,1]`` data.
    """
    mean = decoder_mean(logits, pixel_range)
    if likelihood == "bernoulli":
        if pixel_range != "[0,1]":
            raise ConfigError("recon_likelihood 'bernoulli' needs pixel_range '[0,1]'")
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = (x - mean).pow(2) / (2 * sigma**2) + 0.5 * math.log(2 * math.pi * sigma**2)
    else:
        raise ConfigError(f"unknown recon_likelihood {likelihood!r}; valid: {', '.join(RECON_LIKELIHOODS)}")
    return nll.flatten(1).sum(1), mean


def decoder_mean(logits: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Decoder logits -> pixel means: ``sigmoid`` for ``[0,1]``, ``2*sigmoid-1`` for ``[-1,1]``."""
    mean = torch.sigmoid(logits)
    return mean * 2.0 - 1.0 if pixel_range == "[-1,1]" else mean


def beta_at(
    step: int,
    *,
    beta: float,
    schedule: str = "constant",
    anneal_steps: int = 0,
    total_steps: int = 1,
    cycles: int = 4,
    ratio: float = 0.5,
) -> float:
    """The KL weight at optimisation step ``step`` (0-based).

    - ``constant``: ``beta``.
    - ``linear``: KL annealing (Bowman et al. 2016), ``beta * min(1, step / anneal_steps)``.
    - ``cyclical``: Fu et al. (2019), ``cycles`` periods over ``total_steps``; in each period the
      weight rises linearly from 0 to ``beta`` over the first ``ratio`` of it, then stays at ``beta``.

    Raises:
        ConfigError: unknown schedule or non-positive lengths.
    """
    if schedule == "constant":
        return beta
    if schedule == "linear":
        if anneal_steps <= 0:
            raise ConfigError(f"linear KL annealing needs anneal steps > 0, got {anneal_steps}")
        return beta * min(1.0, step / anneal_steps)
    if schedule == "cyclical":
        if total_steps <= 0 or cycles <= 0 or not 0.0 < ratio <= 1.0:
            raise ConfigError(f"cyclical schedule needs total_steps, cycles > 0 and ratio in (0, 1]; got {total_steps}, {cycles}, {ratio}")
        period = total_steps / cycles
        tau = (step % period) / period
        return beta * min(1.0, tau / ratio)
    raise ConfigError(f"unknown beta schedule {schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
