"""Drawing images from trained models: PNG grids (``vaelab sample``) and uint8 sample sets for metrics.

How a model draws images (sampler, steps, class labels) comes from its family's ``Sampler``
(``vaelab.families``); this module only batches, seeds and quantises.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaelab.data import to_pixels, to_uint8
from vaelab.errors import ConfigError
from vaelab.families import Sampler, family_of
from vaelab.plots import sample_rows, save_grid
from vaelab.run import Run
from vaelab.runtime import Distributed, derive_seed, select_device


@torch.no_grad()
def generate(model, sampler: Sampler, n: int, *, batch_size: int = 500, seed: int = 0,
             desc: str = "generating", dist: Distributed | None = None,
             labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples as ``uint8`` ``(n, C, H, W)`` on CPU (quantised like real 8-bit images) and, for a
    conditional model, their class labels ``(n,)`` int64 (balanced: ``i % num_classes``), else ``None``.

    One ``torch.Generator`` on the model's device seeded with ``seed`` drives every batch, so a
    seed gives the same samples for any ``batch_size`` only when ``batch_size >= n``. Under ``torchrun``
    (``dist`` active) each rank draws its block of the ``n`` with its own seed
    (``derive_seed(seed, "rank", rank)``) and every rank returns the gathered whole. ``labels`` (int64
    ``(n,)``, conditional models) replaces the balanced labels, e.g. one class for all.
    """
    dist = dist or Distributed()
    device = next(model.parameters()).device
    start, stop = dist.block(n)
    gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "rank", dist.rank) if dist.active else seed)
    labels = family_of(model).sample_labels(model, n) if labels is None else labels
    out = []
    for first in tqdm(range(start, stop, batch_size), desc=desc, unit="batch", leave=False, disable=not dist.main):
        m = min(batch_size, stop - first)
        y = None if labels is None else labels[first : first + m].to(device)
        out.append(to_uint8(sampler.draw(m, gen, y).float(), model.config.pixel_range).cpu())
    c, s = model.config.in_channels, model.config.image_size
    mine = torch.cat(out) if out else torch.zeros((0, c, s, s), dtype=torch.uint8)
    return dist.gather_rows(mine, n), labels


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
    """Draw ``n`` samples from the newest checkpoint of ``run_dir`` into a PNG grid at ``out``.

    Args:
        class_label: conditional models only: draw every image of this class (an index, or a class
            name of the run's dataset). A conditional model without it draws the classes in turn.
        sampler, steps: the model family's sampler and its steps (e.g. ``ddim`` and 50 for a
            diffusion run; see ``vaelab.families``).

    Raises:
        ConfigError: ``n`` is not positive; ``class_label`` for an unconditional model or naming no
            class; a sampler or steps the model's family does not have (checked before sampling).
        VaelabError: ``run_dir`` is not a run folder with a checkpoint.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"--n must be a positive integer, got {n!r}")
    run = Run(run_dir)
    dev = select_device(device)
    model = run.load_model(dev)
    family = family_of(model)
    draw = family.sampler(model, run, sampler=sampler, steps=steps)
    y = None
    if class_label is not None:
        index = class_index(run, class_label)
        y = family.class_labels(model, index, n).to(dev)
    images, _ = generate(model, draw, n, seed=seed, labels=y)
    save_grid(to_pixels(images, model.config.pixel_range), out, nrow=nrow or max(1, round(n**0.5)),
              pixel_range=model.config.pixel_range)
    return Path(out)


def sample_runs(run_dirs: list[str | Path], n: int, out: str | Path, *, seed: int = 0, device: str = "auto",
                sampler: str | None = None, steps: int | None = None) -> list[dict]:
    """Several trained runs side by side: one labelled row of ``n`` samples per run (each drawn with its
    family's sampler, default or ``sampler``/``steps``, from the same ``seed``) in one PNG at ``out``.

    Returns:
        One dict per run: ``run``, ``label`` (folder name and sampler), ``sampler`` (its options) and
        ``seconds`` (drawing the row, one batch, on ``device``).

    Raises:
        ConfigError: ``n`` is not positive or no run is given; a sampler or steps one of the runs' families
            does not have. VaelabError: a folder is not a run with a checkpoint. All raised before sampling.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"--n must be a positive integer, got {n!r}")
    if not run_dirs:
        raise ConfigError("sample needs at least one --run")
    dev = select_device(device)
    runs = [Run(r) for r in run_dirs]
    models = [run.load_model(dev) for run in runs]
    draws = [family_of(model).sampler(model, run, sampler=sampler, steps=steps) for run, model in zip(runs, models)]
    rows, entries = [], []
    for run, model, draw in zip(runs, models, draws):
        start = time.perf_counter()
        images, _ = generate(model, draw, n, seed=seed, batch_size=n, desc=f"sampling {run.path.name}")
        label = f"{run.path.name}\n{draw.label}"
        rows.append((label, images))
        entries.append({"run": str(run.path), "label": label.replace("\n", ", "), "sampler": draw.options,
                        "seconds": time.perf_counter() - start})
    sample_rows(rows, out)
    return entries


def class_index(run: Run, class_label: int | str) -> int:
    """The label index of ``class_label``: an integer, or a class name of the run's dataset.

    Raises:
        ConfigError: an unknown name (the message lists the valid names).
    """
    text = str(class_label)
    if text.lstrip("-").isdigit():
        return int(text)
    classes = run.data().test.classes
    if text not in classes:
        raise ConfigError(f"--class {text!r} is not a class of {run.config.dataset}; valid: "
                          f"{', '.join(map(repr, classes))} or an index 0..{len(classes) - 1}")
    return classes.index(text)
