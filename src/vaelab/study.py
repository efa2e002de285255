"""Studies: a seed experiment as one resumable chain of vaelab commands, ending with its claims checked.

A study file (YAML, see ``studies/``) names the stages and the claims::

    name: seed-000
    title: ...
    stages:                      # run in order; each writes OUT/<name>/
      - {name: vae, kind: train, config: ../configs/cifar10-seed.yaml, set: {epochs: 20}}
      - {name: synth, kind: synth, run: vae, per_class: 5000, method: class-mean}
      - {name: cas, kind: cas, synthetic: synth}
      - {name: eval, kind: evaluate, run: vae, metrics: [fid]}
    claims:
      - id: synthetic-top1
        claim: "a classifier trained on 5,000 synthetic images per class reaches 72 % on real test images"
        seed: {value: 72.0, protocol: "..."}
        ours: {stage: cas, key: rows.synthetic.top1, scale: 100}
        unit: "%"
        protocol: "..."
        verdict: {rule: within, tolerance: 3.0}
    budgets:                     # --budget NAME: overrides by stage kind (full = none)
      quick: {train: {epochs: 1}, synth: {per_class: 100}}
    tables:                      # optional: claims laid out as rows x columns, shown before the claims table
      - title: "MNIST"
        rows: {VAE: mnist-vae, beta-VAE: mnist-beta-vae}           # label: claim id prefix
        columns: {"FID, prior": fid-prior, "FID, GMM": fid-gmm}      # label: claim id suffix
                                 # the cell of row R, column C is claim "R-C"; "—" where no such claim exists

A claim's ``key`` is a dotted path into its stage's output JSON: list items by index, and a comparison's
entries by ``RUN:SAMPLER`` (run stage name and sampler name, e.g. ``entries.ddpm:dpmsolver++.evaluation.fid.value``).

Stage kinds: ``data`` (``vaelab data GENERATOR``: a generated dataset with known factors, e.g.
``{name: shapes, kind: data, generator: shapes, image_size: 64}``), ``train`` (``vaelab train``;
``config`` relative to the study file, ``set`` overrides, ``first_stage``: an earlier train stage whose
run folder a latent diffusion model uses, ``data``: a data stage whose dataset it trains on, as
``--dataset tensors --data-root``), ``synth``, ``cas``, ``evaluate`` (``eval.json`` and its pictures are
written into the stage folder; the run folder's own ``eval.json`` is left alone), ``compare``, ``sweep``, ``samples`` (``vaelab sample --run A --run B``: one
labelled row of samples per run in ``samples.png``, e.g. ``{name: grid, kind: samples, runs: [vae, ddpm],
num_samples: 8}``). A stage is finished when its output file exists (``manifest.json``, ``summary.json``,
``manifest.json``, ``cas.json``, ``eval.json``, ``comparison.json``, ``sweep.json``, ``samples.json``); a
re-run skips finished stages, resumes an interrupted training from its checkpoint and repeats any other
interrupted stage (those write their folders atomically). A study folder belongs to one plan: the
same file with another budget is refused; stages may be added to the file, but a finished stage that
changed is refused (``_check_plan``).

Verdict rules of a claim: ``within`` (``|ours - seed| <= tolerance``), ``at_least`` (``ours >=
seed - tolerance``), ``order`` (two of our numbers, ``ours`` and ``than``, keep the seed's order:
``less`` or ``greater``), ``report`` (the seed gives no comparable number: ours is reported); a
claim can also be declared ``not_comparable`` with a reason. At a budget other than ``full``, a claim
whose stage, or any stage it builds on, the budget changes is "not comparable" (the budget is named),
since the seed's numbers come from its budget; claims on stages the budget leaves alone keep their
verdicts (e.g. a budget that only shrinks the evaluation's sample count).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from vaelab.config import TrainConfig, load_config, with_overrides
from vaelab.errors import ConfigError, VaelabError
from vaelab.io import (DamagedFileError, load_written_yaml, read_checked, read_json, read_yaml_mapping, write_json,
                       write_text, write_yaml)

KINDS: dict[str, dict[str, Any]] = {
    # kind -> {"done": marker file, "keys": allowed stage keys (besides name/kind), "refs": keys naming stages}
    "data": {"done": "manifest.json", "keys": {"generator", "image_size", "scales", "orientations", "positions",
                                               "test_fraction", "seed"}, "refs": set()},
    # first_stage (optional): the train stage whose run a latent diffusion model diffuses the latents of;
    # data (optional): the data stage whose generated dataset it trains on
    "train": {"done": "summary.json", "keys": {"config", "set", "first_stage", "data"}, "refs": {"first_stage", "data"}},
    "synth": {"done": "manifest.json", "keys": {"run", "per_class", "method", "noise_scale", "sampler", "seed"},
              "refs": {"run"}},
    "cas": {"done": "cas.json", "keys": {"synthetic", "dataset", "rows", "epochs", "steps", "budget", "augment", "seed",
                                         "train_subset", "test_subset", "precision"}, "refs": {"synthetic"}},
    "evaluate": {"done": "eval.json", "keys": {"run", "metrics", "num_samples", "sampler", "steps", "fid_features",
                                               "iwae_k", "nll_subset", "seed", "feature_precision"}, "refs": {"run"}},
    "compare": {"done": "comparison.json", "keys": {"runs", "num_samples", "ddpm_num_samples", "ddim_steps", "metrics",
                                                    "fid_features", "iwae_k", "nll_subset", "timing_repeats",
                                                    "timing_max_steps", "seed", "feature_precision", "retime"},
                "refs": {"runs"}},
    "samples": {"done": "samples.json", "keys": {"runs", "num_samples", "seed", "sampler", "steps"}, "refs": {"runs"}},
    "sweep": {"done": "sweep.json", "keys": {"config", "set", "axes", "num_samples", "fid_features", "sampler", "steps",
                                               "metrics"},
              "refs": set()},
}
OPTIONAL_REFS = {"first_stage", "data"}
BOOLEAN_KEYS = {"augment", "retime"}  # YAML's yes/no/true/false; a string "false" would silently turn them on
RULES = ("within", "at_least", "order", "report")
GENERATORS = ("shapes",)  # data stages: vaelab.data.shapes
FULL = "full"
PLAN_FILE = "study_plan.yaml"


@dataclass
class Study:
    """A parsed, validated study file with a budget applied."""

    path: Path
    name: str
    title: str
    question: str
    dataset: str
    stages: list[dict]
    claims: list[dict]
    budget: str = FULL
    budgets: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)

    def stage(self, name: str) -> dict:
        return next(s for s in self.stages if s["name"] == name)


# ---------------------------------------------------------------------------- loading


def load_study(path: str | Path, *, budget: str = FULL) -> Study:
    """Read and validate a study file, with ``budget``'s overrides applied to its stages.

    Raises:
        ConfigError: a missing file, invalid YAML, an unknown stage kind / key / budget, a stage that
            refers to a later or unknown stage, a train config that does not resolve, or a claim
            that names an unknown stage or rule; the message names the stage or claim.
    """
    path = Path(path)
    doc = read_yaml_mapping(path, "study file")
    for key in ("name", "stages", "claims"):
        if key not in doc:
            raise ConfigError(f"{path}: missing '{key}'")
    budgets = doc.get("budgets") or {}
    if budget != FULL and budget not in budgets:
        raise ConfigError(f"{path}: unknown budget {budget!r}; valid: {', '.join([FULL, *budgets])}")
    overrides = budgets.get(budget, {}) if budget != FULL else {}
    unknown = sorted(set(overrides) - set(KINDS))
    if unknown:
        raise ConfigError(f"{path}: budget {budget!r} names unknown stage kind(s) {', '.join(unknown)}; valid: {', '.join(KINDS)}")
    stages, seen = [], set()
    for i, raw in enumerate(doc["stages"]):
        stages.append(_check_stage(path, raw, i, seen, overrides))
        seen.add(stages[-1]["name"])
    claims = [_check_claim(path, c, {st["name"]: st for st in stages}) for c in doc["claims"]]
    ids = {c["id"] for c in claims}
    tables = [_check_table(path, t, i, ids) for i, t in enumerate(doc.get("tables") or [])]
    return Study(path=path, name=str(doc["name"]), title=str(doc.get("title", doc["name"])),
                 question=str(doc.get("question", "")), dataset=str(doc.get("dataset", "")), stages=stages,
                 claims=claims, budget=budget, budgets=budgets, notes=list(doc.get("notes", [])), tables=tables)


def _check_stage(path: Path, raw: dict, i: int, seen: set[str], overrides: dict) -> dict:
    name, kind = raw.get("name"), raw.get("kind")
    where = f"{path}: stage {i + 1}" + (f" ({name})" if name else "")
    if not name or not isinstance(name, str) or "/" in name:
        raise ConfigError(f"{where}: needs a 'name' (a folder name)")
    if name in seen:
        raise ConfigError(f"{where}: the name {name!r} is used twice")
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    spec = {k: v for k, v in raw.items() if k not in ("name", "kind")}
    extra = sorted(set(spec) - KINDS[kind]["keys"])
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} for a {kind} stage; valid: "
                          f"{', '.join(sorted(KINDS[kind]['keys']))}")
    budgeted = dict(overrides.get(kind, {}))
    if kind in ("train", "sweep"):
        # a sweep's own keys (num_samples, fid_features, ...) stay the stage's; the rest are config fields
        own = {k: budgeted.pop(k) for k in list(budgeted) if k in KINDS[kind]["keys"] - {"config", "set", "axes"}}
        spec.update(own)
        spec["set"] = {**(spec.get("set") or {}), **budgeted}
        if kind == "sweep" and "axes" not in spec:
            raise ConfigError(f"{where}: a sweep stage needs 'axes' ({{field: [values]}})")
        config = _train_config(path, spec, where)
        try:
            config.resolved()
        except (ConfigError, VaelabError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc
    else:
        spec.update(budgeted)
    if kind == "data":
        _check_data_stage(spec, where)
    for flag in sorted(BOOLEAN_KEYS & set(spec)):
        if not isinstance(spec[flag], bool):
            raise ConfigError(f"{where}: '{flag}' must be true or false, got {spec[flag]!r}")
    if "metrics" in spec and kind in ("evaluate", "compare", "sweep"):
        _check_metrics(spec["metrics"], where)
    for ref_key in KINDS[kind]["refs"]:
        refs = spec.get(ref_key)
        if refs is None and ref_key in OPTIONAL_REFS:
            continue
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref not in seen:
                raise ConfigError(f"{where}: '{ref_key}: {ref}' names no earlier stage; earlier: {', '.join(sorted(seen)) or 'none'}")
    return {"name": name, "kind": kind, **spec}


def _check_metrics(metrics, where: str) -> None:
    from vaelab.evaluation import parse_metrics

    try:
        parse_metrics(metrics if isinstance(metrics, (str, list)) else str(metrics))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_data_stage(spec: dict, where: str) -> None:
    from vaelab.data.shapes import ShapesSpec

    if spec.get("generator") not in GENERATORS:
        raise ConfigError(f"{where}: a data stage needs 'generator', one of {', '.join(GENERATORS)}; got "
                          f"{spec.get('generator')!r}")
    try:
        ShapesSpec(**{k: v for k, v in spec.items() if k != "generator"}).check()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _train_config(path: Path, spec: dict, where: str, out: Path | None = None) -> TrainConfig:
    """The stage's config; ``first_stage`` becomes that stage's folder under ``out``, and ``data`` trains on the
    tensors dataset that data stage wrote there (without ``out``, when only validating the file, stand-in
    paths that hold nothing)."""
    base = load_config(path.parent / spec["config"]) if spec.get("config") else TrainConfig()
    values = dict(spec.get("set") or {})
    if spec.get("first_stage"):
        values["first_stage"] = str(out / spec["first_stage"]) if out is not None else f"<stage {spec['first_stage']}>"
    if spec.get("data"):
        values.update(dataset="tensors", data_root=str(out / spec["data"]) if out is not None else f"<stage {spec['data']}>")
    try:
        return with_overrides(base, values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _check_claim(path: Path, claim: dict, stages: dict[str, dict]) -> dict:
    where = f"{path}: claim {claim.get('id', '?')}"
    for key in ("id", "claim", "verdict"):
        if key not in claim:
            raise ConfigError(f"{where}: missing '{key}'")
    rule = claim["verdict"].get("rule")
    if rule not in RULES:
        raise ConfigError(f"{where}: unknown verdict rule {rule!r}; valid: {', '.join(RULES)}")
    for ref in (claim.get("ours"), claim.get("than")):
        if ref is not None and ref.get("stage") not in stages:
            raise ConfigError(f"{where}: 'stage: {ref.get('stage')}' is not a stage of the study")
        if ref is not None:
            for part in str(ref.get("key", "")).split("."):
                if ":" in part and part.split(":")[0] not in stages[ref["stage"]].get("runs", []):
                    raise ConfigError(f"{where}: '{part}' names run {part.split(':')[0]!r}, which is not one of "
                                      f"stage {ref['stage']}'s runs ({', '.join(stages[ref['stage']].get('runs', []))})")
    if rule == "order" and ("than" not in claim or claim["verdict"].get("seed_order") not in ("less", "greater")):
        raise ConfigError(f"{where}: rule 'order' needs 'than' (a second value) and verdict.seed_order less|greater")
    if rule in ("within", "at_least"):
        if not isinstance((claim.get("seed") or {}).get("value"), (int, float)):
            raise ConfigError(f"{where}: rule {rule!r} needs the seed's number as seed.value")
        tolerance = claim["verdict"].get("tolerance", None if rule == "within" else 0.0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
            raise ConfigError(f"{where}: rule {rule!r} needs verdict.tolerance, a number >= 0; got {tolerance!r}")
    return claim


def _check_table(path: Path, table: Any, i: int, ids: set[str]) -> dict:
    """A ``tables`` entry: ``title``, ``rows`` and ``columns`` (label -> claim id prefix / suffix); every row and
    every column must meet at least one claim (a label that meets none is a typo, not an empty row)."""
    where = f"{path}: table {i + 1}"
    if not isinstance(table, dict) or not {"title", "rows", "columns"} <= set(table):
        raise ConfigError(f"{where}: expected a mapping with 'title', 'rows' and 'columns'")
    for key in ("rows", "columns"):
        if not isinstance(table[key], dict) or not table[key]:
            raise ConfigError(f"{where}: '{key}' must map labels to claim id {'prefixes' if key == 'rows' else 'suffixes'}")
    for key, other in (("rows", "columns"), ("columns", "rows")):
        for label, part in table[key].items():
            pairs = ((part, o) if key == "rows" else (o, part) for o in table[other].values())
            if not any(f"{r}-{c}" in ids for r, c in pairs):
                raise ConfigError(f"{where}: {key[:-1]} {label!r} ({part!r}) meets no claim: no claim id "
                                  f"{'starts' if key == 'rows' else 'ends'} with {part!r} and "
                                  f"{'ends' if key == 'rows' else 'starts'} with one of the {other}")
    return {"title": str(table["title"]), "rows": {str(k): str(v) for k, v in table["rows"].items()},
            "columns": {str(k): str(v) for k, v in table["columns"].items()}}


def tables_of(study: Study, rows: list[dict]) -> list[dict]:
    """The study's ``tables`` filled from the summarised claim rows: per cell the claim's ``id`` and ``ours``,
    or ``None`` where the study has no such claim."""
    by_id = {r["id"]: r for r in rows}

    def cell(claim_id: str) -> dict | None:
        return {"id": claim_id, "ours": by_id[claim_id]["ours"]} if claim_id in by_id else None

    return [{"title": t["title"], "columns": list(t["columns"]),
             "rows": [{"label": label, "cells": [cell(f"{prefix}-{suffix}") for suffix in t["columns"].values()]}
                      for label, prefix in t["rows"].items()]}
            for t in study.tables]


# ---------------------------------------------------------------------------- running


def default_out(study: Study) -> Path:
    """``runs/studies/<name>`` for the full budget, ``runs/studies/<name>-<budget>`` for another."""
    return Path("runs") / "studies" / (study.name if study.budget == FULL else f"{study.name}-{study.budget}")


@dataclass(frozen=True)
class Machine:
    """What a study's stages may use: ``device`` for every stage (``None``: each stage's default) and
    ``jobs``, the points a sweep stage trains at once (above 1, each a ``vaelab train`` process)."""

    device: str | None = None
    jobs: int = 1


def run_study(path: str | Path, *, budget: str = FULL, out: str | Path | None = None, device: str | None = None,
              stages: list[str] | None = None, jobs: int = 1) -> Path:
    """Run every unfinished stage of a study, then write ``study.json``, ``study.md`` and ``report.html``.

    Args:
        path: the study file.
        budget: ``full`` (the seed's settings) or a budget the file defines (e.g. ``quick``).
        out: the study folder (default ``runs/studies/<name>`` or ``runs/studies/<name>-<budget>``).
        device: passed to every stage (``None``: each stage's default).
        stages: run only these stages (``None``: all). Two processes may work on one study folder with
            disjoint ``stages`` (e.g. the long DDPM training beside the others): each writes only its
            own stage folders, and ``stages.json`` is merged on every write.
        jobs: sweep stages train this many points at once (``vaelab.sweep.run_sweep``'s ``jobs``); the
            numbers do not depend on it.

    Returns:
        The study folder.

    Raises:
        ConfigError: an invalid study file (before any work), a folder holding another plan, an unknown
            name in ``stages``, a chosen stage that needs a stage which is neither finished nor chosen, or
            ``jobs`` < 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a positive integer (sweep points trained at once), got {jobs!r}")
    machine = Machine(device, jobs)
    study = load_study(path, budget=budget)
    out = Path(out) if out else default_out(study)
    chosen = _chosen_stages(study, out, stages)
    _check_plan(out, study)
    for i, stage in enumerate(study.stages, 1):
        folder = out / stage["name"]
        if stage["name"] not in chosen:
            continue
        with _naming_the_stage(study, out, stage["name"]):
            if stage["kind"] == "train" and (folder / "config.yaml").is_file():
                from vaelab.run import Run

                Run(folder).check_same_settings(_train_config(study.path, stage, stage["name"], out))
            done = folder / KINDS[stage["kind"]]["done"]
            if done.is_file():
                read_json(done, remedy=_stage_remedy(study, out, stage["name"]))  # a damaged output stops here
                print(f"[{i}/{len(study.stages)}] {stage['name']} ({stage['kind']}): finished earlier, skipped")
                continue
            print(f"[{i}/{len(study.stages)}] {stage['name']} ({stage['kind']})")
            resumed = folder.exists()  # an interrupted run left it: the time below covers this run only
            t0 = time.perf_counter()
            STAGES[stage["kind"]](study, stage, out, machine)
        state = _read_state(out, study)  # read again: another process may have finished other stages meanwhile
        state[stage["name"]] = {"kind": stage["kind"], "seconds": time.perf_counter() - t0, "resumed": resumed,
                                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(out / "stages.json", state)
    return _write_reports(study, out)


def _stage_refs(stage: dict) -> list[str]:
    refs = []
    for key in KINDS[stage["kind"]]["refs"]:
        value = stage.get(key)
        refs += [] if value is None else value if isinstance(value, list) else [value]
    return refs


def _chosen_stages(study: Study, out: Path, stages: list[str] | None) -> set[str]:
    names = [s["name"] for s in study.stages]
    if stages is None:
        return set(names)
    unknown = [n for n in stages if n not in names]
    if unknown:
        raise ConfigError(f"{study.path}: no stage named {', '.join(unknown)}; stages: {', '.join(names)}")
    for name in stages:
        for ref in _stage_refs(study.stage(name)):
            done = out / ref / KINDS[study.stage(ref)["kind"]]["done"]
            if ref not in stages and not done.is_file():
                raise ConfigError(f"stage {name} needs stage {ref}, which is not finished in {out}; add it to "
                                  f"--stages or run it first")
    return set(stages)


def report_study(path: str | Path, *, budget: str = FULL, out: str | Path | None = None) -> Path:
    """Check the claims against the stages finished so far, without running anything: claims whose
    stage has not finished are "not measured". Writes ``study.json``, ``study.md`` and ``report.html``.

    Raises:
        ConfigError: an invalid study file, a folder that does not exist or holds another plan.
    """
    study = load_study(path, budget=budget)
    out = Path(out) if out else default_out(study)
    if not (out / PLAN_FILE).is_file():
        raise ConfigError(f"{out} is not a study folder of {path} (no {PLAN_FILE}); run `vaelab study run` first")
    _check_plan(out, study)
    return _write_reports(study, out)


def _write_reports(study: Study, out: Path) -> Path:
    from vaelab.reports import write_report

    summarize(study, out)
    print(f"study folder: {out}\n  {out / 'study.md'}\nreport: {write_report(out)}")
    return out


def _rerun(study: Study, out: Path) -> str:
    budget = "" if study.budget == FULL else f" --budget {study.budget}"
    return f"`vaelab study run {study.path}{budget} --out {out}`"


def _stage_remedy(study: Study, out: Path, name: str) -> str:
    return f"delete {out / name} and rerun {_rerun(study, out)}, which redoes that stage"


@contextlib.contextmanager
def _naming_the_stage(study: Study, out: Path, current: str):
    """A damaged file met while running stage ``current`` stops the study with one line naming the stage, the
    file and the stage folder to delete (the stage that wrote it); every other stage's folder stays as it is."""
    try:
        yield
    except DamagedFileError as exc:
        owner = _owning_stage(exc.path, study, out)
        remedy = exc.remedy if owner is None else (
            f"delete {out / owner} and rerun {_rerun(study, out)}, which redoes stage {owner}"
            + ("" if owner == current else f", then {current}"))
        raise VaelabError(f"study stage {current}: {exc.path} is damaged ({exc.problem}); {remedy}") from exc


def _owning_stage(path: Path, study: Study, out: Path) -> str | None:
    """The stage whose folder holds ``path``, or ``None``."""
    try:
        parts = Path(path).resolve().relative_to(Path(out).resolve()).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in {s["name"] for s in study.stages} else None


def _check_plan(out: Path, study: Study) -> None:
    """Write the folder's plan, or check the study file against the plan already there: the same study and
    budget, and every *finished* stage unchanged. Stages added to the file, and unfinished ones changed,
    are accepted (the plan is rewritten), so a study can grow after it ran."""
    plan = yaml.safe_load(yaml.safe_dump(
        {"study": str(study.path), "name": study.name, "budget": study.budget, "stages": study.stages}))
    path = out / PLAN_FILE
    if path.is_file():
        old = read_checked(path, load_written_yaml,
                           remedy=f"delete it and rerun {_rerun(study, out)}, which writes it again from the study file")
        if old == plan:
            return
        if not isinstance(old, dict) or (old.get("name"), old.get("budget")) != (plan["name"], plan["budget"]):
            raise ConfigError(f"{out} holds another study plan (see {path}: another study or budget); use another "
                              "--out or the same study file and --budget (if that file was cut short, delete it and "
                              "rerun: it is written again from the study file)")
        new = {s["name"]: s for s in plan["stages"]}
        changed = [s["name"] for s in old.get("stages") or []
                   if s.get("kind") in KINDS and (out / s["name"] / KINDS[s["kind"]]["done"]).is_file()
                   and new.get(s["name"]) != s]
        if changed:
            raise ConfigError(f"{out}: finished stage(s) {', '.join(changed)} are missing from or differ in {study.path} "
                              f"(the plan they ran with is {path}); restore them in the study file, or use another --out")
        added = [name for name in new if name not in {s.get("name") for s in old.get("stages") or []}]
        print(f"{path}: the study file changed (unfinished stages only"
              f"{'; added: ' + ', '.join(added) if added else ''}); plan rewritten")
    write_yaml(path, plan)


def _read_state(out: Path, study: Study) -> dict:
    path = out / "stages.json"
    if not path.is_file():
        return {}
    return read_json(path, remedy=f"delete it and rerun {_rerun(study, out)}: it records how long each stage took "
                                  "(those times are lost, no stage is redone)")


def _train(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.run import Run, checkpoint_dirs
    from vaelab.training import resume, train

    folder = out / stage["name"]
    config = _train_config(study.path, stage, stage["name"], out)
    if checkpoint_dirs(folder):
        Run(folder).check_same_settings(config)
        resume(folder, device=machine.device)
        return
    shutil.rmtree(folder, ignore_errors=True)  # a start that died before its first checkpoint
    train(with_overrides(config, {"out": str(folder), "device": machine.device}))


def _data(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.data.shapes import ShapesSpec, write_shapes

    folder = out / stage["name"]
    shutil.rmtree(folder, ignore_errors=True)  # never finished (no manifest.json)
    write_shapes(folder, ShapesSpec(**{k: v for k, v in stage.items() if k not in ("name", "kind", "generator")}))


def _synth(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.synthesis import synthesize

    args = {k: stage[k] for k in ("per_class", "method", "noise_scale", "sampler", "seed") if k in stage}
    synthesize(out / stage["run"], out / stage["name"], device=machine.device or "auto", **args)


def _cas(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.cas import cas

    synthetic = out / stage["synthetic"]
    manifest = read_json(synthetic / "manifest.json", remedy=_stage_remedy(study, out, stage["synthetic"]))
    args = {k: stage[k] for k in ("epochs", "steps", "budget", "augment", "seed", "train_subset", "test_subset",
                                  "precision") if k in stage}
    if "rows" in stage:
        args["rows"] = tuple(stage["rows"])
    from vaelab.run import Run

    # the real data: the source run's dataset and root, unless the stage names another dataset (then its default root)
    run_config = Run(manifest["source_run"]).config
    cas(synthetic, stage.get("dataset", manifest["dataset"]), data_root=None if "dataset" in stage else run_config.data_root,
        out=out / stage["name"], device=machine.device or "auto", **args)


def _evaluate(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.evaluation import evaluate_run

    run_dir = out / stage["run"]
    args = {k: stage[k] for k in KINDS["evaluate"]["keys"] - {"run"} if k in stage}
    # written into a temporary folder, renamed when complete (the run folder's own eval.json is left alone)
    folder = out / stage["name"]
    tmp = out / f".{stage['name']}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    evaluate_run(run_dir, device=machine.device or "auto", out=tmp, **args)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _compare(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.comparison import compare_runs

    args = {k: stage[k] for k in KINDS["compare"]["keys"] - {"runs"} if k in stage}
    folder = out / stage["name"]
    shutil.rmtree(folder, ignore_errors=True)  # never finished (no comparison.json): vaelab compare wants a new folder
    compare_runs([out / r for r in stage["runs"]], out=folder, device=machine.device or "auto", **args)


def _sweep(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.sweep import run_sweep

    base = _train_config(study.path, stage, stage["name"])
    if machine.device:
        base = with_overrides(base, {"device": machine.device})
    args = {k: stage[k] for k in ("num_samples", "fid_features", "sampler", "steps", "metrics") if k in stage}
    run_sweep(base, {k: list(v) for k, v in stage["axes"].items()}, out=out / stage["name"], jobs=machine.jobs, **args)


def _samples(study: Study, stage: dict, out: Path, machine: Machine) -> None:
    from vaelab.generation import sample_runs

    folder = out / stage["name"]
    folder.mkdir(parents=True, exist_ok=True)
    entries = sample_runs([out / r for r in stage["runs"]], stage.get("num_samples", 8), folder / "samples.png",
                          seed=stage.get("seed", 0), device=machine.device or "auto", sampler=stage.get("sampler"),
                          steps=stage.get("steps"))
    caption = (f"{stage.get('num_samples', 8)} samples of each of {len(entries)} runs, one row per run (its sampler "
               f"named beside it), all drawn with seed {stage.get('seed', 0)}.")
    write_json(folder / "samples.json", {"picture": "samples.png", "seed": stage.get("seed", 0), "entries": entries,
                                         "captions": {"samples.png": caption}})


STAGES = {"data": _data, "train": _train, "synth": _synth, "cas": _cas, "evaluate": _evaluate, "compare": _compare,
          "sweep": _sweep, "samples": _samples}


# ---------------------------------------------------------------------------- claims


def _walk(out: Path, study: Study, ref: dict) -> tuple[Any, list]:
    """``(value, the containers on its path)`` of ``ref``'s dotted key in its stage's output JSON
    (``(None, [])`` when absent)."""
    stage = study.stage(ref["stage"])
    path = out / stage["name"] / KINDS[stage["kind"]]["done"]
    if not path.is_file():
        return None, []
    node: Any = read_json(path, remedy=_stage_remedy(study, out, stage["name"]))
    parents = []
    for part in str(ref["key"]).split("."):
        parents.append(node)
        if isinstance(node, list) and part.lstrip("-").isdigit():
            index = int(part)
            node = node[index] if -len(node) <= index < len(node) else None
        elif isinstance(node, list) and ":" in part:
            node = _comparison_entry(node, part)
        elif isinstance(node, dict):
            node = node.get(part)
        else:
            node = None
        if node is None:
            return None, []
    return node, parents


def _comparison_entry(entries: list, selector: str) -> dict | None:
    """The entry of a ``comparison.json`` that ``RUN:SAMPLER`` names: the run folder's name (the stage's)
    and the sampler's name, e.g. ``ddpm:dpmsolver++`` (robust to the order of the entries)."""
    run, sampler = selector.split(":", 1)
    found = [e for e in entries if isinstance(e, dict) and Path(str(e.get("run", ""))).name == run
             and str((e.get("sampler") or {}).get("sampler", "")).split(":")[0] == sampler]
    return found[0] if len(found) == 1 else None


def lookup(out: Path, study: Study, ref: dict) -> float | None:
    """The number ``ref`` names: ``{stage, key: dotted.path, scale}`` in the stage's output JSON; ``None``
    when the stage or the key is absent (not measured)."""
    node, _ = _walk(out, study, ref)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return None
    return float(node) * float(ref.get("scale", 1.0))


def reduced_precision(out: Path, study: Study, ref: dict) -> bool:
    """Whether the number ``ref`` names was measured with reduced-precision features (an entry on its
    path, e.g. ``fid`` for ``fid.floor.value``, says ``feature_precision`` other than ``fp32``): such
    numbers never get a seed or paper verdict."""
    _, parents = _walk(out, study, ref)
    return any(isinstance(p, dict) and p.get("feature_precision", "fp32") != "fp32" for p in parents)


def budget_changes(study: Study, name: str) -> bool:
    """Whether the study's budget overrides stage ``name`` or any stage it builds on."""
    if study.budget == FULL:
        return False
    overrides = study.budgets.get(study.budget) or {}
    stage = next(s for s in study.stages if s["name"] == name)
    if stage["kind"] in overrides:
        return True
    upstream = [stage.get(key) for key in KINDS[stage["kind"]]["refs"]]
    return any(budget_changes(study, ref) for refs in upstream if refs
               for ref in (refs if isinstance(refs, list) else [refs]))


def verdict(claim: dict, ours: float | None, than: float | None, budget: str) -> tuple[str, str]:
    """``(verdict, why)`` for one claim; verdict is reproduced | not reproduced | not comparable | not measured | reported."""
    rule, v = claim["verdict"]["rule"], claim["verdict"]
    seed = (claim.get("seed") or {}).get("value")
    unit = claim.get("unit", "")
    if ours is None or (rule == "order" and than is None):
        return "not measured", "the stage that measures it has not produced this number"
    if rule == "report" and seed is None and not claim.get("not_comparable"):  # nothing to compare with, at any budget
        why = str(v.get("why", "the seed gives no number to compare with"))
        return "reported", why + ("" if budget == FULL else f"; measured at budget '{budget}'")
    if budget != FULL:
        return "not comparable", f"run at budget '{budget}', not the seed's"
    if claim.get("not_comparable"):
        return "not comparable", str(claim["not_comparable"])
    if rule == "within":
        tol = float(v["tolerance"])
        ok = abs(ours - seed) <= tol
        return ("reproduced" if ok else "not reproduced"), f"ours {ours:.4g}{unit} vs seed {seed:.4g}{unit}, tolerance ±{tol:g}{unit}"
    if rule == "at_least":
        tol = float(v.get("tolerance", 0.0))
        ok = ours >= seed - tol
        return ("reproduced" if ok else "not reproduced"), f"ours {ours:.4g}{unit} vs seed {seed:.4g}{unit} (at least, −{tol:g})"
    order = v["seed_order"]
    ok = ours < than if order == "less" else ours > than
    sign = "<" if order == "less" else ">"
    return ("reproduced" if ok else "not reproduced"), (f"the seed has {claim.get('label', 'a')} {sign} "
                                                        f"{claim.get('than_label', 'b')}; ours {ours:.4g} vs {than:.4g}")


def summarize(study: Study, out: Path) -> dict:
    """Evaluate every claim against the study folder; write ``study.json`` and ``study.md``."""
    rows = []
    for claim in study.claims:
        ours = lookup(out, study, claim["ours"]) if claim.get("ours") else None
        than = lookup(out, study, claim["than"]) if claim.get("than") else None
        refs = [ref for ref in (claim.get("ours"), claim.get("than")) if ref]
        touched = any(budget_changes(study, ref["stage"]) for ref in refs)
        result, why = verdict(claim, ours, than, study.budget if touched else FULL)
        if result != "not measured" and any(reduced_precision(out, study, ref) for ref in refs):
            bf16 = "measured with reduced-precision (bf16) Inception features"
            result, why = (result, f"{why}; {bf16}") if result == "reported" else ("not comparable", bf16)
        rows.append({"id": claim["id"], "claim": claim["claim"], "stage": (claim.get("ours") or {}).get("stage"),
                     "seed": claim.get("seed", {}), "ours": ours,
                     "than": than, "unit": claim.get("unit", ""), "protocol": claim.get("protocol", ""),
                     "verdict": result, "why": why})
    state = _read_state(out, study)
    report = {
        "study": study.name, "title": study.title, "question": study.question, "dataset": study.dataset,
        "study_file": str(study.path), "budget": study.budget,
        "budget_overrides": study.budgets.get(study.budget, {}) if study.budget != FULL else {},
        "tables": tables_of(study, rows), "claims": rows, "stages": [{"name": s["name"], "kind": s["kind"], **state.get(s["name"], {}),
                    "done": (out / s["name"] / KINDS[s["kind"]]["done"]).is_file()} for s in study.stages],
        "notes": study.notes, "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(out / "study.json", report)
    write_text(out / "study.md", study_markdown(report))
    return report


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    return f"{value:.4g}{unit}"


def study_markdown(report: dict) -> str:
    """The study's tables (its claims laid out as rows x columns, if the file has ``tables``), then the claims
    table: seed's number, ours, both protocols, verdict."""
    lines = [f"# {report['title']}", "", report["question"], "",
             f"Study `{report['study']}` ({report['study_file']}), budget **{report['budget']}**"
             + (f" (overrides: {json.dumps(report['budget_overrides'])}; the protocol texts below describe the full "
                "budget, these overrides change them)" if report["budget_overrides"] else "") + ".", "",
             ]
    for t in report.get("tables", []):
        lines += [f"**{t['title']}**", "", "| | " + " | ".join(t["columns"]) + " |",
                  "|---|" + "---:|" * len(t["columns"])]
        for row in t["rows"]:
            lines.append(f"| {row['label']} | " + " | ".join("—" if c is None else _fmt(c["ours"], "")
                                                            for c in row["cells"]) + " |")
        lines.append("")
    lines += ["| claim | seed | ours | seed's protocol | our protocol | verdict |", "|---|---|---|---|---|---|"]
    for r in report["claims"]:
        seed = r["seed"] or {}
        seed_text = _fmt(seed.get("value"), r["unit"]) if seed.get("value") is not None else seed.get("text", "no number")
        ours = _fmt(r["ours"], r["unit"]) + (f" vs {_fmt(r['than'], r['unit'])}" if r["than"] is not None else "")
        cells = [r["claim"], seed_text, ours, seed.get("protocol", ""), r["protocol"], f"**{r['verdict']}**: {r['why']}"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    from vaelab.reports import RESUMED_NOTE

    lines += ["", "Stages:", ""]
    for s in report["stages"]:
        took = ("not finished" if not s.get("done", True) else
                f"{s['seconds']:.0f} s" + (RESUMED_NOTE if s.get("resumed") else "") if "seconds" in s
                else "finished (time not recorded)")
        lines.append(f"- `{s['name']}` ({s['kind']}): {took}")
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"
