"""Where and how a computation runs: device choice, seeding, and the provenance recorded with results."""

from __future__ import annotations

import random

import numpy as np
import torch

import vaelab
from vaelab.errors import ConfigError
from vaelab.io import git_sha


def select_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; otherwise ``torch.device(name)``.

    Raises:
        ConfigError: the named device is not available (or not a device name).
    """
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device must be auto, cpu, mps or cuda[:N], got {name!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (vaelab's own draws use explicit generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings include it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def provenance(device: torch.device | str, seed: int | None = None) -> dict:
    """What produced a result: device (and CPU threads), seed, vaelab/torch versions and git commit."""
    device = torch.device(device)
    return {
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "seed": seed,
        "vaelab_version": vaelab.__version__,
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
    }
