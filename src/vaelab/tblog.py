"""TensorBoard logging of a training run, into ``RUN_DIR/tb/`` (view with ``tensorboard --logdir RUN_DIR/tb``).

Each epoch: every number of the ``metrics.jsonl`` row as a scalar (``train_recon`` -> ``recon/train``,
``val_kl`` -> ``kl/val``, ``beta`` -> ``schedule/beta``, ``lr`` -> ``schedule/lr``, ...) and two image
grids: reconstructions of 8 fixed validation images (top row: inputs, bottom row: decoder means at
``z = mu``) and decoder means of 16 fixed prior draws ``z ~ N(0, I)``. The step is the epoch number.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from vaelab.data import ImageSplit, to_pixels

SCHEDULE_KEYS = ("beta", "lr")
NUM_RECON, NUM_SAMPLES = 8, 16


def open_writer(run_dir: str | Path, *, enabled: bool, purge_step: int | None = None):
    """A ``SummaryWriter`` on ``run_dir/tb``, or ``None`` when ``enabled`` is false.

    ``purge_step``: on resume, the first epoch to be written again; events of that epoch or later
    left by an interrupted run are discarded so curves do not fold back.
    """
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge_step)


def scalar_tag(key: str) -> str:
    """TensorBoard tag of a metrics-row key: ``val_kl`` -> ``kl/val``, ``lr`` -> ``schedule/lr``."""
    prefix, _, rest = key.partition("_")
    if prefix in ("train", "val", "test") and rest:
        return f"{rest}/{prefix}"
    if key in SCHEDULE_KEYS:
        return f"schedule/{key}"
    return f"run/{key}"


@torch.no_grad()
def log_epoch(writer, row: dict, model, val: ImageSplit, *, seed: int = 0) -> None:
    """Write one epoch's scalars and image grids (nothing when ``writer`` is ``None``).

    Args:
        row: the epoch's metrics row (``epoch`` is the step; every other int/float is a scalar).
        model: the model being trained; reconstructions need ``reconstruct``, samples a VAE ``sample``.
        val: the validation split; its first 8 images are reconstructed every epoch.
    """
    if writer is None:
        return
    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(scalar_tag(key), value, epoch)
    was_training = model.training
    model.eval()
    pixel_range = model.config.pixel_range
    x = to_pixels(val.images[:NUM_RECON], pixel_range)
    y = val.labels[:NUM_RECON] if model.conditional else None
    if hasattr(model, "reconstruct") and len(x):
        recon = model.reconstruct(x) if y is None else model.reconstruct(x, y=y)
        writer.add_image("reconstructions/val", _grid(torch.cat([x, recon]), pixel_range, NUM_RECON), epoch)
    if getattr(model, "kind", "vae") == "vae":
        device = next(model.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        ys = torch.arange(NUM_SAMPLES, device=device) % model.config.num_classes if model.conditional else None
        writer.add_image("samples/prior", _grid(model.sample(NUM_SAMPLES, y=ys, generator=gen), pixel_range, 8), epoch)
    writer.flush()
    model.train(was_training)


def _grid(images: torch.Tensor, pixel_range: str, nrow: int) -> torch.Tensor:
    x = images.detach().float().cpu()
    if pixel_range == "[-1,1]":
        x = (x + 1.0) / 2.0
    return make_grid(x.clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
