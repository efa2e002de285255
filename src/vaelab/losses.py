"""VAE loss terms in nats per image, and the beta (KL weight) schedules.

The negative ELBO of Kingma & Welling (2013), eq. 10, with a weight on the KL term as in
beta-VAE (Higgins et al. 2017):

    loss = recon + beta * kl,   recon = -log p(x | z) summed over pixels,
                                kl    = KL(q(z | x) || N(0, I)) summed over latent dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vaelab.data.pixels import from_symmetric, from_unit_interval, to_symmetric
from vaelab.errors import ConfigError

RECON_LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_learned", "gaussian_calibrated", "discretized_logistic")
# output channels of the decoder network per image channel (more than one: several parameters per sub-pixel)
DECODER_PARAMS = {"bernoulli": 1, "gaussian": 1, "gaussian_learned": 1, "gaussian_calibrated": 1, "discretized_logistic": 2}
# Gaussian likelihoods with one shared, fitted standard deviation (sigma-VAE, Rybkin et al. 2021): the model
# appends log sigma to its decoder logits as C more channels (a broadcast scalar), so ``recon_nll`` and every
# metric that calls it read sigma from the logits. ``learned``: log sigma is a parameter trained by gradient
# descent with the rest; ``calibrated``: sigma^2 is set to its closed-form optimum, the batch MSE, at every
# training step, and evaluation uses a running average of it (like BatchNorm's statistics).
SHARED_SIGMA = ("gaussian_learned", "gaussian_calibrated")
# lower bound of a fitted log sigma (Rybkin et al.'s code soft-clips a learned one at -6: sigma >= 0.0025 pixel units)
MIN_LOG_SIGMA = -6.0
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
        objective: ``(B,)`` the per-image training objective whose batch mean is ``loss``, for models whose
            objective is not ``recon + beta * kl`` (IWAE, beta-TC-VAE, InfoVAE, RAE); ``None``: ``recon + beta * kl``.
        extra: ``{name: (B,)}`` the model's own per-image terms (its ``EXTRA_TERMS``), e.g. the negative
            IWAE bound or the total correlation; validation and test report their means.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    mse: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    objective: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def per_image(self, beta: float) -> torch.Tensor:
        """``(B,)`` per-image loss: ``objective`` if the model gave one, else ``recon + beta * kl`` (nats per image)."""
        return self.objective if self.objective is not None else self.recon + beta * self.kl

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


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise log-density of ``z`` under ``N(mu, exp(logvar))`` in nats (broadcasting shapes);
    sum over the last dimension for a diagonal Gaussian's ``log q(z | x)``."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(...)``: ``log N(z; 0, I)`` summed over the last dimension, in nats."""
    return (-0.5 * (z.pow(2) + math.log(2 * math.pi))).sum(-1)


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
            seeds' summed-MSE loss), ``"gaussian_learned"`` / ``"gaussian_calibrated"`` (the same
            Gaussian density with one fitted standard deviation shared by all pixels, sigma-VAE, Rybkin
            et al. 2021; ``logits`` then hold ``2 * C`` channels, means then ``log sigma``, and ``sigma``
            is ignored), or ``"discretized_logistic"`` (``discretized_logistic_nll``: a true likelihood
            of 8-bit pixels; ``logits`` then hold ``2 * C`` channels, means then log-scales).
        sigma: Gaussian standard deviation in pixel units (``"gaussian"`` only).
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``.

    Returns:
        ``(nll, mean)``: ``(B,)`` nats per image and the ``(B, C, H, W)`` decoder mean in ``pixel_range``.

    Raises:
        ConfigError: unknown likelihood, Bernoulli with ``[-1,1]`` data, or logits with the wrong
            number of channels for a two-parameter likelihood.
    """
    if likelihood in SHARED_SIGMA:
        c = x.shape[1]
        if logits.shape[1] != 2 * c:
            raise ConfigError(f"{likelihood} needs 2*C = {2 * c} logit channels (means, then log sigma), got {logits.shape[1]}")
        mean = decoder_mean(logits, pixel_range, likelihood=likelihood)
        return gaussian_nll(x, mean, logits[:, c:]).flatten(1).sum(1), mean
    if likelihood == "discretized_logistic":
        return discretized_logistic_nll(logits, x, pixel_range=pixel_range).flatten(1).sum(1), decoder_mean(
            logits, pixel_range, likelihood=likelihood)
    mean = decoder_mean(logits, pixel_range)
    if likelihood == "bernoulli":
        if pixel_range != "[0,1]":
            raise ConfigError("recon_likelihood 'bernoulli' needs pixel_range '[0,1]'")
        nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    elif likelihood == "gaussian":
        nll = gaussian_nll(x, mean, math.log(sigma))
    else:
        raise ConfigError(f"unknown recon_likelihood {likelihood!r}; valid: {', '.join(RECON_LIKELIHOODS)}")
    return nll.flatten(1).sum(1), mean


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor | float) -> torch.Tensor:
    """``-log N(x | mean, sigma^2)`` per sub-pixel, with the normalising constant:
    ``(x - mean)^2 / (2 sigma^2) + log sigma + 0.5 log(2 pi)`` (nats; ``x``, ``mean`` and ``sigma`` in
    pixel units). ``log_sigma``: a float, or a tensor broadcastable to ``x``."""
    log_sigma = torch.as_tensor(log_sigma, dtype=x.dtype, device=x.device)
    return (x - mean).pow(2) * torch.exp(-2 * log_sigma) / 2 + log_sigma + 0.5 * math.log(2 * math.pi)


def optimal_log_sigma(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The shared Gaussian ``log sigma`` that maximises the likelihood of ``x`` given ``mean``: ``sigma^2 =
    MSE`` over every sub-pixel of the batch (Rybkin et al. 2021, "Simple and Effective VAE Training with
    Calibrated Decoders", sec. 3.2), clamped below at ``MIN_LOG_SIGMA``. Returns a 0-d tensor."""
    return (0.5 * (x - mean).pow(2).mean().clamp(min=1e-12).log()).clamp(min=MIN_LOG_SIGMA)


