"""Convolutional VAE (Kingma & Welling 2013) with configurable widths; its config sits beside it.

Encoder: ``len(channels)`` blocks of Conv2d(k=4, s=2, p=1) + BatchNorm + ReLU, flatten,
(optional Linear ``fc_hidden`` + ReLU), then ``fc_mu`` and ``fc_logvar``.
Decoder: the mirror image with ConvTranspose2d(k=4, s=2, p=1); the last layer outputs logits,
whose ``sigmoid`` is the pixel mean (the seeds' final ``Sigmoid``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from vaelab.data.pixels import PIXEL_RANGES
from vaelab.errors import ConfigError
from vaelab.losses import (
    DECODER_PARAMS,
    MIN_LOG_SIGMA,
    RECON_LIKELIHOODS,
    SHARED_SIGMA,
    LossOutput,
    decoder_mean,
    kl_normal,
    log_standard_normal,
    optimal_log_sigma,
    recon_nll,
    soft_clip_log_sigma,
)

# weight of the newest batch in the running sigma^2 of a calibrated decoder (evaluation uses the running value)
SIGMA_MOMENTUM = 0.05


@dataclass
class ConvVAEConfig:
    """Architecture and likelihood of a ``ConvVAE``.

    Attributes:
        in_channels: image channels ``C`` (1 gray, 3 RGB).
        image_size: square image side ``H = W`` in pixels; must be at least ``2 ** len(channels)``.
        channels: encoder widths, one stride-2 conv per entry; the decoder mirrors them.
        latent_dim: size of ``z``; positive.
        fc_hidden: width of an extra Linear + ReLU between the conv stack and ``fc_mu``/``fc_logvar``
            (and before the decoder's reshape); ``None`` for none.
        batch_norm: BatchNorm after every conv except the decoder's last.
        recon_likelihood: ``"bernoulli"``, ``"gaussian"``, ``"gaussian_learned"``, ``"gaussian_calibrated"``
            or ``"discretized_logistic"`` (see ``vaelab.losses.recon_nll``; the last makes the decoder
            output 2 parameters per sub-pixel; the two fitted-sigma Gaussians append ``log sigma``).
        recon_sigma: Gaussian standard deviation in pixel units (``sqrt(0.5)``: summed-MSE loss); for
            ``gaussian_learned`` / ``gaussian_calibrated`` its starting value before it is fitted.
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``, the range of inputs and decoder means.
    """

    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (32, 64, 64)
    latent_dim: int = 10
    fc_hidden: int | None = 256
    batch_norm: bool = True
    recon_likelihood: str = "bernoulli"
    recon_sigma: float = 0.5**0.5
    pixel_range: str = "[0,1]"
    model_type: str = field(default="conv_vae", init=False)

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not isinstance(self.latent_dim, int) or isinstance(self.latent_dim, bool) or self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be positive, got {self.in_channels}")
        if self.image_size < 2 ** len(self.channels):
            raise ConfigError(
                f"image_size {self.image_size} is too small for {len(self.channels)} stride-2 convolutions "
                f"(needs at least {2 ** len(self.channels)})"
            )
        if self.fc_hidden is not None and self.fc_hidden < 1:
            raise ConfigError(f"fc_hidden must be positive or null, got {self.fc_hidden}")
        if self.recon_likelihood not in RECON_LIKELIHOODS:
            raise ConfigError(f"unknown recon_likelihood {self.recon_likelihood!r}; valid: {', '.join(RECON_LIKELIHOODS)}")
        if self.pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"pixel_range must be one of {PIXEL_RANGES}, got {self.pixel_range!r}")
        if self.recon_likelihood == "bernoulli" and self.pixel_range != "[0,1]":
            raise ConfigError("recon_likelihood 'bernoulli' needs pixel_range '[0,1]'")
        if self.recon_sigma <= 0:
            raise ConfigError(f"recon_sigma must be positive, got {self.recon_sigma}")

    def spatial_sizes(self) -> list[int]:
        """Feature-map side after each encoder conv, starting with the input: ``[H, H//2, ...]``."""
        sizes = [self.image_size]
        for _ in self.channels:
            sizes.append((sizes[-1] + 2 - 4) // 2 + 1)
        return sizes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d


def _block(conv: nn.Module, out_ch: int, batch_norm: bool) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(out_ch)] if batch_norm else []), nn.ReLU(inplace=True)]


