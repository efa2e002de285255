"""vaelab compare: a VAE and a DDPM on one tiny dataset, every output written, numbers consistent."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
from fixtures import fake_run, write_image_folder

from vaelab.cli import main
from vaelab.comparison import compare_runs
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.families import family_of
from vaelab.metrics.speed import time_generation
from vaelab.models import build_config, build_model, count_parameters
from vaelab.training import train


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A 3-class 8x8 gray image folder, 20 train and 20 test images per class."""
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root, classes=("c0", "c1", "c2"), per_class=20, size=8, channels=1)
    return root


@pytest.fixture(scope="module")
def two_runs(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    common = dict(dataset="imagefolder", data_root=str(image_folder), epochs=1, batch_size=16, device="cpu")
    vae = train(TrainConfig(model="conv", latent_dim=3, recon_likelihood="bernoulli", out=str(out / "vae"),
                            model_args={"channels": [4, 8], "fc_hidden": 16}, **common))
    ddpm = train(TrainConfig(model="ddpm", out=str(out / "ddpm"), **common,
                             model_args={"widths": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
                                         "num_train_timesteps": 20}))
    return vae, ddpm


def test_compare_writes_all_outputs_with_consistent_numbers(two_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    vae, ddpm = two_runs
    out = compare_runs([vae, ddpm], out=tmp_path / "cmp", num_samples=40, ddpm_num_samples=30, ddim_steps=5,
                       iwae_k=4, nll_subset=10, timing_repeats=2, timing_max_steps=10, device="cpu",
                       fid_features="classifier")  # Inception's default is tested in test_evaluation.py
    for name in ("comparison.md", "comparison.json", "compare_samples.png", "confidence_hist.png"):
        assert (out / name).stat().st_size > 0, name
    # the entries were evaluated into the comparison's folder: the runs' own eval.json and pictures are untouched
    assert not any((r / n).exists() for r in (vae, ddpm) for n in ("eval.json", "eval_samples.png", "confidence_hist.png"))
    assert not (out / ".evaluation").exists()
    report = json.loads((out / "comparison.json").read_text())
    md = (out / "comparison.md").read_text()
    entries = report["entries"]
    # a VAE gives its prior and the two aggregated-posterior samplers (fitted on its train split), a DDPM four chains
    assert [(e["family"], e["sampler"]["sampler"], e["network_evaluations"]) for e in entries] == [
        ("vae", "prior", 1), ("vae", "gmm", 1), ("vae", "two-stage", 2), ("ddpm", "ddpm", 20), ("ddpm", "ddim", 5),
        ("ddpm", "dpmsolver++", 20), ("ddpm", "sde-dpmsolver++", 20)]
    assert entries[3]["sampler"] == {"sampler": "ddpm", "steps": 20} and entries[1]["sampler"]["components"] == 10
    assert (vae / "samplers" / "gmm.json").is_file() and (vae / "samplers" / "two-stage.json").is_file()
    ddpm_model = build_model(build_config("ddpm", data_shape=(1, 8, 8), widths=(8, 16), layers_per_block=1,
                                          norm_num_groups=4, num_train_timesteps=20))
    assert entries[3]["parameters"] == entries[4]["parameters"] == entries[5]["parameters"] == count_parameters(ddpm_model)
    assert entries[0]["parameters"] == entries[1]["parameters"] == entries[2]["parameters"]  # the same VAE
    assert count_parameters(ddpm_model) == sum(p.numel() for p in ddpm_model.unet.parameters())  # EMA copy not counted
    for e in entries:
        assert e["label"] in md
        ev = e["evaluation"]
        # the metrics are evaluate_run's, with the sample counts and sampler asked for
        assert ev["settings"]["num_samples"] == (30 if e["sampler"]["sampler"] == "ddpm" else 40)
        assert ev["settings"]["sampler"] == e["sampler"]
        assert "speed" not in ev and "fid" in ev and "confidence" in ev
        assert f"{ev['confidence']['generated']['mean_max_prob']:.3f}" in md
        assert sum(ev["confidence"]["generated"]["max_prob_histogram"]) == ev["settings"]["num_samples"]
        assert (out / e["pictures"]["samples"]).is_file() and (out / e["pictures"]["confidence"]).is_file()
        for n in ("150", "1000"):
            t = e["generation_time"][n]
            assert len(t["runs_s"]) == 2 and t["samples_per_s"] == pytest.approx(int(n) / t["seconds"])
            long = e["network_evaluations"] > 10  # 20 steps timed on 10
            assert t["seconds"] == pytest.approx(statistics.median(t["runs_s"]) * (2.0 if long else 1.0))
            assert t["method"].startswith("extrapolated") == long
        train_rows = [json.loads(line) for line in (e["run"] and open(f"{e['run']}/metrics.jsonl"))]
        assert e["training"]["epoch_time_s"] == pytest.approx(train_rows[0]["epoch_time_s"])
        assert e["training"]["train_cpu_time_s"] == pytest.approx(sum(r["epoch_cpu_time_s"] for r in train_rows))
    assert "recon" in entries[0]["evaluation"] and "recon" in entries[3]["evaluation"]["not_applicable"]
    assert "- n/a, recon of ddpm (DDPM, DDPM, 20 steps), ddpm (DDPM, DDIM, 5 steps), ddpm (DDPM, DPM-Solver++, 20 steps), " \
           "ddpm (DDPM, SDE-DPM-Solver++, 20 steps): " \
           "the model has no encoder" in md and "z in R^3" in md and "| network passes per image | 1 | 1 | 2 | 20 | 5 |" in md
    # the DDPM entry's numbers differ from the DDIM entry's: two separate evaluations
    assert entries[1]["evaluation"]["fid"]["value"] != entries[2]["evaluation"]["fid"]["value"]


def test_compare_without_sample_metrics_writes_no_sample_picture(two_runs, tmp_path, monkeypatch):
    """--metrics recon,nll draws no samples: no compare_samples.png, and comparison.md names only what exists."""
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    out = compare_runs(list(two_runs), out=tmp_path / "cmp", metrics=["recon", "nll"], iwae_k=2, nll_subset=5, ddim_steps=5,
                       timing_repeats=1, timing_max_steps=2, device="cpu")
    report = json.loads((out / "comparison.json").read_text())
    assert all("samples" not in e["pictures"] for e in report["entries"])
    assert "recon" in report["entries"][0]["evaluation"] and "recon" in report["entries"][3]["evaluation"]["not_applicable"]
    assert not (out / "compare_samples.png").exists() and "compare_samples.png" not in (out / "comparison.md").read_text()


def test_interrupted_compare_resumes_at_the_first_unfinished_entry(two_runs, tmp_path, monkeypatch, capsys):
    """An interruption keeps the finished entries; the same call again evaluates only the rest, and other
    settings discard them (a resumed comparison never mixes settings)."""
    import vaelab.evaluation

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    real, calls = vaelab.evaluation.evaluate_run, []

    def counted(*args, **kw):
        calls.append(kw.get("sampler"))
        if len(calls) == 2 and interrupt:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(vaelab.evaluation, "evaluate_run", counted)
    args = dict(metrics=["recon", "nll"], iwae_k=2, nll_subset=5, ddim_steps=5, timing_repeats=1, timing_max_steps=2,
                device="cpu", use_cache=False)  # the entry cache is tested below
    out, partial = tmp_path / "cmp", tmp_path / ".cmp.partial"
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        compare_runs(list(two_runs), out=out, **args)
    assert not out.exists() and len(list(partial.glob("entry_*.json"))) == 1
    interrupt, calls[:] = False, []
    compare_runs(list(two_runs), out=out, **args)
    report = json.loads((out / "comparison.json").read_text())
    assert len(calls) == len(report["entries"]) - 1 >= 3  # the first entry was not evaluated again
    assert not partial.exists() and not list(out.glob("entry_*.json")) and not (out / "key.json").exists()

    interrupt, calls[:] = True, []
    with pytest.raises(KeyboardInterrupt):
        compare_runs(list(two_runs), out=tmp_path / "cmp2", **args)
    interrupt, calls[:] = False, []
    capsys.readouterr()
    compare_runs(list(two_runs), out=tmp_path / "cmp2", **{**args, "iwae_k": 3})
    assert len(calls) == len(report["entries"])  # other settings: the kept entry was discarded, and said so
    assert "other settings or other weights; discarding them" in capsys.readouterr().err


def test_compare_takes_entries_of_the_same_weights_from_an_earlier_comparison(two_runs, tmp_path, monkeypatch, capsys):
    """A second comparison of the same weights (here a copied run folder) with the same settings takes the
    entries an earlier one measured, keeps only the metrics it asked for and says where they came from; a
    metric not measured before, other weights, a damaged cache file or use_cache=False measure again."""
    import shutil

    import vaelab.evaluation

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    real, calls = vaelab.evaluation.evaluate_run, []
    monkeypatch.setattr(vaelab.evaluation, "evaluate_run", lambda *a, **kw: calls.append(kw["sampler"]) or real(*a, **kw))
    vae, ddpm = two_runs
    args = dict(iwae_k=2, nll_subset=5, ddim_steps=5, timing_repeats=1, timing_max_steps=2, device="cpu")
    first = json.loads((compare_runs([vae, ddpm], out=tmp_path / "a", metrics=["recon", "nll"], **args)
                        / "comparison.json").read_text())
    assert len(calls) == len(first["entries"]) == 7 and all(len(e["weights_sha256"]) == 64 for e in first["entries"])

    copy = tmp_path / "copied" / "vae"  # the same weights in another folder (another study)
    shutil.copytree(vae, copy)
    calls[:] = []
    out = compare_runs([copy, ddpm], out=tmp_path / "b", metrics=["recon"], **args)
    second = json.loads((out / "comparison.json").read_text())
    assert calls == []
    for old, new in zip(first["entries"], second["entries"]):
        assert new["reused_from"]["comparison"] == str(tmp_path / "a")
        assert new["generation_time"] == old["generation_time"]
        assert new["evaluation"]["settings"]["metrics"] == ["recon"] and "nll" not in new["evaluation"]
        assert new["evaluation"].get("recon") == old["evaluation"].get("recon")
    assert second["entries"][0]["label"].startswith("vae (VAE") and second["entries"][0]["run"] == str(copy)
    assert "taken from the entry cache" in (out / "comparison.md").read_text()
    assert not second["settings"]["retime"] and "--retime times them all" in (out / "comparison.md").read_text()

    # --retime: the evaluations still come from the cache, the times are measured again, all in this process
    import vaelab.comparison
    timed = []
    real_timing = vaelab.comparison.time_generation
    monkeypatch.setattr(vaelab.comparison, "time_generation",
                        lambda model, sampler, n, **kw: timed.append((sampler.label, n)) or real_timing(model, sampler, n, **kw))
    out = compare_runs([vae, ddpm], out=tmp_path / "retimed", metrics=["recon"], retime=True, **args)
    retimed = json.loads((out / "comparison.json").read_text())
    assert calls == [] and retimed["settings"]["retime"]
    assert [n for _, n in timed] == [150, 1000] * 7  # every entry, both sizes, once
    for old, new in zip(first["entries"], retimed["entries"]):
        assert new["reused_from"] and new["generation_time"]["150"]["runs_s"] != old["generation_time"]["150"]["runs_s"]
    assert "timed again after all were evaluated" in (out / "comparison.md").read_text()
    monkeypatch.setattr(vaelab.comparison, "time_generation", real_timing)

    calls[:] = []  # a metric the cached entries lack: measured again
    compare_runs([vae, ddpm], out=tmp_path / "c", metrics=["recon", "latent"], **args)
    assert len(calls) == 7
    calls[:] = []
    compare_runs([vae, ddpm], out=tmp_path / "d", metrics=["recon"], use_cache=False, **args)
    assert len(calls) == 7

    damaged = next((tmp_path / "cache" / "comparison-entries").glob("*/entry.json"))
    damaged.write_text(damaged.read_text()[:50])
    calls[:] = []
    capsys.readouterr()
    compare_runs([vae, ddpm], out=tmp_path / "e", metrics=["recon"], **args)
    assert len(calls) == 1 and str(damaged) in capsys.readouterr().err

    from safetensors.torch import load_file, save_file
    weights = copy / "checkpoints" / "epoch-0001" / "model.safetensors"
    save_file({k: v + 0.01 for k, v in load_file(str(weights)).items()}, str(weights))
    calls[:] = []
    compare_runs([copy, ddpm], out=tmp_path / "f", metrics=["recon"], **args)
    assert calls == ["prior", "gmm", "two-stage"]  # other weights: the VAE's entries measured, the DDPM's taken


def test_time_generation_counts_one_batch_per_call():
    model = build_model(build_config("ddpm", data_shape=(1, 8, 8), widths=(8, 16), layers_per_block=1,
                                     norm_num_groups=4, num_train_timesteps=12)).eval()
    calls = []
    model.ema_unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    t = time_generation(model, family_of(model).sampler(model, sampler="ddpm"), 7, repeats=3, max_steps=4)
    assert calls == [7] * 4 * 4  # warm-up + 3 runs, 4 of the 12 steps each, one batch of 7
    assert t["method"].startswith("extrapolated") and t["batch_size"] == 7


def test_generation_speed_benchmark_times_each_comparison_sampler_of_the_runs(two_runs, capsys):
    spec = importlib.util.spec_from_file_location("generation_speed",
                                                  Path(__file__).parents[1] / "benchmarks" / "generation_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    vae, ddpm = two_runs
    bench.main(["--run", str(vae), "--run", str(ddpm), "--device", "cpu", "--n", "3", "--ddim-steps", "5",
                "--max-steps", "5", "--repeats", "1"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith(("| vae ", "| ddpm "))]
    # the same entries as a comparison of the two runs, in its order, each with a time and how it was taken
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("| vae", "prior", "1"), ("| vae", "gmm", "1"), ("| vae", "two-stage", "2"), ("| ddpm", "DDPM, 20 steps", "20"),
        ("| ddpm", "DDIM, 5 steps", "5"), ("| ddpm", "DPM-Solver++, 20 steps", "20"),
        ("| ddpm", "SDE-DPM-Solver++, 20 steps", "20")]
    assert all(float(r[4]) > 0 for r in rows)
    assert rows[3][5].startswith("extrapolated") and rows[4][5].startswith("median")


def test_compare_samples_wraps_many_entries_into_rows(tmp_path):
    from PIL import Image

    from vaelab.plots import compare_samples

    grids = []
    for i in range(7):
        grids.append(tmp_path / f"g{i}.png")
        Image.new("L", (40, 40), 30 * i).save(grids[-1])
    compare_samples(grids, [f"entry {i}" for i in range(7)], tmp_path / "few.png")
    width, height = Image.open(tmp_path / "few.png").size
    assert 1.8 < width / height < 2.8  # two rows of at most five panels, not one row of seven (ratio ~6.5)
    compare_samples(grids[:2], ["a", "b"], tmp_path / "two.png")
    width, height = Image.open(tmp_path / "two.png").size
    assert 1.6 < width / height < 2.0  # one row of two


def test_compare_bad_input_is_refused_before_any_work(tmp_path):
    tiny_ddpm = {"widths": (8, 16), "norm_num_groups": 4}
    a = fake_run(tmp_path / "a", "mnist", "mnist-small")
    b = fake_run(tmp_path / "b", "fashion-mnist", "ddpm-28", **tiny_ddpm)
    with pytest.raises(ConfigError, match="different datasets: .*mnist.*fashion-mnist.*--allow-mixed"):
        compare_runs([a, b], out=tmp_path / "cmp")
    with pytest.raises(ConfigError, match="at least two run folders"):
        compare_runs([a], out=tmp_path / "cmp")
    c = fake_run(tmp_path / "c", "mnist", "ddpm-28", **tiny_ddpm)
    with pytest.raises(ConfigError, match=r"ddim steps must be an integer in \[1, 1000\]"):
        compare_runs([a, c], out=tmp_path / "cmp", ddim_steps=1001, device="cpu")
    with pytest.raises(ConfigError, match="num_samples must be a positive integer"):
        compare_runs([a, c], out=tmp_path / "cmp", num_samples=0)
    for bad, message in (({"metrics": ""}, "unknown metric"), ({"fid_features": "incepshun"}, "incepshun"),
                         ({"feature_precision": "fp8"}, "'fp8'"), ({"inception_engine": "onnx"}, "'onnx'")):
        with pytest.raises(ConfigError, match=message):
            compare_runs([a, c], out=tmp_path / "cmp", **bad)
    assert not (tmp_path / "cmp").exists()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2


def test_compare_never_deletes_an_existing_folder(tmp_path):
    a = fake_run(tmp_path / "a", "mnist", "mnist-small")
    b = fake_run(tmp_path / "b", "mnist", "mnist-small")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "comparison.json").write_text("{}")  # looks like an old comparison, but compare did not write it now
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(ConfigError, match="already exists"):
        compare_runs([a, b], out=out, device="cpu")
    assert (out / "notes.txt").read_text() == "my notes" and (out / "comparison.json").read_text() == "{}"
