"""Damaged files (a copy cut short, a half-written row) stop a command with one line naming the file and
what to do, never a traceback; damaged caches are computed again after one warning line.

One tiny real run is trained once for the module; every case damages a copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import write_mnist

from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.training import train

REPO = Path(__file__).resolve().parents[1]
GMM = "gmm:components=2"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_datasets) -> Path:
    tmp = tmp_path_factory.mktemp("damaged")
    out = tmp / "run"
    train(TrainConfig(dataset="mnist", data_root=str(shared_datasets), train_subset=300, test_subset=100, epochs=1,
                      batch_size=64, latent_dim=4, log_every=100, tensorboard=False, device="cpu", out=str(out)))
    assert main(["sample", "--run", str(out), "--n", "4", "--out", str(tmp / "gmm.png"), "--sampler", GMM,
                 "--device", "cpu"]) == 0  # fits and caches samplers/gmm-*.safetensors
    (out / "eval.json").write_text(json.dumps({"recon": {"mse_per_pixel": 0.05}}))
    return out


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


def cut(path: Path, keep: float = 0.5) -> None:
    """Keep the first ``keep`` share of the file's bytes (an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]  # not the bars


def one_error_line(capsys, code: int, damaged: Path) -> str:
    """The command failed with exactly one stderr line naming ``damaged``; returns that line."""
    err = stderr_lines(capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert str(damaged) in err[0] and " is damaged (" in err[0] and "Traceback" not in err[0], err[0]
    return err[0]


def checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("epoch-*"))


# ---------------------------------------------------------------------------- run files: one line, exit 2


def test_truncated_checkpoint_weights_stop_sample_naming_the_file(run, tmp_path, capsys):
    damaged = checkpoint(run) / "model.safetensors"
    cut(damaged)
    line = one_error_line(capsys, main(["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "s.png"),
                                        "--device", "cpu"]), damaged)
    assert "the run's only checkpoint" in line and "restore" in line
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "--run", "RUN", "--metrics", "recon", "--device", "cpu"],
    ["synth", "--run", "RUN", "--out", "TMP/synth", "--per-class", "2", "--device", "cpu"],
    ["compare", "RUN", "TMP/other", "--out", "TMP/cmp", "--metrics", "recon", "--device", "cpu"],
], ids=lambda c: c[0])
def test_every_command_reading_the_checkpoint_stops_with_one_line(run, tmp_path, capsys, command):
    shutil.copytree(run, tmp_path / "other")  # compare: a second, sound run
    damaged = checkpoint(run) / "model.safetensors"
    cut(damaged)
    argv = [a.replace("RUN", str(run)).replace("TMP", str(tmp_path)) for a in command]
    one_error_line(capsys, main(argv), damaged)
    assert json.loads((run / "eval.json").read_text()) == {"recon": {"mse_per_pixel": 0.05}}  # old results kept
    assert not (tmp_path / "synth").exists() and not (tmp_path / "cmp").exists()


def test_truncated_trainer_state_stops_resume(run, capsys):
    damaged = checkpoint(run) / "trainer_state.pt"
    cut(damaged)
    one_error_line(capsys, main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]), damaged)
    assert checkpoint(run).name == "epoch-0001"


def test_an_older_checkpoint_is_offered_when_there_is_one(run, capsys):
    newer = run / "checkpoints" / "epoch-0002"
    shutil.copytree(checkpoint(run), newer)
    cut(newer / "trainer_state.pt")
    line = one_error_line(capsys, main(["train", "--resume", str(run), "--epochs", "3", "--device", "cpu"]),
                          newer / "trainer_state.pt")
    assert f"resume from the previous checkpoint: remove {newer}" in line


def test_a_cut_metrics_row_stops_resume_naming_the_line(run, capsys):
    damaged = run / "metrics.jsonl"
    text = damaged.read_text()
    damaged.write_text(text + text[: len(text) // 2])  # a second row cut in the middle
    line = one_error_line(capsys, main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]), damaged)
    assert "line 2 of 2" in line and "remove line 2" in line


def test_corrupt_config_yaml_stops_resume(run, capsys):
    damaged = run / "config.yaml"
    text = damaged.read_text()
    damaged.write_text(text[: text.index("\nlatent_dim") + 6])  # cut inside a key: no longer YAML
    line = one_error_line(capsys, main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]), damaged)
    assert "restore it from a copy" in line
    damaged.write_bytes(b"\xff\xfe\x00garbage")  # not text at all
    one_error_line(capsys, main(["train", "--resume", str(run), "--epochs", "2", "--device", "cpu"]), damaged)


@pytest.mark.parametrize("name, command", [("summary.json", "vaelab train --resume"),
                                           ("eval.json", "vaelab evaluate --run")])
