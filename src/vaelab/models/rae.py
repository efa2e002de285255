"""Regularised deterministic autoencoder, RAE (Ghosh, Sajjadi, Vergari, Black & Schoelkopf 2020, "From
Variational to Deterministic Autoencoders"); its config sits beside it.

The networks are ``ConvVAE``'s; the encoder is used deterministically, ``z = mu(x)`` (no noise, no
variance), and the objective is eq. 6 of the paper:

    L_RAE = recon + beta * L_z + lambda * L_REG,    L_z = ||z||^2 / 2,

with ``L_REG`` on the decoder (sec. 3.1): ``l2``, the squared norm of the decoder's weights (RAE-L2,
the weight decay of the decoder alone), or ``gp``, a gradient penalty ``||grad_z D(z)||^2`` (RAE-GP;
here the gradient of the summed decoder mean, one backward pass per batch instead of a Jacobian), or
``none`` (the paper's RAE without decoder regulariser). ``recon`` is the decoder's negative
log-likelihood (the paper's squared error is the Gaussian case). The run's ``beta`` is the paper's beta.

Without a prior, samples come from a density fitted to the training codes after training (sec. 4,
"ex-post density estimation"): the default sampler is the ``gmm`` of ``vaelab.latent_priors`` (10
full-covariance components). There is no posterior, so no KL, ELBO or likelihood bound: the model
reports KL and -ELBO as ``null`` and ``vaelab evaluate`` skips ``nll`` and ``latent``. ``encode`` returns
``logvar = DETERMINISTIC_LOGVAR`` (standard deviation ``exp(-15)``, below float32 resolution at
``|z| ~ 1``): a point mass, so code that reads a posterior spread (the two-stage sampler) sees none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vaelab.errors import ConfigError
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig
from vaelab.losses import LossOutput

DECODER_REGULARISERS = ("l2", "gp", "none")
DETERMINISTIC_LOGVAR = -30.0


@dataclass
class RAEConfig(ConvVAEConfig):
    """A ``ConvVAEConfig`` plus the decoder regulariser.

    Attributes:
        decoder_reg: ``"l2"`` (squared norm of the decoder's weights), ``"gp"`` (gradient penalty) or ``"none"``.
        reg_weight: ``lambda``, the regulariser's weight per image (>= 0; default 1e-3, not tuned here).
    """

    decoder_reg: str = "l2"
    reg_weight: float = 1e-3
    model_type: str = field(default="rae", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decoder_reg not in DECODER_REGULARISERS:
            raise ConfigError(f"unknown decoder_reg {self.decoder_reg!r}; valid: {', '.join(DECODER_REGULARISERS)}")
        if isinstance(self.reg_weight, bool) or not isinstance(self.reg_weight, (int, float)) or self.reg_weight < 0:
            raise ConfigError(f"reg_weight must be a non-negative number, got {self.reg_weight!r}")


class RAE(ConvVAE):
    """A ``ConvVAE``'s networks as a regularised deterministic autoencoder (Ghosh et al. 2020).

    Shapes as ``ConvVAE``; ``encode`` gives ``(mu, logvar)`` with ``logvar`` the constant ``DETERMINISTIC_LOGVAR``.
    """

    HAS_ELBO = False
    DEFAULT_SAMPLER = "gmm"
    PRIOR = ("N(0, I), not a trained prior (the RAE only pulls its codes towards 0; its default sampler is the "
             "ex-post gmm)")
    EXTRA_TERMS = {"z_penalty": "L_z = ||z||^2 / 2 (Ghosh et al. 2020, eq. 6), per image",
                   "decoder_reg": "L_REG of the decoder (l2: squared weight norm, the same for every image; gp: "
                                  "||grad_z sum D(z)||^2 per image; none: 0)"}
    NOT_APPLICABLE = {
        "nll": "a deterministic encoder (RAE) has no posterior q(z|x): no ELBO or IWAE bound",
        "latent": "a deterministic encoder (RAE) has no KL per dimension; active units are in summary.json",
    }

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H, W)`` -> ``(z, logvar)``: the code ``z = mu(x)``, ``(B, latent_dim)``, and a constant
        ``logvar`` (``DETERMINISTIC_LOGVAR``: a point mass); ``y`` ignored."""
        mu = self.fc_mu(self.encoder(x))
        return mu, torch.full_like(mu, DETERMINISTIC_LOGVAR)

    def decoder_weight_norm(self) -> torch.Tensor:
        """Squared L2 norm of the decoder's weights (``decoder_input`` and ``decoder``; biases and BatchNorm
        excluded, as weight decay usually is): a 0-d float32 tensor."""
        weights = [p for module in (self.decoder_input, self.decoder) for name, p in module.named_parameters()
                   if name.endswith("weight") and p.ndim > 1]
        return sum(w.float().pow(2).sum() for w in weights)

    def gradient_penalty(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``(B,)`` ``||grad_z sum D(z)||^2``: the squared gradient norm of the summed decoder mean at each code
        (differentiable in training; in evaluation computed on a detached copy of ``z``)."""
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            mean = self.decode(z, y=y)
            (grad,) = torch.autograd.grad(mean.float().sum(), z, create_graph=self.training)
        return grad.float().pow(2).sum(1)

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> LossOutput:
        """``recon + beta * ||z||^2 / 2 + reg_weight * L_REG`` per image, mean over the batch (Ghosh et al. 2020,
        eq. 6). ``noise`` and ``generator`` are accepted for the family's signature and unused (no sampling).

        Steps: 1. ``z = mu(x)``; 2. decode, recon NLL; 3. ``L_z``; 4. ``L_REG`` (``decoder_reg``);
        5. the weighted sum. ``kl`` is 0 (no KL term; the family reports it as ``null``).
        """
        cfg = self.config
        z, logvar = self.encode(x, y=y)
        recon, mse = self.recon_terms(x, self.decode_logits(z, y=y))
        z_penalty = 0.5 * z.float().pow(2).sum(1)
        if cfg.decoder_reg == "l2":
            reg = self.decoder_weight_norm().expand(len(x))
        elif cfg.decoder_reg == "gp":
            reg = self.gradient_penalty(z, y)
        else:
            reg = torch.zeros_like(recon)
        objective = recon + beta * z_penalty + cfg.reg_weight * reg
        return LossOutput(loss=objective.mean(), recon=recon, kl=torch.zeros_like(recon), mse=mse, mu=z.float(),
                          logvar=logvar.float(), objective=objective, extra={"z_penalty": z_penalty, "decoder_reg": reg})
