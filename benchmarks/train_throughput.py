"""Training throughput of the ``cifar-seed`` VAE: bare step loop vs the real training loop.

(a) bare: ``model.loss`` -> ``backward`` -> ``Adam.step`` on one random batch held on the device,
    nothing else (no data pipeline, augmentation, clipping, beta schedule or logging).
(b) real: ``vaelab.training.train`` for one epoch on real CIFAR-10 images (JPEG q75 copy by
    default), with augmentation, gradient clipping, progress bar and metrics; images/s is the one the
    loop itself records in ``metrics.jsonl`` (training steps only, not validation or pictures).

Usage::

    python benchmarks/train_throughput.py [--device cpu] [--batch-sizes 32 128] [--train-subset 4096]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from vaelab.config import TrainConfig
from vaelab.models import build_config, build_model
from vaelab.training import select_device, train


def bare_loop(batch_size: int, device: torch.device, steps: int, warmup: int = 3) -> float:
    torch.manual_seed(0)
    model = build_model(build_config("cifar-seed", data_shape=(3, 32, 32), recon_likelihood="gaussian")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        out = model.loss(x, beta=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def real_loop(batch_size: int, device: torch.device, train_subset: int, data_root: str | None) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(
            dataset="cifar10", model="cifar-seed", data_root=data_root, batch_size=batch_size, epochs=1,
            lr=1e-4, train_subset=train_subset, test_subset=500, device=str(device), out=str(Path(tmp) / "run"),
        )
        run_dir = train(config)
        row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        source = json.loads((run_dir / "summary.json").read_text())["dataset"]
    return row["images_per_s"], source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--bare-steps", type=int, default=60)
    p.add_argument("--train-subset", type=int, default=4096, help="train images for the real loop's epoch")
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    device = select_device(args.device)
    rows = []
    for bs in args.batch_sizes:
        bare = bare_loop(bs, device, args.bare_steps)
        real, source = real_loop(bs, device, args.train_subset, args.data_root)
        rows.append((bs, bare, real, source))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ncifar-seed VAE training throughput, device {name}, torch {torch.__version__}")
    print("| batch | (a) bare step loop, random tensors (img/s) | (b) real training loop (img/s) | b / a | data (b) |")
    print("|---:|---:|---:|---:|---|")
    for bs, bare, real, source in rows:
        print(f"| {bs} | {bare:,.0f} | {real:,.0f} | {real / bare:.2f} | {source}, train_subset {args.train_subset:,} |")


if __name__ == "__main__":
    main()
