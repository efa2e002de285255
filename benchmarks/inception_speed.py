"""FID Inception-v3 feature extraction on this machine: images/s per engine and precision, and how far
the reduced-precision mode moves FID — one run, two tables.

Rows of the speed table (the same 2048-d pool3 features, pytorch-fid's preprocessing included, batch 50
of real test images, ``torch.get_num_threads()`` threads):

- torch fp32: the TorchScript network (channels_last), ``load_inception(engine="torch")``;
- OpenVINO fp32 (vaelab's CPU default) and OpenVINO bf16 (``--feature-precision bf16``);
- ONNX Runtime fp32 on the same graph exported to ONNX, when ``onnxruntime`` is installed
  (``pip install -e ".[bench]"``): the runtime vaelab did not pick, for the record.

Each row also gives the largest relative difference of its features from torch fp32's.

The FID table: train-vs-test floors (N random train images vs N test images, seed 0) of each dataset in
fp32 and in bf16 through ``vaelab.evaluation.evaluate_floor`` (statistics cached as by ``vaelab
evaluate``), with the relative deviation of bf16 from fp32.

Usage::

    python benchmarks/inception_speed.py [--batches 4] [--fid-n 10000] [--datasets mnist,fashion-mnist,cifar10]
                                         [--data-root PATH] [--no-fid | --no-speed]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from vaelab.data import load_split
from vaelab.metrics.inception import load_inception, preprocess


def _rate(fn, x, batches: int) -> float:
    fn(x)  # warm-up: graph optimisation, memory for this shape
    start = time.perf_counter()
    for _ in range(batches):
        fn(x)
    return batches * len(x) / (time.perf_counter() - start)


def _onnxruntime(torch_net, x_pre: torch.Tensor):
    """ONNX Runtime on the TorchScript exported to ONNX, or ``None`` when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        return None
    path = Path(tempfile.mkdtemp()) / "inception.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(torch_net, (x_pre[:1],), str(path), dynamo=False, input_names=["x"], output_names=["f"],
                          dynamic_axes={"x": {0: "b"}, "f": {0: "b"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"x": preprocess(images).numpy()})[0]).reshape(len(images), -1)


def speed_table(images: torch.Tensor, batches: int) -> list[str]:
    torch_fp32 = load_inception(engine="torch")
    reference = torch_fp32(images)
    rows = [("torch fp32", torch_fp32), ("OpenVINO fp32 (default)", load_inception(engine="openvino")),
            ("OpenVINO bf16", load_inception(engine="openvino", precision="bf16"))]
    ort_fn = _onnxruntime(torch_fp32.net, preprocess(images))
    if ort_fn is not None:
        rows.append(("ONNX Runtime fp32", ort_fn))
    lines = [f"| engine | images/s | x torch fp32 | max rel. feature difference |", "|---|---:|---:|---:|"]
    base = None
    for name, fn in rows:
        rate = _rate(fn, images, batches)
        base = base or rate
        diff = ((fn(images) - reference).abs().max() / reference.abs().max()).item()
        lines.append(f"| {name} | {rate:.1f} | {rate / base:.2f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    return lines


def fid_table(datasets: list[str], n: int, data_root: str | None) -> list[str]:
    from vaelab.evaluation import evaluate_floor

    lines = [f"| dataset | N | FID fp32 | FID bf16 | bf16 - fp32 |", "|---|---:|---:|---:|---:|"]
    for name in datasets:
        fid = {}
        for precision in ("fp32", "bf16"):
            result = evaluate_floor(name, data_root=data_root, num_samples=n, fid_features="inception",
                                    feature_precision=precision, device="cpu")
            fid[precision] = result["floors"]["inception"]["fid"]["value"]
        dev = (fid["bf16"] - fid["fp32"]) / fid["fp32"]
        lines.append(f"| {name} (train vs test) | {n:,} | {fid['fp32']:.4f} | {fid['bf16']:.4f} | {100 * dev:+.2f} % |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=4, help="timed batches of 50 images per row")
    ap.add_argument("--fid-n", type=int, default=10000)
    ap.add_argument("--datasets", default="mnist,fashion-mnist,cifar10")
    ap.add_argument("--data-root")
    ap.add_argument("--no-fid", action="store_true", help="the speed table only")
    ap.add_argument("--no-speed", action="store_true", help="the FID table only")
    args = ap.parse_args()
    images = load_split("cifar10" if "cifar10" in args.datasets else "mnist", "test", args.data_root).images[:50]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {len(images)}")
    lines = [] if args.no_speed else speed_table(images, args.batches)
    if not args.no_fid:
        lines += [""] + fid_table(args.datasets.split(","), args.fid_n, args.data_root)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
