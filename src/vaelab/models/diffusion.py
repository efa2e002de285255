"""What the pixel DDPM and latent diffusion share: diffusers' noise schedulers for sampling, and
checks of sample counts and class labels.

Samplers (all on "trailing" timesteps, Lin et al. 2024 table 2, so a chain shorter than ``T`` starts
at ``t = T - 1`` from pure noise):

- ``ddpm``: ``DDPMScheduler``, ancestral sampling (Ho et al. 2020, algorithm 2; sigma_t^2 = beta~_t), ``T`` steps;
- ``ddim``: ``DDIMScheduler`` with eta = 0 (Song et al. 2021), deterministic, 50 steps by default;
- ``dpmsolver++``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)``
  (DPM-Solver++(2M), Lu et al. 2022), deterministic, 20 steps by default;
- ``sde-dpmsolver++``: the same scheduler with ``algorithm_type="sde-dpmsolver++"`` (DPM-Solver++(2M) SDE,
  Lu et al. 2022 section 5, the second-order solver diffusers recommends for the reverse SDE), stochastic:
  fresh noise at every step like the ancestral chain, 50 steps by default.
"""

from __future__ import annotations

import warnings

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.training_utils import EMAModel
from torch import nn

from vaelab.data.pixels import PIXEL_RANGES
from vaelab.errors import ConfigError

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++",  # as the papers write them
                 "sde-dpmsolver++": "SDE-DPM-Solver++"}
DEFAULT_STEPS = {"ddim": 50, "dpmsolver++": 20, "sde-dpmsolver++": 50}  # ddpm: T
# how each sampler goes from noise to a sample (the comparison's "latent space" column)
SAMPLER_HOW = {"ddpm": "fresh noise at every step (stochastic)",
               "ddim": "DDIM (eta 0) maps the noise to the sample deterministically",
               "dpmsolver++": "DPM-Solver++ (2nd-order multistep ODE solver) maps the noise to the sample deterministically",
               "sde-dpmsolver++": "SDE-DPM-Solver++ (2nd-order multistep SDE solver): fresh noise at every step (stochastic)"}


def default_steps(sampler: str, num_train_timesteps: int) -> int:
    """Steps of ``sampler`` when none are given: ``T`` for ``ddpm``, ``DEFAULT_STEPS`` otherwise."""
    return num_train_timesteps if sampler == "ddpm" else DEFAULT_STEPS[sampler]


def make_scheduler(sampler: str, steps: int | None, *, num_train_timesteps: int, beta_start: float, beta_end: float,
                   beta_schedule: str = "linear", clip_sample: bool):
    """A fresh diffusers scheduler for ``sampler`` set to ``steps`` denoising steps (default ``default_steps``).

    ``clip_sample`` clips the predicted ``x_0`` to [-1, 1] at every step (pixels; latents are not bounded),
    for DPM-Solver++ through diffusers' dynamic thresholding with ``sample_max_value=1``, which reduces to
    that clip (Saharia et al. 2022's percentile ``s`` clamped to [1, 1]).

    Raises:
        ConfigError: unknown sampler, or ``steps`` not an integer in ``[1, T]``.
    """
    T = num_train_timesteps
    schedule = dict(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end, beta_schedule=beta_schedule,
                    timestep_spacing="trailing")
    if sampler == "ddpm":
        scheduler = DDPMScheduler(**schedule, variance_type="fixed_small", clip_sample=clip_sample)
    elif sampler == "ddim":
        scheduler = DDIMScheduler(**schedule, clip_sample=clip_sample, set_alpha_to_one=True)
    elif sampler in ("dpmsolver++", "sde-dpmsolver++"):
        scheduler = DPMSolverMultistepScheduler(**schedule, algorithm_type=sampler, solver_order=2,
                                                thresholding=clip_sample, sample_max_value=1.0)
    else:
        raise ConfigError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    steps = default_steps(sampler, T) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ConfigError(f"{sampler} steps must be an integer in [1, {T}] (the model was trained with T={T}), got {steps!r}")
    with warnings.catch_warnings():  # DPM-Solver's np.array(tensor) call in diffusers warns under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        scheduler.set_timesteps(steps)
    return scheduler


def check_count(n) -> None:
    """Raises ``ConfigError`` unless ``n`` is a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n must be a positive integer, got {n!r}")


def check_labels(model, y: torch.Tensor | None, n: int, device: torch.device, *, sampling: bool) -> torch.Tensor | None:
    """The labels a diffusion model conditions on: ``None`` for an unconditional model (labels ignored),
    ``arange(n) % num_classes`` when sampling without labels, else ``y`` checked and on ``device``.

    Raises:
        ConfigError: labels missing in training, or not int64 ``(n,)`` in ``0..num_classes-1``.
    """
    if not model.conditional:
        return None  # an unconditional model ignores labels (one signature for every model)
    if y is None:
        if not sampling:
            raise ConfigError(f"this {type(model).__name__} is class-conditional: loss() needs labels y")
        return torch.arange(n, device=device) % model.config.num_classes
    if y.shape != (n,) or y.dtype != torch.int64:
        raise ConfigError(f"y must be int64 of shape ({n},), got {tuple(y.shape)} {y.dtype}")
    k = model.config.num_classes
    if n and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ConfigError(f"class labels must lie in 0..{k - 1}, got {int(y.min())}..{int(y.max())}")
    return y.to(device)


@torch.no_grad()
def ema_update(model: nn.Module, trained: nn.Module, ema: nn.Module) -> None:
    """One step of diffusers' ``EMAModel`` (decay ``model.config.ema_decay``) moving ``ema``'s weights
    towards ``trained``'s, counted in the buffer ``model.ema_updates``.

    ``EMAModel`` keeps its own copies; they are pointed at ``ema``'s parameters so the average lives in
    the model's state dict (saved with it), and its step count is restored from ``ema_updates`` after a
    load (one host sync per load). ``model._ema`` holds the ``EMAModel`` (``None`` until the first step).
    """
    if model._ema is None:
        model._ema = EMAModel(ema.parameters(), decay=model.config.ema_decay, foreach=True)
        model._ema.optimization_step = int(model.ema_updates)
    model._ema.shadow_params = list(ema.parameters())
    model._ema.step(trained.parameters())
    model.ema_updates += 1


def check_schedule_fields(config) -> None:
    """Checks the fields every diffusion config shares: ``beta_start``, ``beta_end``, ``ema_decay``, ``pixel_range``.

    Raises:
        ConfigError: not ``0 < beta_start < beta_end < 1``, ``ema_decay`` outside ``[0, 1)``, an unknown pixel range.
    """
    if not 0.0 < config.beta_start < config.beta_end < 1.0:
        raise ConfigError(f"need 0 < beta_start < beta_end < 1, got {config.beta_start} and {config.beta_end}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.pixel_range not in PIXEL_RANGES:
        raise ConfigError(f"pixel_range must be one of {PIXEL_RANGES}, got {config.pixel_range!r}")
