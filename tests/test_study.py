"""Studies: the shipped study files validate, a study runs end to end at a tiny budget on real MNIST,
and an interrupted study resumes, skipping the stages that finished."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import vaelab.study as study_module
from vaelab.errors import ConfigError
from vaelab.study import load_study, run_study, verdict

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.yaml"))


def test_the_study_files_ship_and_validate():
    assert len(STUDIES) == 8
    for path in STUDIES:
        study = load_study(path)
        assert study.claims and study.stages
        for budget in study.budgets:
            load_study(path, budget=budget)


def test_bad_study_files_are_refused_before_any_work(tmp_path):
    bad = {
        "stages: [{name: a, kind: bake}]": "unknown kind 'bake'",
        "stages: [{name: a, kind: synth, run: b}]": "'run: b' names no earlier stage",
        "stages: [{name: a, kind: train, set: {epochs: 0}}]": "epochs must be a positive integer",
        "stages: [{name: a, kind: train, colour: red}]": "unknown key\\(s\\) colour",
        "stages: [{name: a, kind: train}, {name: b, kind: compare, runs: [a], retime: 'false'}]":
            "'retime' must be true or false, got 'false'",
    }
    for stages, message in bad.items():
        path = tmp_path / "s.yaml"
        path.write_text(f"name: s\n{stages}\nclaims: []\n")
        with pytest.raises(ConfigError, match=message):
            load_study(path)
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        load_study(REPO / "studies" / "mnist-fid.yaml", budget="huge")
    claims = {  # claims that could only fail when the verdict is computed, after every stage: refused up front
        "{id: c, claim: x, seed: {text: t}, ours: {stage: a, key: k}, verdict: {rule: within, tolerance: 1}}":
            "rule 'within' needs the seed's number as seed.value",
        "{id: c, claim: x, seed: {value: 2}, ours: {stage: a, key: k}, verdict: {rule: within}}":
            "rule 'within' needs verdict.tolerance, a number >= 0; got None",
        "{id: c, claim: x, seed: {value: 2}, ours: {stage: a, key: k}, verdict: {rule: at_least, tolerance: -1}}":
            "got -1",
    }
    for claim, message in claims.items():
        path.write_text(f"name: s\nstages: [{{name: a, kind: train}}]\nclaims: [{claim}]\n")
        with pytest.raises(ConfigError, match=message):
            load_study(path)


def test_verdict_rules():
    within = {"verdict": {"rule": "within", "tolerance": 3}, "seed": {"value": 72.0}}
    assert verdict(within, 70.5, None, "full")[0] == "reproduced"
    assert verdict(within, 29.7, None, "full")[0] == "not reproduced"
    assert verdict(within, 70.5, None, "quick") == ("not comparable", "run at budget 'quick', not the seed's")
    report = {"verdict": {"rule": "report"}, "seed": {"text": "not in the seed"}}
    assert verdict(report, 3.0, None, "quick") == ("reported", "the seed gives no number to compare with; "
                                                               "measured at budget 'quick'")
    assert verdict({**report, "seed": {"value": 2.0}}, 3.0, None, "quick")[0] == "not comparable"
    assert verdict(within, None, None, "full")[0] == "not measured"
    order = {"verdict": {"rule": "order", "seed_order": "greater"}, "seed": {}}
    assert verdict(order, 30.0, 68.0, "full")[0] == "not reproduced"
    assert verdict(order, 71.0, 68.0, "full")[0] == "reproduced"
    assert verdict({**within, "not_comparable": "GPU vs CPU"}, 1.0, None, "full") == ("not comparable", "GPU vs CPU")


def test_a_budget_makes_only_the_claims_it_changes_not_comparable(tmp_path):
    from vaelab.study import budget_changes

    path = tmp_path / "s.yaml"
    path.write_text("name: s\nstages:\n"
                    "  - {name: vae, kind: train}\n"
                    "  - {name: syn, kind: synth, run: vae, per_class: 10}\n"
                    "  - {name: cas, kind: cas, synthetic: syn}\n"
                    "  - {name: ev, kind: evaluate, run: vae}\n"
                    "claims: []\n"
                    "budgets: {smaller-eval: {evaluate: {num_samples: 100}}, smaller-synth: {synth: {per_class: 5}}}\n")
    study = load_study(path, budget="smaller-eval")
    assert [budget_changes(study, n) for n in ("vae", "syn", "cas", "ev")] == [False, False, False, True]
    study = load_study(path, budget="smaller-synth")
    assert [budget_changes(study, n) for n in ("vae", "syn", "cas", "ev")] == [False, True, True, False]
    assert not any(budget_changes(load_study(path), n) for n in ("vae", "syn", "cas", "ev"))


def test_mnist_study_end_to_end_then_an_interruption_resumes(tmp_path, monkeypatch, in_repo):
    """The shipped MNIST study at its tiny budget; the first attempt dies in the first evaluation stage."""
    import vaelab.evaluator

    real_recipe = vaelab.evaluator.default_recipe
    monkeypatch.setattr(vaelab.evaluator, "default_recipe", lambda d: {**real_recipe(d), "epochs": 1, "widths": (4, 8)})
    out = tmp_path / "study"
    real_evaluate = study_module.STAGES["evaluate"]

    def dying(study, stage, out, machine):
        (out / stage["name"]).mkdir()  # killed part-way: the stage folder exists, its result does not
        raise KeyboardInterrupt("interrupted")

    monkeypatch.setitem(study_module.STAGES, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_study(REPO / "studies" / "mnist-fid.yaml", budget="tiny", out=out, device="cpu")
    finished = {p.parent.name for p in out.glob("*/summary.json")}
    assert finished == {"vae", "cvae"} and not (out / "study.json").exists()
    stamps = {name: (out / name / "summary.json").stat().st_mtime_ns for name in finished}
    # the claims so far: none of the evaluations has finished
    from vaelab.study import report_study

    report_study(REPO / "studies" / "mnist-fid.yaml", budget="tiny", out=out)
    partial = json.loads((out / "study.json").read_text())
    assert {c["verdict"] for c in partial["claims"]} == {"not measured"}
    assert "- `eval-vae` (evaluate): not finished" in (out / "study.md").read_text()
    (out / "study.json").unlink()

    calls = []
    monkeypatch.setitem(study_module.STAGES, "evaluate", lambda *a, **k: calls.append(a[1]["name"]) or real_evaluate(*a, **k))
    run_study(REPO / "studies" / "mnist-fid.yaml", budget="tiny", out=out, device="cpu")
    assert calls == ["eval-vae", "eval-vae-gmm", "eval-cvae"]  # the trained stages were skipped
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in finished} == stamps
    report = json.loads((out / "study.json").read_text())
    assert report["budget"] == "tiny" and len(report["claims"]) == 4
    by_id = {c["id"]: c for c in report["claims"]}
    assert by_id["vae-fid"]["ours"] > 0 and by_id["cvae-fid-class-3"]["ours"] > 0
    # a tiny budget is not the seed's; claims with no seed number to compare are reported, with the budget named
    assert {i: c["verdict"] for i, c in by_id.items()} == {
        "vae-fid": "not comparable", "vae-fid-gmm": "reported", "cvae-fid-class-3": "not comparable",
        "cvae-fid": "reported"}
    assert by_id["vae-fid-gmm"]["why"].endswith("; measured at budget 'tiny'")
    md = (out / "study.md").read_text()
    assert "| A 20-epoch MNIST VAE" in md and "45.93" in md and "budget **tiny**" in md
    # the interrupted stage's time covers its last run only, and says so; the others ran once
    stages = json.loads((out / "stages.json").read_text())
    assert {n: s["resumed"] for n, s in stages.items()} == {
        "vae": False, "cvae": False, "eval-vae": True, "eval-vae-gmm": False, "eval-cvae": False}
    assert re.search(r"- `eval-vae` \(evaluate\): \d+ s \(its last run only: it resumed an interrupted one\)", md)
    assert re.search(r"- `vae` \(train\): \d+ s\n", md)
    assert (out / "report.html").is_file()
    # a third run has nothing left to do; another budget in the same folder is refused
    calls.clear()
    run_study(REPO / "studies" / "mnist-fid.yaml", budget="tiny", out=out, device="cpu")
    assert calls == []
    with pytest.raises(ConfigError, match="holds another study plan"):
        run_study(REPO / "studies" / "mnist-fid.yaml", budget="quick", out=out, device="cpu")


SHAPES_STUDY = (
    "name: s\nstages:\n"
    "  - {name: shapes, kind: data, generator: shapes, image_size: 16, scales: 2, orientations: 3, positions: 3,"
    " test_fraction: 0.3}\n"
    "  - {name: vae, kind: train, data: shapes, set: {model: conv, latent_dim: 3, epochs: 1, batch_size: 16,"
    " model_args: {channels: [4, 8], fc_hidden: 16}, recon_likelihood: bernoulli, tensorboard: false}}\n"
    "  - {name: ev, kind: evaluate, run: vae, metrics: [disentanglement]}\n"
    "claims:\n"
    "  - {id: mig, claim: MIG, ours: {stage: ev, key: disentanglement.mig.mig}, verdict: {rule: report}}\n"
    "budgets: {smaller: {data: {image_size: 8, positions: 1}}}\n")


def test_a_data_stage_generates_the_dataset_its_train_stages_use(tmp_path):
    """A study on generated shapes: data -> train (on that data) -> evaluate with MIG / DCI, then claims."""
    path = tmp_path / "s.yaml"
    path.write_text(SHAPES_STUDY)
    out = run_study(path, out=tmp_path / "out", device="cpu")
    assert (out / "shapes" / "manifest.json").is_file()
    from vaelab.run import Run

    config = Run(out / "vae").config
    assert config.dataset == "tensors" and config.data_root == str(out / "shapes")
    report = json.loads((out / "study.json").read_text())
    assert report["claims"][0]["verdict"] == "reported" and 0 <= report["claims"][0]["ours"] <= 1
    run_study(path, out=tmp_path / "out", device="cpu")  # everything finished: skipped, the same run
    from vaelab.study import budget_changes

    smaller = load_study(path, budget="smaller")
    assert smaller.stage("shapes")["image_size"] == 8 and budget_changes(smaller, "ev")  # via train, via data
    bad = {"{name: d, kind: data, generator: blobs}": "'generator', one of shapes",
           "{name: d, kind: data, generator: shapes, scales: 0}": "scales must be",
           "{name: t, kind: train, data: later}": "'data: later' names no earlier stage"}
    for stage, message in bad.items():
        path.write_text(f"name: s\nstages: [{stage}]\nclaims: []\n")
        with pytest.raises(ConfigError, match=message):
            load_study(path)


def test_chosen_stages_run_alone_and_share_the_folder(tmp_path):
    """--stages: only the named stages run; one whose input is neither finished nor chosen is refused
    before any work; the stage times of separate invocations end up in one stages.json."""
    path = tmp_path / "s.yaml"
    path.write_text(SHAPES_STUDY)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="stage vae needs stage shapes, which is not finished"):
        run_study(path, out=out, device="cpu", stages=["vae"])
    assert not out.exists()
    with pytest.raises(ConfigError, match="no stage named vea; stages: shapes, vae, ev"):
        run_study(path, out=out, device="cpu", stages=["vea"])
    run_study(path, out=out, device="cpu", stages=["shapes"])
    assert (out / "shapes" / "manifest.json").is_file() and not (out / "vae").exists()
    assert json.loads((out / "study.json").read_text())["claims"][0]["verdict"] == "not measured"
    run_study(path, out=out, device="cpu", stages=["vae", "ev"])
    assert set(json.loads((out / "stages.json").read_text())) == {"shapes", "vae", "ev"}
    assert json.loads((out / "study.json").read_text())["claims"][0]["verdict"] == "reported"


def test_claims_name_comparison_entries_by_run_and_sampler(tmp_path):
    """A claim key picks a comparison entry by RUN:SAMPLER, whatever the order of the entries; a selector
    naming a run that the compare stage does not compare is refused when the file is read."""
    stages = ("  - {name: a, kind: train, set: {dataset: mnist, model: mnist-small}}\n"
              "  - {name: b, kind: train, set: {dataset: mnist, model: ddpm-28}}\n"
              "  - {name: cmp, kind: compare, runs: [a, b]}\n")
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nstages:\n" + stages + "claims:\n"
                    "  - {id: dpm, claim: x, ours: {stage: cmp, key: entries.b:dpmsolver++.evaluation.fid.value}, "
                    "verdict: {rule: report}}\n"
                    "  - {id: gmm, claim: y, ours: {stage: cmp, key: entries.a:gmm.evaluation.fid.value}, "
                    "verdict: {rule: report}}\n")
    out = tmp_path / "out"
    (out / "cmp").mkdir(parents=True)
    entries = [{"run": f"/x/{run}", "sampler": {"sampler": name}, "evaluation": {"fid": {"value": fid}}}
               for run, name, fid in (("b", "dpmsolver++", 3.0), ("a", "prior", 1.0), ("a", "gmm:components=10", 2.0),
                                      ("b", "ddpm", 4.0))]
    (out / "cmp" / "comparison.json").write_text(json.dumps({"entries": entries}))
    run_study(path, out=out, stages=[])  # nothing to run: the plan and the claims
    ours = {c["id"]: c["ours"] for c in json.loads((out / "study.json").read_text())["claims"]}
    assert ours == {"dpm": 3.0, "gmm": 2.0}
    path.write_text("name: s\nstages:\n" + stages + "claims:\n"
                    "  - {id: c, claim: x, ours: {stage: cmp, key: entries.ddpm:ddim.evaluation.fid.value}, "
                    "verdict: {rule: report}}\n")
    with pytest.raises(ConfigError, match="names run 'ddpm', which is not one of stage cmp's runs \\(a, b\\)"):
        load_study(path)


def test_a_sweep_stage_with_the_latent_metric_draws_the_kl_per_dimension(tmp_path):
    """The latent-size study's shape: a sweep stage evaluated with ``latent`` (no FID), a claim on a point;
    ``jobs`` trains its points as processes of their own."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nstages:\n"
        "  - {name: sweep, kind: sweep, axes: {latent_dim: [2, 3]}, metrics: [latent],\n"
        "     set: {dataset: mnist, model: mnist-small, epochs: 1, batch_size: 64, train_subset: 200, test_subset: 100,"
        " tensorboard: false}}\n"
        "claims:\n"
        "  - {id: au, claim: AU, ours: {stage: sweep, key: points.1.metrics.active_units}, verdict: {rule: report}}\n")
    with pytest.raises(ConfigError, match="jobs must be a positive integer"):
        run_study(path, out=tmp_path / "out", device="cpu", jobs=0)
    out = run_study(path, out=tmp_path / "out", device="cpu", jobs=2)  # the two points as two train processes
    assert sorted(f.name for f in (out / "sweep" / "logs").iterdir()) == ["latent_dim=2.log", "latent_dim=3.log"]
    sweep = json.loads((out / "sweep" / "sweep.json").read_text())
    assert [len(p["kl_per_dim_nats"]) for p in sweep["points"]] == [2, 3]
    assert (out / "sweep" / "sweep_kl_per_dim.png").is_file()
    claim = json.loads((out / "study.json").read_text())["claims"][0]
    assert claim["verdict"] == "reported" and 0 <= claim["ours"] <= 3
    path.write_text(path.read_text().replace("metrics: [latent]", "metrics: [latnt]"))
    with pytest.raises(ConfigError, match="latnt"):
        load_study(path)


