"""Where a training step's time goes: images/s and the top operators (``torch.profiler``) of one
optimiser step of the ``cifar-seed`` VAE and the ``ddpm-28`` DDPM, in fp32 and bf16 autocast,
contiguous and channels_last.

A step is what ``vaelab train`` does per batch: ``model.loss`` under autocast -> ``backward`` ->
``clip_grad_norm_`` -> ``Adam.step`` (vaelab's optimiser settings) -> the family's per-step hook (the
DDPM's EMA update). Random inputs of the model's shape, held on the device.

Usage::

    python benchmarks/profile_step.py [--models cifar-seed,ddpm-28] [--steps 20] [--top 10] [--out FILE.md]

Prints one markdown table of images/s per (model, precision, layout, step as before/now: unfused Adam
and SDPA attention vs fused Adam and the CPU attention processor), then for each model and
precision the top operators by self CPU time (contiguous layout); ``--out`` also writes them to a file.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vaelab.families import family_of
from vaelab.models import build_config, build_model
from vaelab.runtime import autocast
from vaelab.training import make_optimizer

# the training configs these models run with (configs/cifar10-seed.yaml, configs/fashion-mnist-ddpm-cpu.yaml)
MODELS = {
    "cifar-seed": dict(shape=(3, 32, 32), batch_size=128, fields=dict(recon_likelihood="gaussian")),
    "ddpm-28": dict(shape=(1, 28, 28), batch_size=64,
                    fields=dict(widths=(16, 32, 64), layers_per_block=1, ema_decay=0.999)),
}


def run(name: str, precision: str, channels_last: bool, steps: int, batch_size: int | None, top: int,
        before: bool = False):
    """``(images/s of wall time, images/s of this process's CPU time, profile table or None)``; ``before``:
    the step as it was before fused Adam and the CPU attention processor (unfused Adam, SDPA attention)."""
    spec = MODELS[name]
    torch.manual_seed(0)
    model = build_model(build_config(name, data_shape=spec["shape"], **spec["fields"]))
    if before:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        for module in model.modules():
            if isinstance(module, Attention):
                module.set_processor(AttnProcessor2_0())
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr=1e-4, fused=not before)
    n = batch_size or spec["batch_size"]
    x = torch.rand(n, *spec["shape"])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    family = family_of(model)
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            out = model.loss(x, beta=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        family.after_step(model)

    for _ in range(3):
        step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    images_per_s = steps * n / (time.perf_counter() - start)
    images_per_cpu_s = steps * n / (time.process_time() - cpu)
    table = None
    if top:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(max(3, steps // 4)):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)
    return images_per_s, images_per_cpu_s, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, help="default: the model's training config")
    ap.add_argument("--top", type=int, default=10, help="operators per profile table (0: no profiles)")
    ap.add_argument("--out", help="also write the tables to this markdown file")
    args = ap.parse_args()
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} timed steps per row", "",
             "| model | batch | precision | layout | step | images/s | images per CPU-second |",
             "|---|---:|---|---|---|---:|---:|"]
    profiles = []
    for name in args.models.split(","):
        batch = args.batch_size or MODELS[name]["batch_size"]
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                for before in (True, False):
                    ips, cps, table = run(name, precision, channels_last, args.steps, args.batch_size,
                                          args.top if not (channels_last or before) else 0, before=before)
                    layout = "channels_last" if channels_last else "contiguous"
                    how = "before (Adam foreach, SDPA attention)" if before else "now (fused Adam, CPU attention)"
                    lines.append(f"| {name} | {batch} | {precision} | {layout} | {how} | {ips:.0f} | {cps:.0f} |")
                    print(lines[-1], flush=True)
                if table:
                    profiles += ["", f"### {name}, {precision}, contiguous: top {args.top} operators by self CPU time",
                                 "", "```", table.rstrip(), "```"]
    text = "\n".join(lines + profiles)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
