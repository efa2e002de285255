"""TensorBoard logging of a training run, into ``RUN_DIR/tb/`` (view with ``tensorboard --logdir RUN_DIR/tb``).

Each epoch: every number of the ``metrics.jsonl`` row as a scalar (``train_recon`` -> ``recon/train``,
``val_kl`` -> ``kl/val``, ``beta`` -> ``schedule/beta``, ``lr`` -> ``schedule/lr``, ...) and the image
grids of the model's family (VAEs: reconstructions of 8 fixed validation images and decoder means of
16 fixed prior draws; diffusion models: none). The step is the epoch number.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from vaelab.data import ImageSplit, to_unit_interval

SCHEDULE_KEYS = ("beta", "lr")


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
    """Write one epoch's scalars and the model family's image grids (nothing when ``writer`` is ``None``).

    Args:
        row: the epoch's metrics row (``epoch`` is the step; every other int/float is a scalar).
        model: the model being trained (its family decides the pictures, see ``log_images``).
        val: the validation split on the model's device.
    """
    if writer is None:
        return
    from vaelab.families import family_of

    epoch = row["epoch"]
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(scalar_tag(key), value, epoch)
    was_training = model.training
    model.eval()
    family_of(model).log_images(writer, model, val, epoch, seed)
    writer.flush()
    model.train(was_training)


def add_grid(writer, tag: str, images: torch.Tensor, pixel_range: str, nrow: int, step: int) -> None:
    """One image grid of ``(B, C, H, W)`` float images in ``pixel_range``."""
    x = to_unit_interval(images.detach().float().cpu(), pixel_range)
    writer.add_image(tag, make_grid(x, nrow=nrow, padding=2, pad_value=1.0), step)
