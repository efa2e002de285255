"""Generation time of every sampler of VAE, DDPM and LDM models: one process, back to back, same device.

Without ``--run`` it times freshly initialised models of two presets (the cost of sampling does not
depend on what the weights learned): the ``mnist-small`` VAE's prior sampler and the ``ddpm-28`` UNet's
comparison samplers (T-step chain, DDIM, DPM-Solver++, SDE-DPM-Solver++). With ``--run RUN_DIR``
(repeatable) it times each trained run's comparison samplers instead, exactly the entries ``vaelab
compare`` would time — useful when a comparison's timings were taken at different moments of a busy
machine and need one set measured under the same conditions. Each time is
``vaelab.metrics.speed.time_generation``: one batch of n, one warm-up call, the median of the repeats;
chains longer than ``--max-steps`` are timed on that many steps and scaled, and the table says so.

Usage::

    python benchmarks/generation_speed.py [--run RUN_DIR ...] [--device cpu] [--n 150 1000] \
        [--ddim-steps 50] [--max-steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch

from vaelab.families import family_of
from vaelab.metrics.speed import time_generation
from vaelab.models import build_config, build_model, count_parameters
from vaelab.run import Run
from vaelab.runtime import select_device


def entries(runs: list[str], device: torch.device, ddim_steps: int):
    """``(name, model, samplers)`` for each run folder, or for the two fresh presets without runs."""
    if runs:
        for path in runs:
            run = Run(path)
            model = run.load_model(device)
            yield run.path.name, model, family_of(model).comparison_samplers(model, run, ddim_steps=ddim_steps)
        return
    torch.manual_seed(0)
    for preset, fields in (("mnist-small", {"latent_dim": 10}), ("ddpm-28", {})):
        model = build_model(build_config(preset, **fields)).to(device).eval()
        yield f"{preset} (untrained)", model, family_of(model).comparison_samplers(model, ddim_steps=ddim_steps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="RUN_DIR", help="a trained run folder (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, nargs="+", default=[150, 1000])
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=20, help="time longer chains on this many steps (0: full chains)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = select_device(args.device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"generation time on {device}{threads}, one batch of n, median of {args.repeats} after a warm-up")
    print("| model | parameters | sampler | network evaluations | " + " | ".join(f"n={n} (s)" for n in args.n)
          + " | method |")
    print("|---" * (len(args.n) + 5) + "|")
    for name, model, samplers in entries(args.run, device, args.ddim_steps):
        for sampler in samplers:  # time_generation as vaelab compare calls it (under torch.no_grad)
            times = [time_generation(model, sampler, n, repeats=args.repeats, max_steps=args.max_steps or None)
                     for n in args.n]
            print(f"| {name} | {count_parameters(model):,} | {sampler.label} | {sampler.network_evaluations} | "
                  + " | ".join(f"{t['seconds']:.4g}" for t in times) + f" | {times[-1]['method']} |", flush=True)


if __name__ == "__main__":
    main()
