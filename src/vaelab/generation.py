"""Drawing images from trained models."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.config import load_config
from vaelab.data import load_split
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
    class_label: int | str | None = None,
    sampler: str | None = None,
    steps: int | None = None,
) -> Path:
    """Draw ``n`` prior samples from the newest checkpoint of ``run_dir`` into a PNG grid at ``out``.

    Args:
        class_label: conditional models only: draw every image of this class (an index, or a class
            name of the run's dataset). A conditional model without it draws the classes in turn.
        sampler, steps: ``"ddpm"`` | ``"ddim"`` and the number of denoising steps, diffusion runs
            only (see ``vaelab.models.ddpm.DDPM.sample``).

    Raises:
        ConfigError: ``n`` is not positive; ``class_label`` for an unconditional model or naming no
            class; sampler options on a VAE run, or a bad sampler/steps for a diffusion run (checked
            before sampling). VaelabError: ``run_dir`` has no checkpoint.
    """
    if n <= 0:
        raise ConfigError(f"--n must be a positive integer, got {n}")
    dev = select_device(device)
    model = load_run_model(run_dir, device=dev)
    options = sampler_options(model, run_dir, sampler=sampler, steps=steps)
    y = None
    if class_label is not None:
        if not model.conditional:
            raise ConfigError(f"--class needs a conditional model (e.g. --model cvae-mnist); {run_dir} holds an unconditional one")
        y = torch.full((n,), class_index(run_dir, class_label, model.config.num_classes), dtype=torch.int64, device=dev)
    images = model.sample(n, y=y, generator=torch.Generator(device=dev).manual_seed(seed), **options)
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


def class_index(run_dir: str | Path, class_label: int | str, num_classes: int) -> int:
    """The label index of ``class_label``: an integer in ``0..num_classes-1`` or a class name of the run's dataset.

    Raises:
        ConfigError: out of range or an unknown name (the message lists the valid names).
    """
    text = str(class_label)
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < num_classes:
            raise ConfigError(f"--class {index} is out of range; the model has classes 0..{num_classes - 1}")
        return index
    config = load_config(Path(run_dir) / "config.yaml")
    classes = load_split(config.dataset, "train", config.data_root).classes
    if text not in classes:
        raise ConfigError(f"--class {text!r} is not a class of {config.dataset}; valid: {', '.join(map(repr, classes))} "
                          f"or an index 0..{num_classes - 1}")
    return classes.index(text)