class ConvVAE(nn.Module):
    """Gaussian-latent VAE with a convolutional encoder and decoder.

    Shapes: images ``(B, C, H, W)`` float in ``config.pixel_range``; ``z``, ``mu``, ``logvar``
    ``(B, latent_dim)`` float32.

    Every method takes class labels ``y`` (int64 ``(B,)`` or ``None``) so that all models of the VAE
    family share one signature; this unconditional model ignores them (the conditional VAE uses them).
    """

    family = "vae"  # the key of its model family in ``vaelab.families.FAMILIES``
    conditional = False
    # what a VAE-family model may change beside its loss (see "The zoo's contract" in vaelab.families.vae):
    EXTRA_TERMS: dict[str, str] = {}  # LossOutput.extra names -> what they are (reported as val_/test_ numbers)
    HAS_ELBO = True  # False: no stochastic posterior (loss gives kl = 0; KL and -ELBO are reported as null)
    NOT_APPLICABLE: dict[str, str] = {}  # `vaelab evaluate` metrics this model cannot support -> why
    DEFAULT_SAMPLER = "prior"  # the family sampler used when --sampler is not given
    PRIOR = "N(0, I)"  # the prior p(z), in words

    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        self.config = config
        ch, sizes = config.channels, config.spatial_sizes()
        self.feature_shape = (ch[-1], sizes[-1], sizes[-1])
        flat = ch[-1] * sizes[-1] ** 2

        enc: list[nn.Module] = []
        for c_in, c_out in zip((config.in_channels, *ch[:-1]), ch):
            enc += _block(nn.Conv2d(c_in, c_out, 4, 2, 1), c_out, config.batch_norm)
        enc.append(nn.Flatten())
        head = flat
        if config.fc_hidden:
            enc += [nn.Linear(flat, config.fc_hidden), nn.ReLU(inplace=True)]
            head = config.fc_hidden
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(head, config.latent_dim)
        self.fc_logvar = nn.Linear(head, config.latent_dim)

        fc: list[nn.Module] = []
        if config.fc_hidden:
            fc += [nn.Linear(config.latent_dim, config.fc_hidden), nn.ReLU(inplace=True)]
        fc.append(nn.Linear(config.fc_hidden or config.latent_dim, flat))
        self.decoder_input = nn.Sequential(*fc)
        dec: list[nn.Module] = []
        outs = (*ch[:-1][::-1], config.in_channels * DECODER_PARAMS[config.recon_likelihood])
        for i, (c_in, c_out) in enumerate(zip(ch[::-1], outs)):
            s_in, s_out = sizes[-1 - i], sizes[-2 - i]
            # output_padding recovers odd sizes the encoder floored away (e.g. 7 -> 3 -> 7)
            conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, output_padding=s_out - 2 * s_in)
            dec += [conv] if i == len(ch) - 1 else _block(conv, c_out, config.batch_norm)
        self.decoder = nn.Sequential(*dec)
        self._init_log_sigma()

    def _init_log_sigma(self) -> None:
        """The fitted decoder sigma of the ``SHARED_SIGMA`` likelihoods, starting at ``config.recon_sigma``:
        a parameter ``log_sigma_raw`` (``gaussian_learned``; soft-clipped when read) or a buffer
        ``log_sigma`` (``gaussian_calibrated``; the running closed-form optimum)."""
        start = math.log(self.config.recon_sigma)
        if self.config.recon_likelihood == "gaussian_learned":
            # the inverse of soft_clip_log_sigma, so that the clipped value starts exactly at log(recon_sigma)
            raw = MIN_LOG_SIGMA + math.log(math.expm1(start - MIN_LOG_SIGMA)) if start - MIN_LOG_SIGMA < 30 else start
            self.log_sigma_raw = nn.Parameter(torch.tensor(raw, dtype=torch.float32))
        elif self.config.recon_likelihood == "gaussian_calibrated":
            self.register_buffer("log_sigma", torch.tensor(max(start, MIN_LOG_SIGMA), dtype=torch.float32))

    def decoder_log_sigma(self) -> torch.Tensor | None:
        """The decoder's shared ``log sigma`` (0-d float32 tensor, pixel units) for the fitted-sigma Gaussian
        likelihoods, ``log(recon_sigma)`` for ``gaussian``, else ``None``."""
        lik = self.config.recon_likelihood
        if lik == "gaussian_learned":
            return soft_clip_log_sigma(self.log_sigma_raw)
        if lik == "gaussian_calibrated":
            return self.log_sigma
        if lik == "gaussian":
            return torch.tensor(math.log(self.config.recon_sigma))
        return None

    def _with_log_sigma(self, logits: torch.Tensor) -> torch.Tensor:
        """Append the shared ``log sigma`` as ``C`` constant channels for the ``SHARED_SIGMA`` likelihoods."""
        if self.config.recon_likelihood not in SHARED_SIGMA:
            return logits
        plane = self.decoder_log_sigma().to(logits.dtype).expand(logits.shape)
        return torch.cat([logits, plane], dim=1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one code: ``(latent_dim,)`` (a spatial first stage such as ``KLVAE`` gives ``(C, h, w)``;
        its ``z`` is still passed around flattened to ``latent_dim = C * h * w``). Codes travel flattened to
        ``prod(latent_shape)`` numbers (``encode``'s ``mu``, what ``decode`` takes): ``latent_dim`` for every model
        but the VQ-VAE, whose ``latent_dim`` is the size of one codebook vector of its ``(latent_dim, h, w)`` grid."""
        return (self.config.latent_dim,)

    def decoder_in(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The decoder's input vector for codes ``z`` (``y`` ignored; the conditional VAE appends the label)."""
        return z

    # ------------------------------------------------------------------ model contract

    def encode(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``q(z | x)``: ``(B, C, H, W)`` images -> ``(mu, logvar)``, each ``(B, latent_dim)`` (``y`` ignored)."""
        h = self.encoder(x)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode_logits(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` -> ``(B, C, H, W)`` decoder logits (``(B, 2C, H, W)`` for a discretised
        logistic, and for a fitted-sigma Gaussian: means, then the shared ``log sigma``); ``y`` ignored."""
        h = self.decoder_input(self.decoder_in(z, y)).view(-1, *self.feature_shape)
        return self._with_log_sigma(self.decoder(h))

    def decode(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, latent_dim)`` (and labels ``y`` for a conditional model) -> ``(B, C, H, W)`` pixel
        means in ``config.pixel_range``."""
        return decoder_mean(self.decode_logits(z, y=y), self.config.pixel_range, likelihood=self.config.recon_likelihood)

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """The randomness of ``loss`` for ``n`` images: ``{"eps": (n, latent_dim)}`` standard normals, float32.

        Drawing it for a whole (global) batch and slicing rows lets data-parallel ranks reproduce a
        single-process run exactly (see ``vaelab.training``).
        """
        device = device or next(self.parameters()).device
        return {"eps": torch.randn((n, self.config.latent_dim), device=device, generator=generator)}

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``z = mu + exp(0.5 * logvar) * eps``, ``eps ~ N(0, I)`` (Kingma & Welling 2013, eq. 10)."""
        return mu + (0.5 * logvar).exp() * eps

    def log_prior(self, z: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(z)`` in nats: ``(B, latent_dim)`` -> ``(B,)``; here the standard normal ``N(0, I)`` (``y`` ignored).

        Models with another prior override it (VampPrior); the IWAE likelihood bound
        (``vaelab.metrics.likelihood``) reads the prior through it.
        """
        return log_standard_normal(z.float())

    def sample_prior(self, n: int, *, y: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` codes ``z ~ p(z)``: ``(n, latent_dim)`` float32 on the model's device, drawn on the generator's
        device (the model's without one); here ``N(0, I)`` (``y`` ignored)."""
        device = next(self.parameters()).device
        return torch.randn(n, self.config.latent_dim, device=generator.device if generator is not None else device,
                           generator=generator).to(device)

    def importance_samples(self, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``k`` draws from the posterior per image, for importance sampling (the IWAE bound of ``vaelab evaluate``).

        Returns ``(z, log_ratio)``: ``z`` ``(B, k, latent_dim)``, the decoder's input, and ``log_ratio`` ``(B, k)``
        float32, ``log p(z) - log q(z | x)`` in nats over every latent variable of the model (so that
        ``log p(x | z) + log_ratio`` is the log importance weight, Burda et al. 2016, eq. 8). Here ``q`` is the
        diagonal Gaussian of ``encode`` and ``p`` the model's ``log_prior``; models with another posterior (a
        flow) or more latent variables (a hierarchy) override it. The noise is one ``(B, k, latent_dim)`` draw
        of standard normals from ``generator``.
        """
        mu, logvar = self.encode(x, y=y)
        b, d = mu.shape
        eps = torch.randn((b, k, d), device=x.device, dtype=mu.dtype, generator=generator)
        z = mu[:, None] + (0.5 * logvar).exp()[:, None] * eps  # (B, k, D)
        log_q = (-0.5 * eps.pow(2) - 0.5 * logvar[:, None] - 0.5 * math.log(2 * math.pi)).float().sum(2)
        yk = y.repeat_interleave(k) if y is not None else None
        log_p = self.log_prior(z.reshape(b * k, d), y=yk).reshape(b, k)
        return z, log_p - log_q

    def loss(
        self,
        x: torch.Tensor,
        *,
        beta: float = 1.0,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: dict | None = None,
    ) -> LossOutput:
        """Negative beta-ELBO of a batch with one reparameterised sample of ``z`` (Kingma & Welling 2013,
        eq. 10; Higgins et al. 2017 for ``beta``).

        Steps: 1. encode ``x`` (and ``y``) to ``mu, logvar``; 2. ``z = mu + sigma * eps`` with ``eps``
        from ``noise`` (``draw_noise``) or drawn with ``generator``; 3. decode; 4. recon NLL and
        closed-form KL, both summed per image in float32 (nats); 5. ``loss = mean(recon + beta * kl)``.
        Under autocast the networks may run in bfloat16/float16; the loss arithmetic does not.
        """
        mu, logvar = self.encode(x, y=y)
        eps = (noise or self.draw_noise(len(x), generator, x.device))["eps"]
        z = self.reparameterize(mu, logvar, eps.to(mu.dtype))
        return self.loss_terms(x, self.decode_logits(z, y=y), mu, logvar, beta=beta)

    def forward(self, x: torch.Tensor, **kwargs):
        """``loss(x, **kwargs)``: the call ``DistributedDataParallel`` wraps."""
        return self.loss(x, **kwargs)

    def loss_terms(self, x: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, *,
                   beta: float) -> LossOutput:
        """Steps 4-5 of ``loss`` for decoder ``logits`` of a ``z`` drawn from ``N(mu, exp(logvar))``, in float32.

        A ``gaussian_calibrated`` decoder in training mode uses the batch's own optimal sigma (``sigma^2 =``
        the batch MSE, Rybkin et al. 2021, sec. 3.2; detached, which leaves the decoder's gradient unchanged
        because the NLL is stationary in sigma there) and folds it into its running ``log_sigma``
        (momentum ``SIGMA_MOMENTUM``), which evaluation uses: a fixed sigma, so test numbers are true NLLs.
        Under data parallelism each rank fits its own shard and rank 0's running value is kept.
        """
        mu, logvar = mu.float(), logvar.float()
        recon, mse = self.recon_terms(x, logits)
        kl = kl_normal(mu, logvar).sum(1)
        return LossOutput(loss=(recon + beta * kl).mean(), recon=recon, kl=kl, mse=mse, mu=mu, logvar=logvar)

    def recon_terms(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(recon, mse)``, each ``(B,)`` float32: ``-log p(x | z)`` in nats per image for decoder ``logits``
        of images ``x`` (a calibrated decoder fits sigma here, see ``loss_terms``) and the MSE per pixel of the
        decoder mean."""
        cfg = self.config
        x, logits = x.float(), logits.float()
        if cfg.recon_likelihood == "gaussian_calibrated" and self.training:
            c = x.shape[1]
            mean = decoder_mean(logits, cfg.pixel_range, likelihood=cfg.recon_likelihood)
            log_sigma = optimal_log_sigma(x, mean.detach())
            with torch.no_grad():
                var = (1 - SIGMA_MOMENTUM) * torch.exp(2 * self.log_sigma) + SIGMA_MOMENTUM * torch.exp(2 * log_sigma)
                self.log_sigma.copy_(0.5 * var.log())
            logits = torch.cat([logits[:, :c], log_sigma.expand(logits[:, c:].shape)], dim=1)
        recon, mean = recon_nll(logits, x, cfg.recon_likelihood, sigma=cfg.recon_sigma, pixel_range=cfg.pixel_range)
        return recon, (mean - x).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, *, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder mean at the posterior mean ``z = mu``: ``(B, C, H, W)`` in ``pixel_range``."""
        return self.decode(self.encode(x, y=y)[0], y=y)

    @torch.no_grad()
    def sample(self, n: int, *, y: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images from the prior: ``z ~ p(z)`` (``sample_prior``), return the decoder means ``(n, C, H, W)``
        (``y`` ignored)."""
        return self.decode(self.sample_prior(n, generator=generator))
