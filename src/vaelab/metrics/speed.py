"""Generation speed: one definition for ``vaelab evaluate`` and ``vaelab compare``."""

from __future__ import annotations

import statistics
import time

import torch

from vaelab.families import Sampler, family_of
from vaelab.runtime import synchronize

SIZES = (150, 1000)


@torch.no_grad()
def time_generation(model, sampler: Sampler, n: int, *, repeats: int = 3, max_steps: int | None = None,
                    seed: int = 0) -> dict:
    """Seconds to draw ``n`` images in one batch: one warm-up call, then the median of ``repeats`` calls.

    A sampler with a chain of more than ``max_steps`` steps (a long diffusion chain) is timed on a chain
    of ``max_steps`` steps of the same sampler and options (guidance included) and the median scaled by
    the ratio of network evaluations (every step is the same passes plus a scheduler update); the result
    says so. A sampler without ``steps`` (a VAE's, the PixelCNN prior's cell-by-cell pass) is timed whole.

    Returns:
        dict with ``seconds`` (for ``n`` images), ``samples_per_s``, ``runs_s`` (the timed calls),
        ``method``, ``batch_size``, ``device``, ``threads``.
    """
    device = next(model.parameters()).device
    full = sampler.network_evaluations
    timed = sampler
    if max_steps is not None and sampler.steps is not None and sampler.steps > max_steps:
        timed = family_of(model).sampler(model, sampler=sampler.options["sampler"], steps=max_steps)
    y = family_of(model).sample_labels(model, n)
    y = None if y is None else y.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def once() -> float:
        t0 = time.perf_counter()
        timed.draw(n, gen, y)
        synchronize(device)
        return time.perf_counter() - t0

    once()  # warm-up: allocator, kernels, lazy initialisation
    runs = [once() for _ in range(repeats)]
    seconds = statistics.median(runs) * full / timed.network_evaluations
    method = f"median of {repeats} runs after a warm-up"
    if timed is not sampler:
        method = (f"extrapolated: median of {repeats} runs of {timed.network_evaluations} of the {full} steps "
                  f"(after a warm-up), x {full}/{timed.network_evaluations}")
    return {"seconds": seconds, "samples_per_s": n / seconds, "runs_s": runs, "method": method, "batch_size": n,
            "device": str(device), "threads": torch.get_num_threads() if device.type == "cpu" else None}


def speed_metrics(model, sampler: Sampler, *, seed: int = 0, repeats: int = 3) -> dict:
    """``eval.json``'s ``speed`` entry: ``time_generation`` at batch 150 and 1,000."""
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    rows = {f"batch_{n}": time_generation(model, sampler, n, repeats=repeats, seed=seed) for n in SIZES}
    return {"metric": f"generation speed: {sampler.label} sampler, one batch, median of {repeats} after a warm-up",
            "dtype": dtype, "sampler": sampler.options, **rows}