def test_a_study_can_grow_after_it_ran_but_finished_stages_stay_as_they_ran(tmp_path):
    """A stage added to the file (or an unfinished one changed) rewrites the plan; a finished stage that
    changed is refused, naming it, before any work."""
    path = tmp_path / "s.yaml"
    path.write_text(SHAPES_STUDY)
    out = tmp_path / "out"
    run_study(path, out=out, device="cpu", stages=["shapes"])
    grown = SHAPES_STUDY.replace("claims:\n", "  - {name: ev2, kind: evaluate, run: vae, metrics: [latent]}\nclaims:\n")
    path.write_text(grown.replace("epochs: 1, batch_size: 16", "epochs: 1, batch_size: 8"))  # vae unfinished: may change
    study_module.report_study(path, out=out)
    assert "ev2" in (out / "study_plan.yaml").read_text()
    path.write_text(grown.replace("positions: 3,", "positions: 2,"))  # the finished data stage changed
    with pytest.raises(ConfigError, match=r"finished stage\(s\) shapes are missing from or differ"):
        run_study(path, out=out, device="cpu")
    assert not (out / "vae").exists()


def test_a_samples_stage_sets_runs_side_by_side(tmp_path):
    """``kind: samples``: one labelled row per run in one picture, with the sampler and seconds per run."""
    path = tmp_path / "s.yaml"
    path.write_text(SHAPES_STUDY.replace(
        "  - {name: ev,", "  - {name: vae2, kind: train, data: shapes, set: {model: conv, latent_dim: 2, epochs: 1,"
        " batch_size: 16, model_args: {channels: [4, 8], fc_hidden: 16}, recon_likelihood: bernoulli, tensorboard: false}}\n"
        "  - {name: grid, kind: samples, runs: [vae, vae2], num_samples: 5}\n  - {name: ev,"))
    out = run_study(path, out=tmp_path / "out", device="cpu", stages=["shapes", "vae", "vae2", "grid"])
    samples = json.loads((out / "grid" / "samples.json").read_text())
    assert [e["run"] for e in samples["entries"]] == [str(out / "vae"), str(out / "vae2")]
    assert all(e["sampler"]["sampler"] == "prior" and e["seconds"] >= 0 for e in samples["entries"])
    assert (out / "grid" / "samples.png").stat().st_size > 1000
    assert "one row per run" in (out / "report.html").read_text()


