"""Data-parallel training with torchrun: 2 CPU processes (gloo, loopback) against one process.

The model has no BatchNorm, so a 2-rank run with batch B per rank must follow the single-process run
with batch 2B step for step: same global batches (one permutation dealt out to the ranks), the same
noise per image (drawn per global batch), gradients averaged by DistributedDataParallel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import vaelab.families
from vaelab.config import TrainConfig
from vaelab.run import Run
from vaelab.training import train

REPO = Path(__file__).resolve().parents[1]
TIMING = {"epoch_time_s", "epoch_cpu_time_s", "images_per_s"}


def config(out: Path, batch_size: int, epochs: int = 2) -> TrainConfig:
    return TrainConfig(dataset="mnist", data_root=str(REPO.parent / "shared" / "datasets"), train_subset=600,
                       test_subset=100, latent_dim=4, batch_size=batch_size, epochs=epochs, log_every=5, precision="fp32",
                       model_args={"batch_norm": False, "channels": [8, 16, 16], "fc_hidden": 32}, device="cpu",
                       out=str(out))


def torchrun(tmp_path: Path, *args: str) -> None:
    env = {**os.environ, "DDP_TEST_OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "ddp_worker.py"), *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)  # hard timeout
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_cpu_processes_train_like_one_process_with_twice_the_batch(tmp_path):
    ddp_config = config(tmp_path / "ddp", batch_size=32)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp_config.to_dict()))
    torchrun(tmp_path, "train", "--config", str(tmp_path / "ddp.yaml"))
    single = train(config(tmp_path / "single", batch_size=64))

    # identical parameters on both ranks, and equal to the checkpoint rank 0 wrote
    w0, w1 = (load_file(str(tmp_path / f"weights-rank{r}.safetensors")) for r in (0, 1))
    saved = load_file(str(Run(tmp_path / "ddp").last_checkpoint() / "model.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]) and torch.equal(w0[k], saved[k]), k

    # the loss curve of the single process with the doubled batch, within float tolerance
    ddp_rows, single_rows = rows(tmp_path / "ddp"), rows(single)
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [9, 18]
    for a, b in zip(ddp_rows, single_rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=2e-4, abs=1e-5), k
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["test_neg_elbo_nats"] == pytest.approx(Run(single).summary()["test_neg_elbo_nats"], rel=2e-4)

    # only rank 0 wrote into the run folder
    run_files = [w for w in json.loads((tmp_path / "writes-rank1.json").read_text()) if str(tmp_path / "ddp") in w]
    assert run_files == []
    assert any(w.endswith("summary.json") for w in json.loads((tmp_path / "writes-rank0.json").read_text()))
    assert len(list((tmp_path / "ddp" / "tb").glob("events.out.tfevents.*"))) == 1

    # --resume of a distributed run continues it with the same ranks
    torchrun(tmp_path, "train", "--resume", str(tmp_path / "ddp"), "--epochs", "3")
    assert [r["epoch"] for r in rows(tmp_path / "ddp")] == [1, 2, 3]


def test_evaluate_shares_sampling_and_features_across_two_processes(tmp_path, monkeypatch):
    import vaelab.evaluator
    from vaelab.evaluation import evaluate_run
    from vaelab.generation import generate
    from vaelab.runtime import derive_seed

    real_recipe = vaelab.evaluator.default_recipe
    monkeypatch.setattr(vaelab.evaluator, "default_recipe", lambda d: {**real_recipe(d), "epochs": 1, "widths": (4, 8)})
    run_dir = train(config(tmp_path / "run", batch_size=64, epochs=1))
    args = ["--metrics", "fid,confidence", "--fid-features", "classifier", "--num-samples", "150", "--device", "cpu"]
    single = evaluate_run(run_dir, metrics="fid,confidence", fid_features="classifier", num_samples=150, device="cpu")
    (run_dir / "eval.json").unlink()

    monkeypatch.setenv("DDP_TINY_EVALUATOR", "1")
    torchrun(tmp_path, "evaluate", "--run-dir", str(run_dir), *args)
    ddp = json.loads((run_dir / "eval.json").read_text())
    # both ranks hold the whole gathered set; rank r drew its block of 75 with its own seed
    fake0, fake1 = (torch.load(tmp_path / f"fake-rank{r}.pt") for r in (0, 1))
    assert fake0.shape[0] == 150 and torch.equal(fake0, fake1)
    run = Run(run_dir)
    model = run.load_model("cpu")
    draw = vaelab.families.family_of(model).sampler(model, run, sampler=None, steps=None)
    for r in (0, 1):
        block, _ = generate(model, draw, 75, seed=derive_seed(0, "rank", r))
        assert torch.equal(fake0[75 * r : 75 * (r + 1)], block)
    # rank 0 measured the gathered set against the same real statistics as one process would
    assert ddp["fid"]["num_samples"] == single["fid"]["num_samples"] == 150
    assert ddp["fid"]["floor"]["value"] == pytest.approx(single["fid"]["floor"]["value"])
    assert ddp["fid"]["value"] != single["fid"]["value"]  # other samples (per-rank seeds)
    assert ddp["confidence"]["real_test"] == single["confidence"]["real_test"]
    assert not [w for w in json.loads((tmp_path / "writes-rank1.json").read_text()) if str(run_dir) in w]