def soft_clip_log_sigma(log_sigma: torch.Tensor) -> torch.Tensor:
    """``MIN_LOG_SIGMA + softplus(log_sigma - MIN_LOG_SIGMA)``: a smooth lower bound on a learned log sigma
    (Rybkin et al.'s ``softclip``), so sigma cannot shrink to 0 on near-perfect reconstructions. A bijection
    onto ``(MIN_LOG_SIGMA, inf)``: a reparameterisation of the learned value, not a bias."""
    return MIN_LOG_SIGMA + F.softplus(log_sigma - MIN_LOG_SIGMA)


def decoder_mean(logits: torch.Tensor, pixel_range: str = "[0,1]", *, likelihood: str = "bernoulli") -> torch.Tensor:
    """Decoder logits -> pixel means: ``sigmoid`` for ``[0,1]``, ``2*sigmoid-1`` for ``[-1,1]``.

    For ``likelihood="discretized_logistic"`` the first ``C`` of the ``2 * C`` channels are the
    logistic locations on the ``[-1, 1]`` scale; the mean shown is that location clamped to the pixel range.
    For the ``SHARED_SIGMA`` likelihoods the first ``C`` channels are the mean logits (the rest, log sigma).
    """
    if likelihood == "discretized_logistic":
        return from_symmetric(logits[:, : logits.shape[1] // 2], pixel_range)
    if likelihood in SHARED_SIGMA:
        logits = logits[:, : logits.shape[1] // 2]
    return from_unit_interval(torch.sigmoid(logits), pixel_range)


def discretized_logistic_nll(params: torch.Tensor, x: torch.Tensor, *, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Negative log-likelihood of 8-bit pixels under a discretised logistic (one per sub-pixel).

    Salimans et al. (2017), PixelCNN++, eq. 2 with a single mixture component: pixel values
    ``v in {0, ..., 255}`` are rescaled to ``[-1, 1]``; the probability of ``v`` is the logistic
    mass of its bin ``[x - 1/255, x + 1/255]``, with the edge bins extended to ``-inf`` / ``+inf``,
    so the 256 probabilities sum to 1 exactly.

    Args:
        params: ``(B, 2C, H, W)``: locations ``mu`` (on the ``[-1, 1]`` scale), then log-scales
            (clamped below at -7 as in PixelCNN++).
        x: ``(B, C, H, W)`` 8-bit images as floats in ``pixel_range`` (``v / 255`` or ``2 v / 255 - 1``).
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``.

    Returns:
        ``(B, C, H, W)`` NLL in nats per sub-pixel; sum over ``C, H, W`` for nats per image.

    Raises:
        ConfigError: ``params`` does not hold ``2 * C`` channels.
    """
    c = x.shape[1]
    if params.shape[1] != 2 * c:
        raise ConfigError(f"discretized_logistic needs 2*C = {2 * c} decoder channels, got {params.shape[1]}")
    mu, log_s = params[:, :c], params[:, c:].clamp(min=-7.0)
    x = to_symmetric(x, pixel_range)
    inv_s = torch.exp(-log_s)
    centered = x - mu
    plus = inv_s * (centered + 1.0 / 255.0)
    minus = inv_s * (centered - 1.0 / 255.0)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the mass below the top edge, for v = 0
    log_one_minus_cdf_min = -F.softplus(minus)  # log(1 - sigmoid(minus)): the mass above, for v = 255
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * centered
    # where the bin mass underflows, use the density at the centre times the bin width (PixelCNN++)
    log_pdf_mid = mid - log_s - 2.0 * F.softplus(mid) - math.log(127.5)
    log_mass = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    log_p = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mass))
    return -log_p


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


def likelihood_note(likelihood: str, images: torch.Tensor) -> tuple[bool, str]:
    """Whether ``likelihood`` on these ``uint8`` images is a discrete likelihood (so nats convert to
    bits/dim), and a sentence saying why or why not."""
    if likelihood == "discretized_logistic":
        return True, "discretised logistic over 256 levels (Salimans et al. 2017): a likelihood of the 8-bit images"
    binary = bool(((images == 0) | (images == 255)).all())
    if likelihood == "bernoulli" and binary:
        return True, "Bernoulli on binary images: a likelihood of the binarised data"
    if likelihood == "bernoulli":
        return False, ("Bernoulli on gray-level pixels is a surrogate, not a normalised likelihood of 8-bit images; "
                       "bits/dim not reported (train with binarize: true or recon_likelihood: discretized_logistic)")
    return False, ("a continuous density on pixel values, not a discrete likelihood of 8-bit images; bits/dim not "
                   "reported (train with recon_likelihood: discretized_logistic)")
