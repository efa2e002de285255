"""Generation time of a VAE decoder vs a DDPM (full T-step chain and DDIM), same device, same batch.

The cost of sampling does not depend on what the weights learned, so freshly initialised models
of the presets are timed (``vaelab.comparison.time_generation``: one batch of n, one warm-up call,
median of the repeats). Chains longer than ``--max-steps`` are timed on that many steps and scaled
linearly, and the table says so.

Usage::

    python benchmarks/generation_speed.py [--device cpu] [--n 150 1000] [--ddim-steps 50] \
        [--max-steps 10] [--repeats 3] [--ddpm-widths 16 32 64] [--ddpm-layers 1]
"""

from __future__ import annotations

import argparse

import torch

from vaelab.comparison import time_generation
from vaelab.models import build_config, build_model
from vaelab.training import select_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--n", type=int, nargs="+", default=[150, 1000])
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=10, help="time longer chains on this many steps (0: full chains)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ddpm-widths", type=int, nargs="+", help="UNet widths (default: the ddpm-28 preset's)")
    p.add_argument("--ddpm-layers", type=int, help="ResNet blocks per level (default: the preset's)")
    args = p.parse_args()
    device = select_device(args.device)
    torch.manual_seed(0)
    vae = build_model(build_config("mnist-small", latent_dim=10)).to(device).eval()
    ddpm_fields = {"widths": args.ddpm_widths, "layers_per_block": args.ddpm_layers}
    ddpm = build_model(build_config("ddpm-28", **ddpm_fields)).to(device).eval()
    T = ddpm.config.num_train_timesteps
    rows = [
        (f"VAE mnist-small ({sum(p.numel() for p in vae.parameters()):,} params)", vae, {}),
        (f"DDPM ddpm-28 widths {list(ddpm.config.widths)}, {T} steps ({ddpm.num_parameters:,} params)", ddpm,
         {"sampler": "ddpm", "steps": T}),
        (f"DDIM {args.ddim_steps} steps (same UNet)", ddpm, {"sampler": "ddim", "steps": args.ddim_steps}),
    ]
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"generation time on {device}{threads}, 1x28x28 images, one batch of n, median of {args.repeats} after a warm-up")
    print("| generator | " + " | ".join(f"n={n} (s)" for n in args.n) + " | method |")
    print("|---" * (len(args.n) + 2) + "|")
    for name, model, kwargs in rows:
        times = [time_generation(model, n, sample_kwargs=kwargs, repeats=args.repeats, max_steps=args.max_steps or None)
                 for n in args.n]
        print(f"| {name} | " + " | ".join(f"{t['seconds']:.4g}" for t in times) + f" | {times[-1]['method']} |")


if __name__ == "__main__":
    main()
