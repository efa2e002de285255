"""Denoising diffusion baseline (DDPM, Ho et al. 2020) on diffusers' ``UNet2DModel`` and schedulers.

Training: epsilon-prediction with the "simple" MSE loss (Ho et al. 2020, eq. 14) under the linear
schedule ``beta_1 = 1e-4 -> beta_T = 0.02`` of ``DDPMScheduler`` (T = 1,000 steps), and an
exponential moving average (EMA) of the weights kept by diffusers' ``EMAModel``.

Sampling: the full ``T``-step ancestral sampler (``DDPMScheduler``, Ho et al. 2020, algorithm 2)
or DDIM (``DDIMScheduler``, Song et al. 2021, eta = 0, deterministic) or DPM-Solver++
(``DPMSolverMultistepScheduler``, Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", second-order multistep, deterministic) with ``steps`` network
evaluations. Both use "trailing" timesteps (Lin et al. 2024, table 2), so a chain shorter than
``T`` still starts at ``t = T - 1`` from pure noise; the full DDPM chain is ``T - 1, ..., 0``.

The UNet works on pixels in ``[-1, 1]``; images go in and come out in ``config.pixel_range``.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from vaelab.data.pixels import from_symmetric, to_symmetric
from vaelab.errors import ConfigError
from vaelab.models.diffusion import check_schedule_fields, ema_update, SAMPLERS, check_count, check_labels, make_scheduler  # noqa: F401 (SAMPLERS: re-exported)


@dataclass
class DDPMConfig:
    """Architecture, noise schedule and EMA of a ``DDPM``.

    Attributes:
        in_channels: image channels ``C`` (1 gray, 3 RGB).
        image_size: square image side ``H = W`` in pixels; must be divisible by
            ``2 ** (len(widths) - 1)`` (one stride-2 downsampling between resolution levels).
        widths: UNet channels per resolution level (diffusers' ``block_out_channels``); self-attention
            sits at the last (lowest-resolution) level and in the middle block.
        layers_per_block: ResNet blocks per level on the way down (up: one more, as in diffusers).
        norm_num_groups: GroupNorm groups; every width must be divisible by it.
        attention_head_dim: channels per attention head; ``None`` for one head over all channels.
        dropout: dropout in the ResNet blocks.
        class_conditional: add a learned class embedding to the time embedding (diffusers'
            ``num_class_embeds``), so ``loss`` and ``sample`` take labels ``y``.
        num_classes: number of classes ``K`` (filled from the dataset); needed when conditional.
        num_train_timesteps: ``T``, diffusion steps of training and of the full DDPM sampler.
        beta_start, beta_end: the linear variance schedule ``beta_1 -> beta_T``.
        ema_decay: the EMA's maximum decay; diffusers' ``EMAModel`` warms it up as
            ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates.
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``, the range of images given to ``loss`` and
            returned by ``sample``.
    """

    in_channels: int = 1
    image_size: int = 28
    widths: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 2
    norm_num_groups: int = 8
    attention_head_dim: int | None = None
    dropout: float = 0.0
    class_conditional: bool = False
    num_classes: int | None = None
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    ema_decay: float = 0.999
    pixel_range: str = "[0,1]"
    model_type: str = field(default="ddpm", init=False)

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or min(self.widths) < 1:
            raise ConfigError(f"widths must be a non-empty list of positive channel counts, got {list(self.widths)}")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be positive, got {self.in_channels}")
        factor = 2 ** (len(self.widths) - 1)
        if self.image_size < 1 or self.image_size % factor:
            raise ConfigError(
                f"image_size {self.image_size} must be divisible by {factor} for {len(self.widths)} UNet levels "
                f"(widths {list(self.widths)}); use fewer widths"
            )
        if self.layers_per_block < 1:
            raise ConfigError(f"layers_per_block must be positive, got {self.layers_per_block}")
        if self.norm_num_groups < 1 or any(w % self.norm_num_groups for w in self.widths):
            raise ConfigError(f"every width in {list(self.widths)} must be divisible by norm_num_groups={self.norm_num_groups}")
        if self.attention_head_dim is not None and (self.attention_head_dim < 1 or self.widths[-1] % self.attention_head_dim):
            raise ConfigError(f"attention_head_dim {self.attention_head_dim} must divide the last width {self.widths[-1]}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.class_conditional and (self.num_classes is None or self.num_classes < 2):
            raise ConfigError(f"class_conditional needs num_classes >= 2 (from the dataset), got {self.num_classes}")
        if self.num_train_timesteps < 1:
            raise ConfigError(f"num_train_timesteps must be positive, got {self.num_train_timesteps}")
        check_schedule_fields(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


@dataclass
class DenoisingLoss:
    """Per-batch DDPM loss.

    Attributes:
        loss: scalar, mean over the batch of ``eps_mse``; backprop this.
        eps_mse: ``(B,)`` per-image ``mean over pixels of (eps_hat - eps)^2`` (unit-variance noise units).
        t: ``(B,)`` int64 timesteps drawn for the batch, in ``[0, T)``.
    """

    loss: torch.Tensor
    eps_mse: torch.Tensor
    t: torch.Tensor


class DeviceAttnProcessor:
    """diffusers' attention, by device: the classic ``AttnProcessor`` (baddbmm + softmax) on a CPU,
    ``AttnProcessor2_0`` (``scaled_dot_product_attention``) elsewhere. Same arithmetic; on this project's
    CPU the fused SDPA kernel under bf16 autocast took 11 % of a ``ddpm-28`` training step and the classic
    one made the step ~14 % faster (``benchmarks/profile_step.py``, docs/speed.md)."""

    def __init__(self):
        self.cpu, self.accelerator = AttnProcessor(), AttnProcessor2_0()

    # the same named arguments as diffusers' processors: Attention.forward warns, on every call, about any
    # keyword (the UNet's ``temb``) that the processor's signature does not name
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        proc = self.cpu if hidden_states.device.type == "cpu" else self.accelerator
        return proc(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def use_device_attention(unet: nn.Module) -> nn.Module:
    """Give every diffusers ``Attention`` layer of ``unet`` a ``DeviceAttnProcessor``; returns ``unet``."""
    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(DeviceAttnProcessor())
    return unet


def _unet(config: DDPMConfig) -> UNet2DModel:
    levels = len(config.widths)
    return use_device_attention(UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        block_out_channels=config.widths,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
        attention_head_dim=config.attention_head_dim,
        dropout=config.dropout,
        num_class_embeds=config.num_classes if config.class_conditional else None,
    ))


class DDPM(nn.Module):
    """Epsilon-prediction diffusion model with EMA weights.

    Shapes: images ``(B, C, H, W)`` float32 in ``config.pixel_range``; labels ``y`` int64 ``(B,)``
    in ``[0, num_classes)`` for a class-conditional model.

    Modules: ``unet`` (trained) and ``ema_unet`` (its EMA, frozen, used for sampling); both are in
    ``state_dict`` so ``save_model`` stores the EMA weights too.
    """

    family = "ddpm"  # the key of its model family in ``vaelab.families.FAMILIES``

    def __init__(self, config: DDPMConfig):
        super().__init__()
        self.config = config
        self.conditional = config.class_conditional
        self.unet = _unet(config)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))
        self._ema: EMAModel | None = None
        self.noise_scheduler = self.make_scheduler("ddpm")
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_ema", None))

    @property
    def num_parameters(self) -> int:
        """Trainable parameters (the UNet; the EMA copy is not counted)."""
        return sum(p.numel() for p in self.unet.parameters())

    def make_scheduler(self, sampler: str, steps: int | None = None):
        """A fresh scheduler for ``sampler`` (``vaelab.models.diffusion.SAMPLERS``) set to ``steps`` steps,
        predicted ``x_0`` clipped to [-1, 1]. Raises ``ConfigError`` for an unknown sampler or ``steps``
        outside ``[1, T]``."""
        cfg = self.config
        return make_scheduler(sampler, steps, num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, clip_sample=True)

    def _labels(self, y: torch.Tensor | None, n: int, device: torch.device, *, sampling: bool) -> torch.Tensor | None:
        return check_labels(self, y, n, device, sampling=sampling)

    # ------------------------------------------------------------------ model contract

    def draw_noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None) -> dict:
        """The randomness of ``loss`` for ``n`` images: timesteps ``t`` int64 ``(n,)`` uniform in ``[0, T)``
        and noise ``eps`` float32 ``(n, C, H, W)`` (drawn for a global batch and sliced per rank in
        data-parallel training, so ranks reproduce a single-process run)."""
        device = device or self.ema_updates.device
        cfg = self.config
        t = torch.randint(0, cfg.num_train_timesteps, (n,), device=device, generator=generator)
        eps = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), device=device, generator=generator)
        return {"t": t, "eps": eps}

    def loss(
        self,
        x: torch.Tensor,
        *,
        beta: float = 1.0,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: dict | None = None,
    ) -> DenoisingLoss:
        """The "simple" DDPM loss (Ho et al. 2020, eq. 14) of a batch; ``beta`` is unused (one signature for all models).

        Steps: 1. map ``x`` to ``[-1, 1]``; 2. ``t ~ U{0..T-1}`` and ``eps ~ N(0, I)`` from ``noise``
        (``draw_noise``) or drawn with ``generator``; 3. ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``
        (``DDPMScheduler.add_noise``); 4. predict ``eps`` with the UNet; 5. per-image MSE in float32,
        mean over the batch.

        Raises:
            ConfigError: labels missing for a class-conditional model.
        """
        x0 = to_symmetric(x, self.config.pixel_range)
        y = self._labels(y, len(x), x.device, sampling=False)
        noise = noise or self.draw_noise(len(x), generator, x.device)
        t, eps = noise["t"], noise["eps"].to(x0.dtype)
        x_t = self.noise_scheduler.add_noise(x0, eps, t)
        eps_hat = self.unet(x_t, t, class_labels=y).sample
        eps_mse = (eps_hat.float() - eps.float()).pow(2).flatten(1).mean(1)
        return DenoisingLoss(loss=eps_mse.mean(), eps_mse=eps_mse, t=t)

    def forward(self, x: torch.Tensor, **kwargs):
        """``loss(x, **kwargs)``: the call ``DistributedDataParallel`` wraps."""
        return self.loss(x, **kwargs)

    def update_ema(self) -> None:
        """One EMA update of ``ema_unet`` towards ``unet``; call after every optimiser step."""
        ema_update(self, self.unet, self.ema_unet)

    @torch.no_grad()
    def denoise(
        self,
        n: int,
        *,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        ema: bool = True,
        snapshots: int = 0,
    ) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
        """Run the reverse process for ``n`` images in one batch.

        Args:
            n: images to draw.
            y: ``(n,)`` int64 labels for a conditional model (``None``: ``arange(n) % num_classes``).
            generator: for the initial noise and the DDPM sampler's noise.
            sampler: ``"ddpm"`` (ancestral, ``steps`` default ``T``), ``"ddim"`` (eta 0, default 50) or
                ``"dpmsolver++"`` (DPM-Solver++ 2M, default 20) or ``"sde-dpmsolver++"`` (its SDE form, default 50).
            steps: network evaluations, in ``[1, T]``.
            ema: use the EMA weights (default) or the trained ones.
            snapshots: keep about this many intermediate states, evenly spaced over the steps.

        Returns:
            ``(images, states)``: ``(n, C, H, W)`` in ``pixel_range``, and a list of
            ``(t, x_t, x0_hat)`` with ``x_t`` the state entering step ``t`` and ``x0_hat`` the
            model's estimate of the clean image at that step, both in ``pixel_range``.

        Raises:
            ConfigError: bad sampler, steps, ``n`` or labels.
        """
        check_count(n)
        scheduler = self.make_scheduler(sampler, steps)
        net = self.ema_unet if ema else self.unet
        device = self.ema_updates.device
        y = self._labels(y, n, device, sampling=True)
        cfg, pr = self.config, self.config.pixel_range
        x = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), device=device, generator=generator)
        timesteps = scheduler.timesteps
        keep = set(torch.linspace(0, len(timesteps) - 1, snapshots).round().long().tolist()) if snapshots else set()
        states = []
        for i, t in enumerate(tqdm(timesteps, desc=f"{sampler} sampling ({n} images)", unit="step", leave=False)):
            eps_hat = net(x, t.to(device), class_labels=y).sample
            out = scheduler.step(eps_hat, t, x, generator=generator)
            if i in keep:
                x0_hat = getattr(out, "pred_original_sample", None)
                if x0_hat is None:  # DPM-Solver's output has none: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
                    abar = self.noise_scheduler.alphas_cumprod[int(t)].to(device)
                    x0_hat = ((x - (1 - abar).sqrt() * eps_hat) / abar.sqrt()).clamp(-1, 1)
                states.append((int(t), from_symmetric(x, pr), from_symmetric(x0_hat, pr)))
            x = out.prev_sample
        return from_symmetric(x, pr), states

    @torch.no_grad()
    def sample(
        self,
        n: int,
        *,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        batch_size: int = 500,
    ) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` float32 in ``config.pixel_range`` from the EMA weights.

        Runs ``denoise`` (same ``y``, ``generator``, ``sampler``, ``steps``; ``steps`` UNet
        evaluations per batch) on ``batch_size`` images at a time, which bounds memory.
        Raises ``ConfigError`` for a bad sampler, steps, ``n`` or labels, before any work.
        """
        check_count(n)
        self.make_scheduler(sampler, steps)  # validate before any work
        device = self.ema_updates.device
        y = self._labels(y, n, device, sampling=True)
        chunks = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            y_b = None if y is None else y[start : start + m]
            chunks.append(self.denoise(m, y=y_b, generator=generator, sampler=sampler, steps=steps)[0])
        return torch.cat(chunks)
