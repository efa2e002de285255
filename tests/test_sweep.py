"""Sweeps: grid expansion, bad input, resumability, the sweep files (tiny runs on a real MNIST slice)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import vaelab.training
from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError, VaelabError
from vaelab.sweep import expand_grid, parse_axes, parse_set, plan_sweep, point_name, run_sweep


REPO = Path(__file__).resolve().parents[1]


def tiny_base(**over) -> TrainConfig:
    values = dict(dataset="mnist", data_root=str(REPO.parent / "shared" / "datasets"), train_subset=300, test_subset=200, epochs=1, batch_size=64, log_every=100,
                  tensorboard=False, device="cpu")
    return TrainConfig(**{**values, **over})


# ---------------------------------------------------------------------------- grid


def test_parse_set_types():
    assert parse_set("latent_dim=64,128, 256") == ("latent_dim", [64, 128, 256])
    assert parse_set("lr=1e-3,0.01") == ("lr", [0.001, 0.01])
    assert parse_set("augment=true,false") == ("augment", [True, False])
    assert parse_set("latent-dim=8") == ("latent_dim", [8])  # CLI spelling accepted
    assert parse_set("recon_likelihood=bernoulli,gaussian") == ("recon_likelihood", ["bernoulli", "gaussian"])


def test_expand_grid_is_the_cartesian_product_first_axis_slowest():
    axes = parse_axes(["latent_dim=64,128", "beta=1,4,8"])
    grid = expand_grid(axes)
    assert len(grid) == 6
    assert grid[:3] == [{"latent_dim": 64, "beta": 1}, {"latent_dim": 64, "beta": 4}, {"latent_dim": 64, "beta": 8}]
    assert grid[-1] == {"latent_dim": 128, "beta": 8}
    assert len({point_name(v) for v in grid}) == 6
    assert point_name(grid[1]) == "latent_dim=64_beta=4"


@pytest.mark.parametrize("spec, words", [
    ("latnt_dim=1,2", ["latnt_dim", "unknown sweep key"]),
    ("latent_dim=", ["empty value list", "latent_dim"]),
    ("latent_dim= , ,", ["empty value list"]),
    ("latent_dim", ["KEY=V1,V2"]),
    ("out=a,b", ["cannot be swept"]),
    ("beta=1,1", ["repeated value"]),
])
def test_bad_set_is_named(spec, words):
    with pytest.raises(ConfigError) as exc:
        parse_set(spec)
    for w in words:
        assert w in str(exc.value)


def test_bad_axes():
    with pytest.raises(ConfigError, match="at least one --set"):
        parse_axes([])
    with pytest.raises(ConfigError, match="already swept"):
        parse_axes(["beta=1,2", "beta=3"])


def test_invalid_point_value_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="sweep point latent_dim=0"):
        plan_sweep(tiny_base(), {"latent_dim": [4, 0]}, tmp_path / "sweep")
    with pytest.raises(ConfigError, match="latent_dim=0"):
        run_sweep(tiny_base(), {"latent_dim": [4, 0]}, out=tmp_path / "sweep", evaluate=False)
    assert not (tmp_path / "sweep").exists()


def test_cli_unknown_key_exit_code(tmp_path, capsys):
    assert main(["sweep", "--set", "latnt_dim=1,2", "--out", str(tmp_path / "s")]) == 2
    assert "unknown sweep key 'latnt_dim'" in capsys.readouterr().err


def test_cli_sweep_runs_and_evaluates_with_its_metrics(tmp_path, capsys, shared_datasets):
    out, config = tmp_path / "s", tmp_path / "base.yaml"
    config.write_text("dataset: mnist\ntest_subset: 200\nbatch_size: 64\n")
    base = ["sweep", "--config", str(config), "--data-root", str(REPO.parent / "shared" / "datasets"), "--epochs", "1",
            "--train-subset", "200", "--device", "cpu", "--no-tensorboard", "--set", "latent_dim=2,3", "--out", str(out)]
    assert main([*base, "--metrics", "latnt"]) == 2
    assert "latnt" in capsys.readouterr().err and not (out / "runs").exists()  # refused before training
    assert main([*base, "--metrics", "latent"]) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [len(p["kl_per_dim_nats"]) for p in sweep["points"]] == [2, 3] and (out / "report.html").is_file()


# ---------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, shared_datasets):
    out = tmp_path_factory.mktemp("sweep") / "latent"
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, evaluate=False)
    return out


def test_sweep_writes_a_run_per_point_and_the_tables(finished_sweep):
    sweep = json.loads((finished_sweep / "sweep.json").read_text())
    assert [p["name"] for p in sweep["points"]] == ["latent_dim=2", "latent_dim=6"]
    assert sweep["dataset"] == "MNIST" or "MNIST" in sweep["dataset"]
    for p in sweep["points"]:
        run = finished_sweep / p["run_dir"]
        assert (run / "summary.json").is_file() and (run / "samples.png").is_file()
        assert not (run / "tb").exists()  # tensorboard=False in the base config
        assert (finished_sweep / p["samples"]).is_file()
        m = p["metrics"]
        assert m["latent_dim"] == p["values"]["latent_dim"]
        assert 0 < m["recon_mse"] < 1 and m["kl"] >= 0 and m["neg_elbo"] > m["kl"]
        assert 0 <= m["active_units"] <= m["latent_dim"]
        assert m["fid"] is None  # evaluation skipped
    params = [p["metrics"]["parameters"] for p in sweep["points"]]
    assert params[1] > params[0]  # a wider latent adds encoder/decoder weights
    md = (finished_sweep / "sweep.md").read_text()
    assert "| latent_dim | recon MSE / pixel" in md and md.count("\n| ") == 3
    assert (finished_sweep / "sweep_curves.png").stat().st_size > 1000


def test_resume_skips_finished_points(finished_sweep, monkeypatch):
    calls = []
    real_train = vaelab.training.train
    monkeypatch.setattr(vaelab.training, "train", lambda config, **kw: calls.append(config.out) or real_train(config, **kw))
    before = (finished_sweep / "runs/latent_dim=2/summary.json").stat().st_mtime_ns
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=finished_sweep, evaluate=False)
    assert calls == []
    assert (finished_sweep / "runs/latent_dim=2/summary.json").stat().st_mtime_ns == before
    # an unfinished point (no summary) is trained again, the finished one is not
    (finished_sweep / "runs/latent_dim=6/summary.json").unlink()
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=finished_sweep, evaluate=False)
    assert calls == [str(finished_sweep / "runs/latent_dim=6")]
    assert (finished_sweep / "runs/latent_dim=2/summary.json").stat().st_mtime_ns == before


def test_a_different_sweep_in_the_same_folder_is_refused(finished_sweep):
    with pytest.raises(VaelabError, match="holds a different sweep"):
        run_sweep(tiny_base(), {"latent_dim": [2, 8]}, out=finished_sweep, evaluate=False)


def test_a_run_copied_in_as_a_point_must_have_the_points_settings(finished_sweep, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    shutil.copytree(finished_sweep, out)
    calls = []
    monkeypatch.setattr(vaelab.training, "train", lambda config, **kw: calls.append(config.out))
    # finished runs of the same settings copied in (as a user reuses a training): kept, not trained again
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, evaluate=False)
    assert calls == []
    # a latent-2 run where the latent-6 point belongs: refused by name before any training
    shutil.rmtree(out / "runs/latent_dim=6")
    shutil.copytree(out / "runs/latent_dim=2", out / "runs/latent_dim=6")
    with pytest.raises(ConfigError, match=r"latent_dim=6 holds a run with other settings \(latent_dim: 2 vs 6\)"):
        run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, evaluate=False)
    assert calls == []


def test_jobs_run_points_as_separate_processes(tmp_path, shared_datasets):
    out = run_sweep(tiny_base(train_subset=200), {"beta": [1, 2]}, out=tmp_path / "jobs", jobs=2, evaluate=False)
    sweep = json.loads((out / "sweep.json").read_text())
    assert len(sweep["points"]) == 2
    for p in sweep["points"]:
        assert "training mnist-small" in (out / "logs" / f"{p['name']}.log").read_text()


def test_evaluation_fills_the_fid_column(finished_sweep, monkeypatch):
    """The sweep calls ``evaluate_run`` for points without ``eval.json`` and reads FID and its feature space back."""
    import vaelab.evaluation

    calls = []

    def fake_evaluate_run(run_dir, *, metrics, fid_features, inception_weights, num_samples, device, sampler=None, steps=None):
        calls.append((run_dir.name, metrics, fid_features, num_samples))
        fid = {"metric": "FID", "value": 10.0 * len(calls), "feature_space": "test features", "num_samples": num_samples,
               "floor": {"value": 1.5}}
        settings = {"metrics": metrics, "num_samples": num_samples, "fid_features": ["test"], "sampler": {"sampler": "prior"}}
        (run_dir / "eval.json").write_text(json.dumps({"fid": fid, "split": "test", "settings": settings}))

    monkeypatch.setattr(vaelab.evaluation, "evaluate_run", fake_evaluate_run)
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=finished_sweep, evaluate=True, num_samples=123)
    assert calls == [("latent_dim=2", ["fid"], None, 123), ("latent_dim=6", ["fid"], None, 123)]  # None: the default spaces
    sweep = json.loads((finished_sweep / "sweep.json").read_text())
    assert [p["metrics"]["fid"] for p in sweep["points"]] == [10.0, 20.0]
    assert sweep["points"][0]["metrics"]["fid_floor"] == 1.5
    assert "FID [test features] (123 samples vs test)" in (finished_sweep / "sweep.md").read_text()
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=finished_sweep, evaluate=True, num_samples=123)
    assert len(calls) == 2  # evaluated points are not evaluated again
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=finished_sweep, evaluate=True, num_samples=99)
    assert len(calls) == 4 and calls[-1][3] == 99  # another N: the earlier eval.json does not answer it


def test_latent_metric_draws_every_points_kl_per_dimension(finished_sweep, tmp_path):
    """With ``metrics=["latent"]`` each point's per-dimension test KL lands in sweep.json and one picture."""
    import shutil

    out = tmp_path / "latent"
    shutil.copytree(finished_sweep, out)
    for stale in out.glob("runs/*/eval.json"):
        stale.unlink()
    with pytest.raises(ConfigError, match="sweep metrics.*'likelihood'"):
        run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, metrics=["latent", "likelihood"])
    with pytest.raises(ConfigError, match="incepshun"):
        run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, metrics=["fid"], fid_features="incepshun")
    assert not list(out.glob("runs/*/eval.json"))  # refused before any evaluation
    run_sweep(tiny_base(), {"latent_dim": [2, 6]}, out=out, metrics=["latent"])
    sweep = json.loads((out / "sweep.json").read_text())
    for p, d in zip(sweep["points"], (2, 6)):
        latent = json.loads((out / p["run_dir"] / "eval.json").read_text())["latent"]
        assert len(p["kl_per_dim_nats"]) == d and sum(p["kl_per_dim_nats"]) == pytest.approx(latent["kl_nats"])
        assert min(p["kl_per_dim_nats"]) >= 0
    assert sweep["kl_per_dim_picture"] == "sweep_kl_per_dim.png" and (out / "sweep_kl_per_dim.png").stat().st_size > 1000
    assert not (finished_sweep / "sweep_kl_per_dim.png").exists()  # FID-only sweeps draw no KL picture


