"""Training that never fails silently: non-finite guard, strict JSON, resume after kills and across devices."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.io import write_json
from vaelab.models.conv_vae import ConvVAE
from vaelab.run import Run
from vaelab.training import NonFiniteError, resume, train

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_time_s", "epoch_cpu_time_s", "images_per_s"}  # time measurements: the only numbers allowed to differ


def strict_json(path: Path):
    """Parse ``path`` refusing NaN/Infinity, which Python's json module would otherwise accept."""
    def refuse(token):
        raise AssertionError(f"{path} holds {token}")

    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]
    return json.loads(text, parse_constant=refuse)


def small_config(out: Path, **kw) -> TrainConfig:
    values = dict(dataset="mnist", data_root=str(REPO.parent / "shared" / "datasets"), train_subset=1200, test_subset=200,
                  latent_dim=4, batch_size=64, epochs=2, log_every=5, tensorboard=False, device="cpu", out=str(out))
    return TrainConfig(**{**values, **kw})


# ---------------------------------------------------------------------------- non-finite guard


def test_diverging_run_exits_2_with_one_line_and_writes_no_nan(tmp_path, in_repo, capsys):
    run = tmp_path / "nan"
    code = main(["train", "--dataset", "mnist", "--train-subset", "3000", "--lr", "50", "--epochs", "2",
                 "--device", "cpu", "--no-tensorboard", "--out", str(run)])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # not the bar
    assert len(err) == 1, err
    assert re.search(r"non-finite .*loss.* at epoch 1, step \d+ \(lr 50\).*Hint: lower --lr", err[0]), err[0]
    assert not (run / "summary.json").exists() and not Run(run).checkpoints()
    for f in run.rglob("*.json*"):
        strict_json(f)


def test_nan_mid_run_keeps_the_finite_checkpoint_and_resume_continues(tmp_path, monkeypatch):
    config = small_config(tmp_path / "run", epochs=3)
    real_loss = ConvVAE.loss
    calls = {"n": 0}

    def loss_turning_nan(self, x, **kw):  # finite for epoch 1 (18 steps), NaN from the 5th step of epoch 2
        calls["n"] += self.training
        out = real_loss(self, x, **kw)
        if self.training and calls["n"] > 18 + 4:
            out.loss = out.loss * float("nan")
            out.kl = out.kl * float("nan")
        return out

    monkeypatch.setattr(ConvVAE, "loss", loss_turning_nan)
    with pytest.raises(NonFiniteError, match=r"non-finite loss, kl, gradient norm at epoch 2, step 23 "):
        train(config)
    run = Run(config.out)
    assert [c.name for c in run.checkpoints()] == ["epoch-0001"]  # the finite one, untouched
    weights = load_file(str(run.last_checkpoint() / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    assert [r["epoch"] for r in strict_json(run.path / "metrics.jsonl")] == [1]
    assert not run.finished

    monkeypatch.setattr(ConvVAE, "loss", real_loss)
    resume(run.path)
    assert [r["epoch"] for r in strict_json(run.path / "metrics.jsonl")] == [1, 2, 3]
    strict_json(run.path / "summary.json")


def test_a_non_finite_model_is_never_saved(tmp_path):
    from fixtures import fake_run

    run = Run(fake_run(tmp_path / "r", "mnist", "mnist-small"))
    model = run.load_model()
    with torch.no_grad():
        model.fc_mu.weight[0, 0] = float("inf")
    with pytest.raises(Exception, match="non-finite values in fc_mu.weight"):
        run.save_checkpoint(2, model, {"epoch": 2})
    assert [c.name for c in run.checkpoints()] == ["epoch-0001"]


def test_json_writers_refuse_nan(tmp_path):
    with pytest.raises(ValueError, match=r"non-finite number at summary\.test_recon_nats"):
        write_json(tmp_path / "s.json", {"summary": {"test_recon_nats": float("nan")}})
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- resume edge cases


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    return train(small_config(tmp_path_factory.mktemp("resume") / "run", epochs=1))


def test_kill_between_metrics_row_and_checkpoint_leaves_no_duplicate(one_epoch_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    rows = strict_json(run_dir / "metrics.jsonl")
    # as if epoch 2's row had been appended and the process died before its checkpoint was written
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [{**rows[0], "epoch": 2}]))
    resume(run_dir, epochs=2)
    assert [r["epoch"] for r in strict_json(run_dir / "metrics.jsonl")] == [1, 2]


def test_resume_on_another_device_kind(one_epoch_run, tmp_path):
    """A run trained on a GPU resumes on a CPU with --device cpu, and without it stops with a clear error.

    Checkpoint tensors load with map_location="cpu" and the optimizer state follows the parameters'
    device; random draws are seeded per epoch (not restored from a device-specific generator state)."""
    run_dir = tmp_path / "run"
    shutil.copytree(one_epoch_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "device": "cuda"}))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
            resume(run_dir, epochs=2)
    resume(run_dir, epochs=2, device="cpu")
    assert [r["epoch"] for r in strict_json(run_dir / "metrics.jsonl")] == [1, 2]


def _launch(config_file: Path, *, watch: bool) -> subprocess.Popen:
    """``vaelab train --config FILE`` as a separate process; with ``watch`` its progress bar is readable."""
    return subprocess.Popen([sys.executable, "-m", "vaelab", "train", "--config", str(config_file)], cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if watch else subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})  # one core each


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real `vaelab train` process killed with SIGKILL in the middle of epoch 2, resumed: the final weights
    and every metrics.jsonl number except wall-clock timings equal those of an uninterrupted run."""
    runs = {}
    for name in ("straight", "killed"):
        cfg = small_config(tmp_path / name, epochs=3, train_subset=3000, log_every=1)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        runs[name] = tmp_path / name
    straight = _launch(tmp_path / "straight.yaml", watch=False)
    killed = _launch(tmp_path / "killed.yaml", watch=True)
    progress = ""
    try:
        while True:  # read the progress bar until epoch 2 has made a few steps
            chunk = killed.stderr.read(64)
            if not chunk:
                raise AssertionError(f"training ended before it could be killed:\n{progress[-2000:]}")
            progress += chunk
            m = re.findall(r"epoch 2/3:.*?\| *(\d+)/(\d+) \[", progress)
            if m and 3 <= int(m[-1][0]) < int(m[-1][1]):
                break
        killed.send_signal(signal.SIGKILL)
    finally:
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert [c.name for c in Run(runs["killed"]).checkpoints()] == ["epoch-0001"]  # killed mid-epoch 2
    assert subprocess.run([sys.executable, "-m", "vaelab", "train", "--resume", str(runs["killed"])], cwd=REPO,
                          capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode == 0
    assert straight.wait(timeout=300) == 0

    rows = {name: strict_json(path / "metrics.jsonl") for name, path in runs.items()}
    assert [r["epoch"] for r in rows["killed"]] == [1, 2, 3]
    for a, b in zip(rows["straight"], rows["killed"]):
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}
    weights = {name: load_file(str(Run(path).last_checkpoint() / "model.safetensors")) for name, path in runs.items()}
    assert weights["straight"].keys() == weights["killed"].keys()
    for key in weights["straight"]:
        assert torch.equal(weights["straight"][key], weights["killed"][key]), key
