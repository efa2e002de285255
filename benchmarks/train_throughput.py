"""Training throughput of the ``cifar-seed`` VAE, side by side in one run: images per second.

Rows (same model, batch size and device; CIFAR-10 images for every row but the bare loops):

- bare step loop, fp32 / bf16 autocast: ``model.loss`` -> ``backward`` -> ``Adam.step`` on one random
  batch held on the device, nothing else (the ceiling of a training loop);
- ``vaelab train``, fp32 / bf16 / bf16 + channels_last: the real loop (data on the device, flips,
  gradient clipping, non-finite guard, progress bar, metrics), one process;
- ``vaelab train`` with 2 processes (``torchrun --nproc-per-node 2``, gloo on the CPU, one thread each);
- pythae's ``TrainingPipeline`` (PyTorch DataLoader, its own loop) with the same encoder and decoder,
  when pythae is installed (``pip install -e ".[bench]"``, an optional benchmark dependency).

Loop rows report the mean images/s of the epochs after the first (the first pays for warm-up), each
measured as images / wall time of the epoch's training steps (validation excluded) for vaelab and for
pythae alike.

Usage::

    python benchmarks/train_throughput.py [--device cpu] [--batch-size 128] [--train-subset 4096] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from vaelab.config import TrainConfig
from vaelab.data import load_split, to_pixels
from vaelab.models import build_config, build_model
from vaelab.runtime import autocast, select_device, synchronize
from vaelab.training import train

MODEL = "cifar-seed"


def bare_loop(batch_size: int, device: torch.device, precision: str, steps: int = 40, warmup: int = 5) -> float:
    torch.manual_seed(0)
    model = build_model(build_config(MODEL, data_shape=(3, 32, 32), recon_likelihood="gaussian")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        with autocast(device, precision):
            out = model.loss(x, beta=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - t0)


def _config(out: Path, args, **kw) -> TrainConfig:
    return TrainConfig(dataset="cifar10", model=MODEL, data_root=args.data_root, batch_size=args.batch_size,
                       epochs=args.epochs, lr=1e-4, train_subset=args.train_subset, test_subset=500, device=args.device,
                       tensorboard=False, out=str(out), **kw)


def _after_first_epoch(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    return sum(r["images_per_s"] for r in later) / len(later)


def vaelab_loop(args, tmp: Path, name: str, **kw) -> float:
    return _after_first_epoch(train(_config(tmp / name, args, **kw)))


def vaelab_two_processes(args, tmp: Path, precision: str) -> float:
    config = _config(tmp / f"ddp-{precision}", args, precision=precision)
    (tmp / "ddp.yaml").write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vaelab",
                    "train", "--config", str(tmp / "ddp.yaml")], check=True, env=env, capture_output=True)
    return _after_first_epoch(Path(config.out))


def pythae_loop(args, device: torch.device) -> float | None:
    """pythae 0.1.2's TrainingPipeline on the same encoder/decoder (our ConvVAE's), MSE reconstruction."""
    try:
        from pythae.models import VAE, VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.pipelines import TrainingPipeline
        from pythae.trainers import BaseTrainerConfig
        from pythae.trainers.training_callbacks import TrainingCallback
    except ImportError:
        return None
    torch.manual_seed(0)
    ours = build_model(build_config(MODEL, data_shape=(3, 32, 32), recon_likelihood="gaussian"))

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = ours

        def forward(self, x):
            mu, logvar = self.net.encode(x)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = ours

        def forward(self, z):
            return ModelOutput(reconstruction=self.net.decode(z))

    class EpochTimer(TrainingCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_epoch_begin(self, training_config, **kw):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, training_config, **kw):  # after the training steps (no eval data is given)
            self.times.append(time.perf_counter() - self.t0)

    split = load_split("cifar10", "train", args.data_root).sample(args.train_subset)
    data = to_pixels(split.images)
    model = VAE(VAEConfig(input_dim=(3, 32, 32), latent_dim=256, reconstruction_loss="mse"),
                encoder=Encoder(), decoder=Decoder())
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as out:
        config = BaseTrainerConfig(output_dir=out, num_epochs=args.epochs, learning_rate=1e-4,
                                   per_device_train_batch_size=args.batch_size, no_cuda=device.type != "cuda")
        TrainingPipeline(model=model, training_config=config)(train_data=data, callbacks=[timer])
    later = timer.times[1:] or timer.times
    return len(data) / (sum(later) / len(later))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-subset", type=int, default=4096, help="CIFAR-10 train images per epoch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop row (the first is not counted)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--skip", nargs="*", default=[], help="rows to skip: bare vaelab pythae ddp")
    args = p.parse_args()
    device = select_device(args.device)
    rows: list[tuple[str, float | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "bare" not in args.skip:
            rows += [("bare step loop, fp32, random tensors", bare_loop(args.batch_size, device, "fp32")),
                     ("bare step loop, bf16 autocast, random tensors", bare_loop(args.batch_size, device, "bf16"))]
        if "pythae" not in args.skip:
            rows.append(("pythae 0.1.2 TrainingPipeline, same encoder/decoder, fp32", pythae_loop(args, device)))
        if "vaelab" not in args.skip:
            rows += [("vaelab train, fp32", vaelab_loop(args, tmp, "fp32", precision="fp32", channels_last=False)),
                     ("vaelab train, bf16", vaelab_loop(args, tmp, "bf16", precision="bf16", channels_last=False)),
                     ("vaelab train, bf16 + channels_last", vaelab_loop(args, tmp, "bf16cl", precision="bf16", channels_last=True))]
        if "ddp" not in args.skip and device.type == "cpu":
            rows += [("vaelab train, 2 processes (torchrun, gloo), bf16", vaelab_two_processes(args, tmp, "bf16"))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\n{MODEL} VAE training throughput, batch {args.batch_size} per process, {args.train_subset:,} CIFAR-10 "
          f"(JPEG q75 copy) images per epoch; device {name}; torch {torch.__version__}")
    print("| loop | images/s |\n|---|---:|")
    for label, value in rows:
        print(f"| {label} | {'not installed' if value is None else f'{value:,.0f}'} |")


if __name__ == "__main__":
    main()
