"""Latent diffusion (LDM, Rombach et al. 2022) over the latents of a frozen VAE run.

A latent-diffusion model is *first stage + denoiser + scheduler*:

- **First stage**: a trained VAE-family model of another run folder (``config.first_stage``), loaded
  with ``vaelab.run.Run`` and frozen. Its weights belong to that run: they are not parameters of
  this model, not saved with it, and the run is refused (``ConfigError`` naming both hashes) once the
  SHA-256 of its newest ``model.safetensors`` differs from ``config.first_stage_sha256``, the hash
  recorded when this model was first built.
- **Latents**: the posterior means ``mu`` of the first stage, times ``scale_factor`` = 1 / std of
  all train-split ``mu`` entries, computed once before training (``set_scale_factor``) and kept as a
  buffer in the checkpoint: the unit-variance rescaling of Rombach et al. 2022, sec. 4.3.2 / appendix
  G, Stable Diffusion's ``scale_factor``. A vector latent (``latent_shape = (D,)``) is denoised by a
  residual MLP (``MLPDenoiser``); a spatial one (``(C, h, w)``, e.g. ``kl-f4``) by diffusers'
  ``UNet2DModel`` (``LatentUNet``, or the MLP on the flattened map).
- **Schedule and samplers** (diffusers): the LDM's own "linear" schedule (linear in ``sqrt(beta)``:
  diffusers' ``scaled_linear``, 0.0015 -> 0.0195, T = 1,000, as in the paper's released configs),
  epsilon prediction trained with the "simple" MSE (Ho et al. 2020, eq. 14); sampling with the
  ``T``-step ancestral ``DDPMScheduler``, ``DDIMScheduler`` (eta 0, Song et al. 2021) or
  ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, second order, Lu et al. 2022),
  all with "trailing" timesteps, then the first stage's decoder (its pixel means).
- **Class conditioning** (``class_conditional``): a learned class embedding, with the label replaced
  by a null class ``K`` for a ``label_dropout`` share of the training images, so one network gives
  the conditional and the unconditional noise estimate; sampling mixes them as
  ``eps = eps(z, null) + w * (eps(z, y) - eps(z, null))`` (classifier-free guidance, Ho & Salimans
  2022, eq. 6 written with ``w`` = their ``1 + w``: ``w = 1`` is the plain conditional model).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from vaelab.errors import ConfigError, VaelabError
from vaelab.models.ddpm import DenoisingLoss
from vaelab.models.diffusion import SAMPLERS, check_schedule_fields, check_count, check_labels, ema_update, make_scheduler  # noqa: F401 (SAMPLERS: re-exported)

DENOISERS = ("mlp", "unet")
BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclass
class LDMConfig:
    """First stage, denoiser, noise schedule, conditioning and EMA of an ``LDM``.

    Attributes:
        first_stage: the first stage's run folder (a trained, unconditional VAE-family run), stored
            as an absolute path.
        first_stage_sha256: SHA-256 (hex) of the first stage's newest ``model.safetensors`` when this
            model was first built; ``None`` fills it in, a different value refuses the first stage.
        in_channels, image_size: the image shape ``(C, H, H)``; must be the first stage's.
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``; must be the first stage's.
        denoiser: ``"mlp"`` (residual MLP on the flattened latent) or ``"unet"`` (diffusers'
            ``UNet2DModel``; needs a spatial latent ``(C, h, w)``).
        width, depth: the MLP's hidden width and number of residual blocks.
        widths, layers_per_block, norm_num_groups: the UNet's channels per level (self-attention at
            the last level), ResNet blocks per level and GroupNorm groups.
        dropout: dropout inside the residual blocks.
        class_conditional, num_classes: a class embedding for ``K = num_classes`` classes (filled
            from the dataset) plus a null class ``K``.
        label_dropout: share of training images whose label is replaced by the null class
            (classifier-free guidance training; Ho & Salimans 2022 use 0.1-0.2).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the diffusers noise schedule.
        ema_decay: maximum decay of the EMA weights used for sampling.
    """

    first_stage: str = ""
    first_stage_sha256: str | None = None
    in_channels: int = 1
    image_size: int = 28
    pixel_range: str = "[0,1]"
    denoiser: str = "mlp"
    width: int = 512
    depth: int = 4
    widths: tuple[int, ...] = (32, 64)
    layers_per_block: int = 2
    norm_num_groups: int = 8
    dropout: float = 0.0
    class_conditional: bool = False
    num_classes: int | None = None
    label_dropout: float = 0.1
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    ema_decay: float = 0.999
    model_type: str = field(default="ldm", init=False)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.first_stage:
            raise ConfigError("a latent diffusion model needs first_stage: the run folder of a trained VAE "
                              "(--first-stage RUN_DIR)")
        if self.denoiser not in DENOISERS:
            raise ConfigError(f"denoiser must be one of {', '.join(DENOISERS)}, got {self.denoiser!r}")
        for name in ("width", "depth", "layers_per_block", "norm_num_groups", "num_train_timesteps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not self.widths or min(self.widths) < 1 or any(w % self.norm_num_groups for w in self.widths):
            raise ConfigError(f"widths must be positive and divisible by norm_num_groups={self.norm_num_groups}, "
                              f"got {list(self.widths)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.class_conditional and (self.num_classes is None or self.num_classes < 2):
            raise ConfigError(f"class_conditional needs num_classes >= 2 (from the dataset), got {self.num_classes}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ConfigError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        check_schedule_fields(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


# ---------------------------------------------------------------------------- denoisers


class _ResidualBlock(nn.Module):
    """``h + fc2(drop(silu(fc1(silu(norm(h))) + emb_proj(emb))))`` at constant width."""

    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb_proj = nn.Linear(emb_dim, width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc1(F.silu(self.norm(h))) + self.emb_proj(emb)
        return h + self.fc2(self.drop(F.silu(r)))


class MLPDenoiser(nn.Module):
    """Noise prediction for vector latents: ``(B, *latent_shape)`` and timesteps ``t`` (``(B,)`` or a
    scalar) -> ``(B, *latent_shape)``. The timestep enters as a sinusoidal embedding (Vaswani et al.
    2017, as in Ho et al. 2020) through a 2-layer MLP, plus a class embedding when ``num_class_embeds``
    is set; it is added inside every residual block. The output layer starts at zero."""

    def __init__(self, dim: int, width: int, depth: int, dropout: float = 0.0, num_class_embeds: int | None = None):
        super().__init__()
        self.width = width
        emb = 4 * width if width <= 256 else width
        self.time_mlp = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_embedding = nn.Embedding(num_class_embeds, emb) if num_class_embeds else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, emb, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        shape = z.shape
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(len(z))
        emb = self.time_mlp(get_timestep_embedding(t, self.width).to(z.dtype))
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(class_labels)
        h = self.inp(z.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).view(shape)


class LatentUNet(nn.Module):
    """diffusers' ``UNet2DModel`` on ``(B, C, h, w)`` latent maps; a side that the UNet's
    ``len(widths) - 1`` halvings do not divide is zero-padded on the bottom/right and the prediction
    cropped back (7x7 latents of 28x28 images run at 8x8)."""

    def __init__(self, latent_shape: tuple[int, int, int], config: LDMConfig, num_class_embeds: int | None):
        super().__init__()
        c, h, w = latent_shape
        factor = 2 ** (len(config.widths) - 1)
        self.pad = (-w % factor, -h % factor)
        levels = len(config.widths)
        self.unet = UNet2DModel(
            sample_size=(h + self.pad[1], w + self.pad[0]), in_channels=c, out_channels=c,
            block_out_channels=config.widths,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            layers_per_block=config.layers_per_block, norm_num_groups=config.norm_num_groups,
            dropout=config.dropout, num_class_embeds=num_class_embeds,
        )

    def forward(self, z: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        h, w = z.shape[-2:]
        x = F.pad(z, (0, self.pad[0], 0, self.pad[1])) if any(self.pad) else z
        return self.unet(x, t, class_labels=class_labels).sample[..., :h, :w]


# ---------------------------------------------------------------------------- the first stage


def open_first_stage(path: str, sha256: str | None):
    """The newest checkpoint's model of the run folder ``path`` (CPU, eval mode, frozen) and the
    SHA-256 of its ``model.safetensors``.

    Raises:
        ConfigError: ``path`` is not a run folder with a checkpoint, its model is not an unconditional
            VAE-family model, or its weights' hash is not ``sha256`` (when given; both hashes named).
    """
    from vaelab.run import Run  # vaelab.run imports this package

    try:
        run = Run(path)
        ckpt = run.last_checkpoint()
    except VaelabError as exc:
        raise ConfigError(f"first_stage {path}: {exc}") from exc
    digest = run.weights_sha256(ckpt)
    if sha256 is not None and digest != sha256:
        raise ConfigError(
            f"the first stage {path} has changed since this latent diffusion model was trained on it: its weights "
            f"{ckpt / 'model.safetensors'} now have SHA-256 {digest}, the model was trained on SHA-256 {sha256}. "
            "Restore that checkpoint of the first stage, or train a new latent diffusion model on it")
    model = run.load_model(checkpoint=ckpt)
    if getattr(model, "family", None) != "vae" or getattr(model, "conditional", True):
        raise ConfigError(f"first_stage {path} holds a {type(model).__name__}; the first stage must be an "
                          "unconditional VAE run (a class condition belongs to the diffusion model: "
                          "class_conditional: true)")
    return model.requires_grad_(False), digest


# ---------------------------------------------------------------------------- the model


class LDM(nn.Module):
    """Latent diffusion model: epsilon prediction on scaled first-stage latents, EMA weights for sampling.

    Shapes: images ``(B, C, H, W)`` float32 in ``config.pixel_range``; latents ``(B, *latent_shape)``
    float32, unit variance over the train split; labels ``y`` int64 ``(B,)`` in ``[0, num_classes)``.

    Modules: ``denoiser`` (trained) and ``ema_denoiser`` (its EMA); buffers ``scale_factor`` (NaN until
    ``set_scale_factor``) and ``ema_updates``. ``first_stage`` is an attribute, not a submodule: it moves
    with ``.to()`` but is neither trained nor part of ``state_dict``.

    Raises (constructor):
        ConfigError: see ``open_first_stage``; an image shape or pixel range other than the first
            stage's; a UNet denoiser on a vector latent.
    """

    family = "ldm"  # the key of its model family in ``vaelab.families.FAMILIES``

    def __init__(self, config: LDMConfig):
        super().__init__()
        first_stage, digest = open_first_stage(config.first_stage, config.first_stage_sha256)
        config.first_stage_sha256 = digest
        fc = first_stage.config
        ours, theirs = (config.in_channels, config.image_size, config.pixel_range), (fc.in_channels, fc.image_size, fc.pixel_range)
        if ours != theirs:
            raise ConfigError(f"the images ({ours[0]}x{ours[1]}x{ours[1]}, pixels in {ours[2]}) differ from those of the "
                              f"first stage {config.first_stage} ({theirs[0]}x{theirs[1]}x{theirs[1]}, pixels in {theirs[2]}); "
                              "train the latent diffusion model on the first stage's dataset and pixel range")
        self.config = config
        self.conditional = config.class_conditional
        self.__dict__["first_stage"] = first_stage.eval()  # not registered: see the class docstring
        self.latent_shape = tuple(first_stage.latent_shape)
        classes = config.num_classes + 1 if self.conditional else None  # + the null class of guidance
        if config.denoiser == "unet":
            if len(self.latent_shape) != 3:
                raise ConfigError(f"denoiser 'unet' needs a spatial first-stage latent (C, h, w), e.g. --model kl-f4; "
                                  f"{config.first_stage} has a vector latent of {self.latent_shape[0]} (use ldm-mlp)")
            self.denoiser = LatentUNet(self.latent_shape, config, classes)
        else:
            self.denoiser = MLPDenoiser(math.prod(self.latent_shape), config.width, config.depth, config.dropout, classes)
        self.ema_denoiser = copy.deepcopy(self.denoiser).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scale_factor", torch.tensor(float("nan")))
        self._ema: EMAModel | None = None
        self.noise_scheduler = self.make_scheduler("ddpm")
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ema", None))

    def _apply(self, fn, recurse=True):
        self.first_stage._apply(fn)  # device and dtype moves reach the unregistered first stage too
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True):
        super().train(mode)
        self.first_stage.eval()  # frozen: its BatchNorm statistics never change
        return self

    @property
    def num_parameters(self) -> int:
        """Trainable parameters (the denoiser; neither its EMA copy nor the first stage)."""
        return sum(p.numel() for p in self.denoiser.parameters())

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def make_scheduler(self, sampler: str, steps: int | None = None):
        """A fresh scheduler for ``sampler`` (``vaelab.models.diffusion.SAMPLERS``) set to ``steps`` steps; no
        clipping (latents are not bounded). Raises ``ConfigError`` for an unknown sampler or ``steps`` outside ``[1, T]``."""
        cfg = self.config
        return make_scheduler(sampler, steps, num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, clip_sample=False)

    def _labels(self, y: torch.Tensor | None, n: int, device: torch.device, *, sampling: bool) -> torch.Tensor | None:
        return check_labels(self, y, n, device, sampling=sampling)

    # ------------------------------------------------------------------ latents

    @torch.no_grad()
    def first_stage_means(self, x: torch.Tensor) -> torch.Tensor:
        """The first stage's posterior means ``mu`` of images ``x``, ``(B, latent_dim)`` float32, unscaled."""
        return self.first_stage.encode(x)[0].float()

    @torch.no_grad()
    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` -> diffusion latents ``scale_factor * mu``, ``(B, *latent_shape)`` float32."""
        return (self.first_stage_means(x) * self.scale_factor).view(len(x), *self.latent_shape)

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latents ``(B, *latent_shape)`` -> the first stage's pixel means ``(B, C, H, W)``."""
        return self.first_stage.decode((z / self.scale_factor).flatten(1))

    @torch.no_grad()
    def set_scale_factor(self, images: torch.Tensor, *, pixel_range: str, batch_size: int = 500) -> float:
        """``scale_factor = 1 / std`` of every entry of the first stage's ``mu`` over ``images`` (uint8
        ``(N, C, H, W)``, the train split), as Stable Diffusion's ``scale_factor`` (Rombach et al. 2022,
        appendix G); stored in the buffer and returned.

        Raises:
            ConfigError: fewer than 2 images, or all means equal (std 0).
        """
        from vaelab.data import to_pixels

        if len(images) < 2:
            raise ConfigError(f"the latent scale factor needs at least 2 train images, got {len(images)}")
        device = self.scale_factor.device
        mus = [self.first_stage_means(to_pixels(images[i : i + batch_size].to(device), pixel_range))
               for i in range(0, len(images), batch_size)]
        std = torch.cat(mus).double().std().item()
        if not std > 0 or not math.isfinite(std):
            raise ConfigError(f"the first stage's posterior means have std {std} over the train split: no latent to diffuse")
        self.scale_factor.fill_(1.0 / std)
        return 1.0 / std

    # ------------------------------------------------------------------ model contract

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """The randomness of ``loss`` for ``n`` images: timesteps ``t`` int64 ``(n,)`` uniform in ``[0, T)``,
        noise ``eps`` float32 ``(n, *latent_shape)`` and, for a conditional model, ``drop`` bool ``(n,)``
        (label replaced by the null class, probability ``label_dropout``)."""
        device = device or self.ema_updates.device
        t = torch.randint(0, self.config.num_train_timesteps, (n,), device=device, generator=generator)
        eps = torch.randn((n, *self.latent_shape), device=device, generator=generator)
        noise = {"t": t, "eps": eps}
        if self.conditional:
            noise["drop"] = torch.rand(n, device=device, generator=generator) < self.config.label_dropout
        return noise

    def loss(self, x: torch.Tensor, *, beta: float = 1.0, y: torch.Tensor | None = None,
             generator: torch.Generator | None = None, noise: dict | None = None) -> DenoisingLoss:
        """The "simple" loss (Ho et al. 2020, eq. 14) in latent space (Rombach et al. 2022, eq. 2);
        ``beta`` is unused (one signature for all models).

        Steps: 1. ``z_0 = scale_factor * mu(x)`` from the frozen first stage; 2. ``t``, ``eps`` (and the
        label drop) from ``noise`` (``draw_noise``) or drawn with ``generator``; 3. in training mode,
        dropped labels become the null class; 4. ``z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps``;
        5. predict ``eps``; 6. per-image MSE over the latent entries in float32, mean over the batch.

        Raises:
            ConfigError: labels missing for a class-conditional model.
        """
        y = self._labels(y, len(x), x.device, sampling=False)
        noise = noise or self.draw_noise(len(x), generator, x.device)
        z0 = self.encode_latents(x)
        t, eps = noise["t"], noise["eps"].to(z0.dtype)
        if y is not None and self.training:
            y = torch.where(noise["drop"], torch.full_like(y, self.null_class), y)
        z_t = self.noise_scheduler.add_noise(z0, eps, t)
        eps_hat = self.denoiser(z_t, t, class_labels=y)
        eps_mse = (eps_hat.float() - eps.float()).pow(2).flatten(1).mean(1)
        return DenoisingLoss(loss=eps_mse.mean(), eps_mse=eps_mse, t=t)

    def forward(self, x: torch.Tensor, **kwargs):
        """``loss(x, **kwargs)``: the call ``DistributedDataParallel`` wraps."""
        return self.loss(x, **kwargs)

    def update_ema(self) -> None:
        """One EMA update of ``ema_denoiser`` towards ``denoiser``; call after every optimiser step."""
        ema_update(self, self.denoiser, self.ema_denoiser)

    def _guided_eps(self, net: nn.Module, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
                    guidance: float) -> torch.Tensor:
        """``eps(z, y)``, or with ``guidance != 1`` ``eps(z, null) + guidance * (eps(z, y) - eps(z, null))``
        from one batch of ``2B`` (Ho & Salimans 2022)."""
        if y is None or guidance == 1.0:
            return net(z, t, class_labels=y)
        eps_c, eps_u = net(torch.cat([z, z]), t, class_labels=torch.cat([y, torch.full_like(y, self.null_class)])).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def check_guidance(self, guidance: float) -> float:
        """``guidance`` as a float. Raises ``ConfigError``: not a finite number >= 0, or not 1 for an
        unconditional model or one trained without label dropout."""
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise ConfigError(f"guidance must be a finite number >= 0, got {guidance!r}")
        if guidance != 1.0 and not self.conditional:
            raise ConfigError(f"guidance {guidance:g} needs a class-conditional model (class_conditional: true); "
                              "this one is unconditional")
        if guidance != 1.0 and self.config.label_dropout == 0:
            raise ConfigError(f"guidance {guidance:g} needs the unconditional estimate, which a model trained with "
                              "label_dropout 0 never learned; use guidance 1 or train with label_dropout > 0")
        return float(guidance)

    @torch.no_grad()
    def sample_latents(self, n: int, *, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       sampler: str = "dpmsolver++", steps: int | None = None, guidance: float = 1.0,
                       ema: bool = True) -> torch.Tensor:
        """Run the reverse process for ``n`` latents in one batch: ``(n, *latent_shape)`` float32.

        Args:
            y: ``(n,)`` int64 labels for a conditional model (``None``: ``arange(n) % num_classes``).
            generator: for the initial noise and the DDPM sampler's noise.
            sampler, steps: one of ``SAMPLERS`` and its steps (``make_scheduler``).
            guidance: classifier-free guidance scale ``w`` (1: conditional only; a conditional model).
            ema: the EMA weights (default) or the trained ones.

        Raises:
            ConfigError: bad sampler, steps, ``n``, labels or guidance; the scale factor was never set.
        """
        check_count(n)
        guidance = self.check_guidance(guidance)
        scheduler = self.make_scheduler(sampler, steps)
        if not math.isfinite(float(self.scale_factor)):
            raise ConfigError("the latent scale factor was never set (set_scale_factor on the train split)")
        net = self.ema_denoiser if ema else self.denoiser
        device = self.ema_updates.device
        y = self._labels(y, n, device, sampling=True)
        z = torch.randn((n, *self.latent_shape), device=device, generator=generator) * scheduler.init_noise_sigma
        for t in tqdm(scheduler.timesteps, desc=f"{sampler} sampling ({n} latents)", unit="step", leave=False):
            eps = self._guided_eps(net, scheduler.scale_model_input(z, t), t.to(device), y, guidance)
            z = scheduler.step(eps, t, z, generator=generator).prev_sample
        return z

    @torch.no_grad()
    def sample(self, n: int, *, y: torch.Tensor | None = None, generator: torch.Generator | None = None,
               sampler: str = "dpmsolver++", steps: int | None = None, guidance: float = 1.0,
               batch_size: int = 500) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` float32 in ``config.pixel_range``: ``sample_latents`` on
        ``batch_size`` at a time, decoded by the first stage. Raises ``ConfigError`` as ``sample_latents``,
        before any work."""
        check_count(n)
        self.check_guidance(guidance)
        self.make_scheduler(sampler, steps)  # validate before any work
        y = self._labels(y, n, self.ema_updates.device, sampling=True)
        chunks = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            z = self.sample_latents(m, y=None if y is None else y[start : start + m], generator=generator,
                                    sampler=sampler, steps=steps, guidance=guidance)
            chunks.append(self.decode_latents(z))
        return torch.cat(chunks)


def first_stage_path(path: str | Path) -> str:
    """``path`` as stored in a config: absolute, so the run reads the same first stage from any folder."""
    return str(Path(path).expanduser().resolve())