def test_truncated_result_json_names_the_command_that_rewrites_it(run, capsys, name, command):
    damaged = run / name
    cut(damaged)
    line = one_error_line(capsys, main(["report", str(run)]), damaged)
    assert f"delete it and rerun `{command} {run}`" in line
    assert not (run / "report.html").exists()


def test_no_traceback_from_the_command_line(run, tmp_path):
    """The installed entry point, as a person runs it: exit 2, one line, no traceback."""
    damaged = checkpoint(run) / "model.safetensors"
    cut(damaged, keep=0.1)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "vaelab", "sample", "--run", str(run), "--n", "4", "--out",
                           str(tmp_path / "s.png"), "--device", "cpu"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vaelab sample: error: ") and str(damaged) in lines[0]


# ---------------------------------------------------------------------------- caches: a warning, then computed again


@pytest.mark.parametrize("suffix", [".safetensors", ".json"])
def test_truncated_sampler_cache_is_fitted_again_with_a_warning(run, tmp_path, capsys, suffix):
    damaged = next((run / "samplers").glob(f"gmm*{suffix}"))
    cut(damaged)
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "s.png"), "--sampler", GMM,
                 "--device", "cpu"]) == 0
    warnings = [line for line in stderr_lines(capsys) if line.startswith("WARNING")]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "fitting the gmm-components2 sampler again" in warnings[0]
    assert (tmp_path / "s.png").is_file()
    from safetensors import safe_open

    with safe_open(str(damaged.with_suffix(".safetensors")), framework="pt") as fh:  # written again, whole
        assert "weights" in set(fh.keys())
    assert json.loads(damaged.with_suffix(".json").read_text())["sampler"] == "gmm"


class PixelFeatures(torch.nn.Module):
    """A cheap feature space for the cache tests: mean pixel value per image row."""

    name, cache_id, num_features = "row means", "row-means|v1", 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), (8, 1)).flatten(1)


def test_damaged_reference_statistics_are_computed_again_with_a_warning(tmp_path, capsys):
    from vaelab.data import load_split
    from vaelab.metrics.reference import cached_values, reference_statistics

    write_mnist(tmp_path, n_train=40, n_test=20)
    split = load_split("mnist", "test", tmp_path)
    first = reference_statistics(PixelFeatures(), split, split_name="test", selection="all")
    assert not first.info["cached"]
    path = Path(first.info["path"])
    cut(path)
    capsys.readouterr()
    again = reference_statistics(PixelFeatures(), split, split_name="test", selection="all")
    warnings = stderr_lines(capsys)
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: ") and str(path) in warnings[0], warnings
    assert "computing the reference statistics again" in warnings[0]
    assert not again.info["cached"] and torch.equal(again.mean, first.mean)
    assert reference_statistics(PixelFeatures(), split, split_name="test", selection="all").info["cached"]

    assert cached_values({"a": 1}, lambda: {"x": 1.0}) == {"x": 1.0, "cached": False}
    values = next((path.parent / "values").glob("*.json"))
    cut(values)
    assert cached_values({"a": 1}, lambda: {"x": 1.0}) == {"x": 1.0, "cached": False}
    assert str(values) in stderr_lines(capsys)[-1]


def test_damaged_evaluator_cache_is_trained_again_with_a_warning(tmp_path, monkeypatch, capsys):
    import vaelab.evaluator as ev

    real = ev.default_recipe
    monkeypatch.setattr(ev, "default_recipe", lambda d: {**real(d), "epochs": 1, "batch_size": 16, "widths": (4, 8)})
    write_mnist(tmp_path, n_train=48, n_test=16)
    _, info = ev.build_evaluator("mnist", data_root=tmp_path)
    folder = ev.evaluator_dir("mnist", ev.load_split("mnist", "train", tmp_path))
    assert not info["cached"] and ev.build_evaluator("mnist", data_root=tmp_path)[1]["cached"]
    for name in ("model.safetensors", "evaluator.json"):
        cut(folder / name)
        capsys.readouterr()
        _, info = ev.build_evaluator("mnist", data_root=tmp_path)
        warnings = [line for line in stderr_lines(capsys) if line.startswith("WARNING")]
        assert not info["cached"] and len(warnings) == 1 and str(folder / name) in warnings[0], warnings
        assert "training the evaluator again" in warnings[0]
        assert ev.build_evaluator("mnist", data_root=tmp_path)[1]["cached"]