def test_tables_lay_claims_out_as_rows_and_columns(tmp_path):
    """``tables``: the cell of row R, column C is claim "R-C" (ours, or "—" where the study has no such
    claim); study.md and report.html open with them; a row or column meeting no claim is refused."""
    from vaelab.reports import write_report

    def claim(cid, key):
        return f"  - {{id: {cid}, claim: {cid}, seed: {{text: none}}, ours: {{stage: {cid.split('-')[0]}, key: {key}}}, verdict: {{rule: report}}}}\n"

    text = ("name: s\nstages: [{name: a, kind: train}, {name: b, kind: train}]\nclaims:\n"
            + claim("a-fid", "fid") + claim("a-mse", "mse") + claim("b-fid", "fid")
            + "tables:\n  - {title: Zoo, rows: {Model A: a, Model B: b}, columns: {FID: fid, MSE: mse}}\n")
    path = tmp_path / "s.yaml"
    path.write_text(text)
    study = load_study(path)
    out = tmp_path / "out"
    for name, numbers in {"a": {"fid": 12.5, "mse": 0.25}, "b": {"fid": 7.0}}.items():
        (out / name).mkdir(parents=True)
        (out / name / "summary.json").write_text(json.dumps(numbers))
    report = study_module.summarize(study, out)
    (table,) = report["tables"]
    assert table["columns"] == ["FID", "MSE"] and [r["label"] for r in table["rows"]] == ["Model A", "Model B"]
    assert [[c and c["ours"] for c in r["cells"]] for r in table["rows"]] == [[12.5, 0.25], [7.0, None]]
    md = (out / "study.md").read_text()
    assert "| Model A | 12.5 | 0.25 |" in md and "| Model B | 7 | — |" in md
    assert md.index("**Zoo**") < md.index("| claim | seed |")
    page = write_report(out).read_text()
    assert page.index("<h3>Zoo</h3>") < page.index("<th>claim</th>")
    path.write_text(text.replace("Model B: b}", "Model B: b, Model C: c}"))
    with pytest.raises(ConfigError, match="row 'Model C' \\('c'\\) meets no claim"):
        load_study(path)
    path.write_text(text.replace("MSE: mse}", "MSE: mse, KL: kl}"))
    with pytest.raises(ConfigError, match="column 'KL' \\('kl'\\) meets no claim"):
        load_study(path)