def test_a_ddpm_sweep_finishes_with_its_table_and_report(tmp_path, monkeypatch):
    """A sweep over a diffusion preset: its own columns (eps-MSE), FID of DDIM samples, a report with DDPM captions."""
    from vaelab.reports import write_report

    base = tiny_base(model="ddpm-28", train_subset=128, test_subset=64,
                     model_args={"widths": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_train_timesteps": 10})
    import vaelab.evaluator

    real_recipe = vaelab.evaluator.default_recipe
    monkeypatch.setattr(vaelab.evaluator, "default_recipe",
                        lambda d: {**real_recipe(d), "epochs": 1, "widths": (4, 8)})  # a tiny evaluator for speed
    out = run_sweep(base, {"lr": [1e-3, 2e-3]}, out=tmp_path / "ddpm", num_samples=32, sampler="ddim", steps=3,
                    fid_features="classifier")
    sweep = json.loads((out / "sweep.json").read_text())
    assert [c["key"] for c in sweep["columns"]][:3] == ["lr", "eps_mse", "fid"]
    for p in sweep["points"]:
        assert p["metrics"]["eps_mse"] > 0 and p["metrics"]["fid"] is not None and p["sampler"] == {"sampler": "ddim", "steps": 3}
    md = (out / "sweep.md").read_text()
    assert "| lr | test eps-MSE | FID" in md and md.count("\n| ") == 3
    page = write_report(out).read_text()
    assert "One sample of the full T-step DDPM sampler" in page  # a DDPM point's own captions
    assert "Samples from the prior" not in page and "no caption for this file name" not in page