def test_damaged_openvino_network_is_converted_again_with_a_warning(tmp_path, monkeypatch, capsys):
    from vaelab.metrics import inception

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = inception.load_inception(engine="openvino")(x)
    (folder,) = inception.cache_dir_of_ir().iterdir()
    cut(folder / "inception.bin")  # the weights of an interrupted copy (a cut .xml fails the same read)
    capsys.readouterr()
    torch.testing.assert_close(inception.load_inception(engine="openvino")(x), before, rtol=0, atol=0)
    warnings = stderr_lines(capsys)
    assert len(warnings) == 1 and str(folder) in warnings[0] and "converting the network again" in warnings[0]


def test_damaged_dataset_cache_is_decoded_again_with_a_warning(tmp_path, capsys):
    from vaelab.data import cache_dir, load_split

    write_mnist(tmp_path, n_train=20, n_test=10)
    first = load_split("mnist", "train", tmp_path)
    path = max((cache_dir() / "datasets").glob("mnist-train-*.safetensors"), key=lambda p: p.stat().st_mtime)
    cut(path)
    capsys.readouterr()
    again = load_split("mnist", "train", tmp_path)
    assert torch.equal(again.images, first.images)
    warnings = stderr_lines(capsys)
    assert len(warnings) == 1 and str(path) in warnings[0] and "decoding the dataset again" in warnings[0]


# ---------------------------------------------------------------------------- studies


@pytest.fixture
def study(tiny_run, tmp_path) -> tuple[Path, Path]:
    """A study whose train stage is the tiny run and whose evaluate stage finished (its eval.json written)."""
    path = tmp_path / "damaged.yaml"
    path.write_text(yaml.safe_dump({
        "name": "damaged", "title": "Damaged files", "question": "Does a damaged file stop the study?",
        "dataset": "mnist",
        "stages": [{"name": "vae", "kind": "train", "config": str(tiny_run / "config.yaml")},
                   {"name": "ev", "kind": "evaluate", "run": "vae", "metrics": ["recon"]}],
        "claims": [{"id": "mse", "claim": "reconstruction MSE", "seed": {"text": "none"},
                    "ours": {"stage": "ev", "key": "recon.mse_per_pixel"}, "verdict": {"rule": "report", "why": "-"}}],
    }))
    out = tmp_path / "study"
    out.mkdir()
    shutil.copytree(tiny_run, out / "vae")
    (out / "ev").mkdir()
    (out / "ev" / "eval.json").write_text(json.dumps({"recon": {"mse_per_pixel": 0.05}}))
    assert main(["study", "run", str(path), "--out", str(out)]) == 0
    assert json.loads((out / "study.json").read_text())["claims"][0]["ours"] == 0.05
    return path, out


def stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("stage, name", [("ev", "eval.json"), ("vae", "summary.json"), ("vae", "config.yaml")])
def test_a_damaged_stage_output_stops_the_study_naming_the_stage(study, capsys, stage, name):
    path, out = study
    damaged = out / stage / name
    cut(damaged)
    before = stamps(out)
    capsys.readouterr()
    line = one_error_line(capsys, main(["study", "run", str(path), "--out", str(out)]), damaged)
    assert line.startswith(f"vaelab study: error: study stage {stage}: ")
    assert f"delete {out / stage} and rerun `vaelab study run {path} --out {out}`, which redoes stage {stage}" in line
    assert stamps(out) == before  # nothing else touched: the other stages stay as they were


def test_a_damaged_run_of_an_earlier_stage_names_both_stages(study, capsys):
    path, out = study
    shutil.rmtree(out / "ev")  # ev runs again and meets vae's damaged weights
    damaged = checkpoint(out / "vae") / "model.safetensors"
    cut(damaged)
    line = one_error_line(capsys, main(["study", "run", str(path), "--out", str(out)]), damaged)
    assert line.startswith("vaelab study: error: study stage ev: ")
    assert f"delete {out / 'vae'} and rerun" in line and "which redoes stage vae, then ev" in line
    assert (out / "vae" / "summary.json").is_file()


def test_study_report_and_the_study_state_file(study, capsys):
    path, out = study
    damaged = out / "ev" / "eval.json"
    cut(damaged)
    line = one_error_line(capsys, main(["study", "report", str(path), "--out", str(out)]), damaged)
    assert f"delete {out / 'ev'} and rerun `vaelab study run" in line
    (out / "ev" / "eval.json").write_text(json.dumps({"recon": {"mse_per_pixel": 0.05}}))
    state = out / "stages.json"
    state.write_text('{"vae": {"kind": "tr')
    line = one_error_line(capsys, main(["study", "run", str(path), "--out", str(out)]), state)
    assert "no stage is redone" in line
    state.unlink()
    plan = out / "study_plan.yaml"
    cut(plan)
    line = one_error_line(capsys, main(["study", "run", str(path), "--out", str(out)]), plan)
    assert "which writes it again from the study file" in line
