"""Where and how a computation runs: device, precision, data-parallel ranks, seeds, and the provenance
recorded with results."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

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
    """What produced a result: device (its model name, and CPU threads), seed, vaelab/torch versions and git
    commit. Timings are only comparable between results with the same ``device_name`` and ``threads``."""
    device = torch.device(device)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "seed": seed,
        "vaelab_version": vaelab.__version__,
        "torch_version": torch.__version__,
        "git_sha": git_sha(),
    }


@functools.lru_cache(maxsize=4)
def device_name(device: torch.device | str) -> str:
    """The processor behind ``device``: the GPU's name for CUDA, else the CPU's model name (``model name`` of
    /proc/cpuinfo on Linux, ``platform.processor()`` elsewhere), e.g. ``"AMD EPYC"``; ``"unknown"`` if
    neither says."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def derive_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``(seed, "epoch", 3)``): independent streams for every epoch,
    the same on every rank, and none of them depends on what was drawn before (so a resumed run draws
    exactly what an uninterrupted one would)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ---------------------------------------------------------------------------- precision


def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 matrix work natively: CUDA with compute capability >= 8.0, or a
    CPU with AVX512-BF16 / AMX-BF16 instructions (read from /proc/cpuinfo on Linux)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where ``fast_bf16(device)``, else ``fp32``; other names are checked.

    The default was chosen by measurement (README, "Speed"): on the 2-core AVX512-BF16 CPU bf16 trains
    the CIFAR-10 seed VAE ~2x faster with the same -ELBO after the same steps.

    Raises:
        ConfigError: ``fp16`` off CUDA (float16 on a CPU is slow and needs loss scaling), or ``bf16`` on a
            device without bfloat16 support.
    """
    if name == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision fp16 needs a CUDA device (with a gradient scaler); on {device.type} use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU has no bfloat16 support; use --precision fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``fp32``: disabled)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---------------------------------------------------------------------------- data parallel


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel job started by ``torchrun`` (rank 0 of 1 otherwise)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (no-op for one process)."""
        if self.active:
            torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def gather(self, obj):
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled; for small CPU objects)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def block(self, n: int) -> tuple[int, int]:
        """This rank's ``(start, stop)`` of ``n`` items split into equal contiguous blocks of
        ``ceil(n / world_size)`` (the last rank's may be shorter or empty)."""
        size = -(-n // self.world_size)
        return min(n, self.rank * size), min(n, (self.rank + 1) * size)

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's ``block(n)`` of rows, concatenated in rank order: the whole ``(n, ...)`` tensor
        on every rank, on ``part``'s device (NCCL gathers through the GPU)."""
        if not self.active:
            return part
        size = -(-n // self.world_size)
        padded = torch.zeros((size, *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[: len(part)] = part
        if torch.distributed.get_backend() == "nccl":
            padded = padded.cuda()
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, padded)
        return torch.cat(out)[:n].to(part.device)

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the data-parallel job ``torchrun`` started (``WORLD_SIZE`` > 1 in the environment), or run alone.

    One process per GPU with NCCL (``cuda:LOCAL_RANK``), or CPU processes with gloo. Multi-node jobs
    use torchrun's own rendezvous flags (``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``); nothing
    here is launcher-specific beyond the standard environment variables.

    Returns:
        ``(Distributed, device)``.

    Raises:
        ConfigError: the device is not available.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed(), select_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local), device
