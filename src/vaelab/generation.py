"""Drawing images from trained models."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.errors import ConfigError
from vaelab.plots import save_grid
from vaelab.training import load_run_model, select_device


def sample_run(
    run_dir: str | Path,
    n: int,
    out: str | Path,
    *,
    seed: int = 0,
    device: str = "auto",
    nrow: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
) -> Path:
    """Draw ``n`` prior samples from the newest checkpoint of ``run_dir`` into a PNG grid at ``out``.

    ``sampler`` (``"ddpm"`` | ``"ddim"``) and ``steps`` apply to diffusion runs only (see
    ``vaelab.models.ddpm.DDPM.sample``).

    Raises:
        ConfigError: ``n`` is not positive, sampler options on a VAE run, or a bad sampler/steps
            for a diffusion run (checked before sampling). VaelabError: ``run_dir`` has no checkpoint.
    """
    if n <= 0:
        raise ConfigError(f"--n must be a positive integer, got {n}")
    dev = select_device(device)
    model = load_run_model(run_dir, device=dev)
    options = sampler_options(model, run_dir, sampler=sampler, steps=steps)
    images = model.sample(n, generator=torch.Generator(device=dev).manual_seed(seed), **options)
    save_grid(images, out, nrow=nrow or max(1, round(n**0.5)), pixel_range=model.config.pixel_range)
    return Path(out)


def sampler_options(model, run_dir: str | Path, *, sampler: str | None, steps: int | None) -> dict:
    """``sample`` keyword arguments for ``sampler`` / ``steps`` (diffusion runs only), validated.

    Raises:
        ConfigError: a sampler option for a model that is not a diffusion model, an unknown sampler,
            or steps outside ``[1, T]``.
    """
    options = {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
    if options and model.kind != "ddpm":
        raise ConfigError(f"--{' and --'.join(options)} apply to diffusion runs only; {run_dir} holds a {model.kind.upper()}")
    if model.kind == "ddpm":
        model.make_scheduler(options.get("sampler", "ddpm"), steps)  # bad steps fail here, before any sampling
    return options


def run_sampler_options(run_dir: str | Path, *, sampler: str | None, steps: int | None) -> dict | None:
    """``sampler_options`` for the newest checkpoint of ``run_dir``; ``None`` when no option is given."""
    if sampler is None and steps is None:
        return None
    return sampler_options(load_run_model(run_dir), run_dir, sampler=sampler, steps=steps)
