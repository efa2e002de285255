"""Grid sweeps over config fields: every point is a normal run folder under one sweep folder.

``run_sweep(base, {"latent_dim": [64, 128, 256, 512]}, out="runs/sweep")`` validates every point,
trains the unfinished ones (in this process, or ``jobs`` at once as ``vaelab train`` processes),
evaluates them (``vaelab.evaluation.evaluate_run``: FID in a named feature space), and writes::

    SWEEP_DIR/sweep_plan.yaml           base config + axes (a re-run must match it: resumable)
    SWEEP_DIR/runs/<point>/             one run folder per point (config.yaml, summary.json, eval.json, ...)
    SWEEP_DIR/samples/<point>.png       16 samples per point (the family's sampler), the same seed for every point
    SWEEP_DIR/sweep.json  sweep.md      one row per point: swept values, the model family's test numbers
                                        (VAEs: recon MSE, KL, -ELBO, active units; DDPM: eps-MSE), FID,
                                        training time, parameters
    SWEEP_DIR/sweep_curves.png          each metric against each swept field
    SWEEP_DIR/sweep_kl_per_dim.png      per-dimension KL of every point, sorted and as a histogram (when the
                                        points were evaluated with the ``latent`` metric)
    SWEEP_DIR/report.html               (written by the command line, see ``vaelab.reports``)

A point is finished when its run folder has ``summary.json`` (and ``eval.json`` when evaluating);
a point with a checkpoint but no summary is resumed from it; running the same sweep again only does
what is missing. A finished run of the same settings may be copied in as a point's folder (it is then
not trained again); one whose settings differ from the point's is refused by name.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from vaelab import plots
from vaelab.config import ALIASES, FIELD_NAMES, TrainConfig, with_overrides
from vaelab.data import to_pixels
from vaelab.errors import ConfigError, VaelabError
from vaelab.generation import generate
from vaelab.io import load_written_yaml, read_checked, write_json, write_text, write_yaml
from vaelab.run import Run, checkpoint_dirs
from vaelab.runtime import select_device

NOT_SWEEPABLE = ("out",)  # the sweep names every point's run folder itself
STRIP_SAMPLES = 16
PLAN_FILE = "sweep_plan.yaml"
# (key in a point's metrics, column label, picture title); the family's own columns come first
# (``SWEEP_COLUMNS`` of ``vaelab.families``: e.g. recon MSE, KL, -ELBO, active units for VAEs)
COMMON_METRICS = [
    ("fid", "FID", "FID"),
    ("fid_floor", "FID floor (train vs test)", "FID floor: real train vs test"),
    ("train_time_s", "train time (s)", "training time (s)"),
    ("parameters", "parameters", "parameters"),
]


@dataclass
class Point:
    """One grid point: its swept ``values``, folder ``name`` and full run ``config``."""

    name: str
    values: dict[str, Any]
    config: TrainConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out)


# ---------------------------------------------------------------------------- grid


def parse_value(text: str) -> Any:
    """``"64"`` -> 64, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"null"`` -> None, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_set(spec: str) -> tuple[str, list[Any]]:
    """``"latent_dim=64,128"`` -> ``("latent_dim", [64, 128])``.

    Raises:
        ConfigError: no ``=``, a key that is not a config field (named), ``out``, or an empty value list.
    """
    key, sep, values = spec.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {spec!r}: expected KEY=V1,V2,... (e.g. latent_dim=64,128)")
    name = ALIASES.get(key, key.replace("-", "_"))
    if name not in FIELD_NAMES:
        raise ConfigError(f"--set {spec!r}: unknown sweep key {key!r}; valid config fields: {', '.join(FIELD_NAMES)}")
    if name in NOT_SWEEPABLE:
        raise ConfigError(f"--set {spec!r}: {key!r} cannot be swept (the sweep names each point's run folder)")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"--set {spec!r}: empty value list for {key!r}; expected {key}=V1,V2,...")
    parsed = [parse_value(v) for v in items]
    if len(set(map(repr, parsed))) != len(parsed):
        raise ConfigError(f"--set {spec!r}: repeated value for {key!r}")
    return name, parsed


def parse_axes(specs: list[str]) -> dict[str, list[Any]]:
    """Several ``--set`` options -> ``{field: values}`` in the order given.

    Raises:
        ConfigError: no ``--set`` at all, a key set twice, or any ``parse_set`` error.
    """
    if not specs:
        raise ConfigError("a sweep needs at least one --set KEY=V1,V2,...")
    axes: dict[str, list[Any]] = {}
    for spec in specs:
        key, values = parse_set(spec)
        if key in axes:
            raise ConfigError(f"--set {spec!r}: {key!r} is already swept by another --set")
        axes[key] = values
    return axes


def expand_grid(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of ``axes``, first axis slowest: ``{"a": [1, 2], "b": [3]}`` ->
    ``[{"a": 1, "b": 3}, {"a": 2, "b": 3}]``."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def point_name(values: dict[str, Any]) -> str:
    """Folder name of a point: ``latent_dim=64_beta=4`` (characters outside ``[A-Za-z0-9.=_-]`` -> ``-``)."""
    text = "_".join(f"{k}={v}" for k, v in values.items())
    return "".join(c if c.isalnum() or c in ".=_-" else "-" for c in text)


def plan_sweep(base: TrainConfig, axes: dict[str, list[Any]], out: str | Path) -> list[Point]:
    """Every point of the grid with its config validated (``TrainConfig.resolved``); nothing is written.

    Raises:
        ConfigError: a point whose config is invalid, named with its values.
    """
    points = []
    for values in expand_grid(axes):
        name = point_name(values)
        try:
            config = with_overrides(base, {**values, "out": str(Path(out) / "runs" / name)})
            config.resolved()
        except ConfigError as exc:
            raise ConfigError(f"sweep point {name}: {exc}") from exc
        points.append(Point(name, values, config))
    return points


# ---------------------------------------------------------------------------- running


def is_trained(run_dir: Path) -> bool:
    """Whether a point's run folder holds a finished training (``Run.finished``)."""
    return (run_dir / "config.yaml").is_file() and Run(run_dir).finished


def run_sweep(
    base: TrainConfig,
    axes: dict[str, list[Any]],
    *,
    out: str | Path,
    jobs: int = 1,
    evaluate: bool = True,
    fid_features: str | None = None,
    inception_weights: str | None = None,
    num_samples: int = 10000,
    sampler: str | None = None,
    steps: int | None = None,
    metrics: Sequence[str] = ("fid",),
) -> Path:
    """Train (or resume) every unfinished point, evaluate them and write the sweep's files.

    Args:
        base: the config every point starts from; ``axes`` fields replace its values.
        axes: ``{config field: [values]}`` (see ``parse_axes``).
        out: the sweep folder.
        jobs: points trained at once; above 1 each runs as a ``python -m vaelab train`` process
            with its log in ``SWEEP_DIR/logs/<point>.log``.
        evaluate: compute FID etc. with ``vaelab.evaluation.evaluate_run`` (into each ``eval.json``).
        fid_features, inception_weights, num_samples: passed to ``evaluate_run`` (default feature
            spaces: Inception then classifier when the Inception weights are installed; the real
            images' statistics are cached, so every point only pays for its own samples).
        sampler, steps: the model family's sampler for FID samples and sample strips (default the family's).
        metrics: ``evaluate_run`` metrics of every point (default ``fid``); with ``latent`` the sweep also
            draws every point's per-dimension KL (``sweep_kl_per_dim.png``) and keeps it in ``sweep.json``.

    Returns:
        The sweep folder.

    Raises:
        ConfigError: bad axes/values, unknown metrics, feature spaces or missing Inception weights, a
            non-positive ``num_samples`` or ``jobs`` < 1, before anything is written.
        ConfigError: also a point's folder holding a run with other settings than the point's (e.g. a
            run copied in as a finished point), before any training.
        VaelabError: ``out`` holds a different sweep, or points failed (their logs named).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be a positive integer, got {jobs!r}")
    metrics = _check_metrics(metrics)
    if evaluate:  # the evaluation's settings are checked now, not after hours of training
        from vaelab.evaluation import DISTANCES, feature_spaces

        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ConfigError(f"--num-samples must be a positive integer, got {num_samples!r}")
        if set(DISTANCES) & set(metrics):
            feature_spaces(fid_features, inception_weights)
    out = Path(out)
    points = plan_sweep(base, axes, out)
    _check_plan(out, base, axes)
    for point in points:  # a folder copied in (or left by another sweep) must be this point's training
        if (point.run_dir / "config.yaml").is_file():
            Run(point.run_dir).check_same_settings(point.config)
    todo = [p for p in points if not is_trained(p.run_dir)]
    print(f"sweep {out}: {len(points)} points, {len(points) - len(todo)} already trained, {len(todo)} to train")
    if jobs == 1:
        for i, point in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] training {point.name}")
            _train_in_process(point)
    else:
        _train_in_processes(todo, out, jobs)
    if evaluate:
        _evaluate_points(points, fid_features=fid_features, inception_weights=inception_weights, num_samples=num_samples,
                         device=base.device, sampler=sampler, steps=steps, metrics=metrics)
    summarize_sweep(out, points, axes, base, sampler=sampler, steps=steps)
    return out


def _check_metrics(metrics: Sequence[str] | str) -> list[str]:
    from vaelab.evaluation import parse_metrics

    try:
        return parse_metrics(metrics)
    except ConfigError as exc:
        raise ConfigError(f"sweep metrics: {exc}") from None


def _check_plan(out: Path, base: TrainConfig, axes: dict[str, list[Any]]) -> None:
    plan = {"base_config": base.to_dict(), "axes": axes}
    path = out / PLAN_FILE
    if path.is_file():
        old = read_checked(path, load_written_yaml,
                           remedy="delete it and rerun the sweep, which writes it again (finished points are kept)")
        if old != yaml.safe_load(yaml.safe_dump(plan)):
            raise VaelabError(f"{out} holds a different sweep (see {path}); use another --out or the same config and --set")
    else:
        write_yaml(path, plan)


def _train_in_process(point: Point) -> None:
    from vaelab.training import resume, train

    if checkpoint_dirs(point.run_dir):
        resume(point.run_dir)
    else:
        shutil.rmtree(point.run_dir, ignore_errors=True)  # a start that died before its first checkpoint
        train(point.config)


def _train_in_processes(todo: list[Point], out: Path, jobs: int) -> None:
    """Run ``vaelab train`` for each point, ``jobs`` processes at once; raise naming the failed points."""
    waiting, running, failed = list(todo), [], []
    (out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        _run_processes(waiting, running, failed, out, jobs)
    finally:  # an error or Ctrl-C here: stop the children, close their logs (a rerun resumes them)
        for _, proc, handle, _ in running:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            handle.close()
    if failed:
        raise VaelabError(f"{len(failed)} sweep point(s) failed: {', '.join(failed)}; fix and re-run the sweep to resume")


def _run_processes(waiting: list[Point], running: list, failed: list[str], out: Path, jobs: int) -> None:
    while waiting or running:
        while waiting and len(running) < jobs:
            point = waiting.pop(0)
            if checkpoint_dirs(point.run_dir):
                args = ["train", "--resume", str(point.run_dir)]
            else:
                shutil.rmtree(point.run_dir, ignore_errors=True)
                config_file = out / "configs" / f"{point.name}.yaml"
                write_yaml(config_file, point.config.to_dict())
                args = ["train", "--config", str(config_file)]
            log = out / "logs" / f"{point.name}.log"
            handle = log.open("w")
            # the cores are shared out: oversubscribed CPU threads slow every process down several times
            threads = str(max(1, (os.cpu_count() or 1) // jobs))
            proc = subprocess.Popen([sys.executable, "-m", "vaelab", *args], stdout=handle, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": threads})
            running.append((point, proc, handle, log))
            print(f"started {point.name} (pid {proc.pid}, log {log})")
        time.sleep(0.5)
        for item in list(running):
            point, proc, handle, log = item
            if proc.poll() is not None:
                handle.close()
                running.remove(item)
                print(f"{point.name}: {'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'}")
                if proc.returncode != 0:
                    failed.append(f"{point.name} (see {log})")


def _evaluate_points(points: list[Point], *, fid_features: str | None, inception_weights: str | None, num_samples: int,
                     device: str, sampler: str | None, steps: int | None, metrics: list[str]) -> None:
    from vaelab.evaluation import evaluate_run

    for i, point in enumerate(points, 1):
        earlier = Run(point.run_dir).read_json("eval.json")
        if earlier is not None:
            if _evaluated_as_asked(earlier.get("settings") or {}, metrics=metrics, num_samples=num_samples,
                                   fid_features=fid_features, sampler=sampler, steps=steps):
                continue
            print(f"[{i}/{len(points)}] {point.name}: its eval.json was made with other settings; evaluating again")
        print(f"[{i}/{len(points)}] evaluating {point.name}")
        evaluate_run(point.run_dir, metrics=metrics, fid_features=fid_features, inception_weights=inception_weights,
                     num_samples=num_samples, device=device, sampler=sampler, steps=steps)


def _evaluated_as_asked(settings: dict, *, metrics: list[str], num_samples: int, fid_features, sampler, steps) -> bool:
    """Whether an earlier ``eval.json``'s ``settings`` cover this sweep's evaluation (same N, sampler and
    feature spaces where given, and every metric asked for)."""
    drawn = settings.get("sampler") or {}
    spaces = [s.strip() for s in fid_features.split(",")] if isinstance(fid_features, str) else fid_features
    return (set(metrics) <= set(settings.get("metrics") or []) and settings.get("num_samples") == num_samples
            and (sampler is None or drawn.get("sampler") == sampler.split(":")[0])
            and (steps is None or drawn.get("steps") == steps)
            and (spaces is None or list(settings.get("fid_features") or []) == list(spaces)))


# ---------------------------------------------------------------------------- summary


def point_metrics(run: Run) -> dict[str, Any]:
    """The sweep-table numbers of one finished run (test split; its family's columns, FID from ``eval.json``)."""
    summary = run.summary()
    metrics = {
        **run.family.sweep_metrics(summary),
        "fid": None,
        "fid_feature_space": None,
        "fid_floor": None,
        "train_time_s": summary["train_time_s"],
        "parameters": summary["parameters"],
        "epochs": summary["epochs"],
    }
    eval_result = run.read_json("eval.json")
    if eval_result is not None:
        metrics.update(fid_entry(eval_result))
    return metrics


def fid_entry(eval_result: dict) -> dict[str, Any]:
    """``{"fid", "fid_feature_space", "fid_num_samples"}`` from an ``eval.json`` dict (``None`` where absent)."""
    entry = eval_result.get("fid") if isinstance(eval_result, dict) else None
    if isinstance(entry, dict) and entry.get("value") is not None:
        floor = entry.get("floor")
        return {"fid": entry["value"], "fid_feature_space": entry.get("feature_space"),
                "fid_num_samples": entry.get("num_samples"),
                "fid_floor": floor.get("value") if isinstance(floor, dict) else floor}
    return {"fid": None, "fid_feature_space": None, "fid_floor": None}


def summarize_sweep(out: Path, points: list[Point], axes: dict[str, list[Any]], base: TrainConfig, *,
                    sampler: str | None = None, steps: int | None = None) -> dict:
    """Write ``sweep.json``, ``sweep.md``, ``sweep_curves.png`` and the sample strips; return the sweep dict."""
    rows, columns_of_families = [], []
    device = select_device(base.device)
    for point in points:
        run = Run(point.run_dir)
        metrics = point_metrics(run)
        for column in run.family.SWEEP_COLUMNS:
            if column not in columns_of_families:
                columns_of_families.append(column)
        model = run.load_model(device)
        draw = run.family.sampler(model, run, sampler=sampler, steps=steps)
        images, _ = generate(model, draw, STRIP_SAMPLES, seed=base.seed, batch_size=STRIP_SAMPLES)
        plots.save_grid(to_pixels(images), out / "samples" / f"{point.name}.png", nrow=STRIP_SAMPLES)
        row = {"name": point.name, "values": point.values, "run_dir": f"runs/{point.name}",
               "samples": f"samples/{point.name}.png", "sampler": draw.options, "metrics": metrics}
        latent = (run.read_json("eval.json") or {}).get("latent")
        if isinstance(latent, dict) and latent.get("kl_per_dim_nats"):
            row["kl_per_dim_nats"] = latent["kl_per_dim_nats"]
        rows.append(row)
    first = Run(points[0].run_dir).summary()
    spaces = sorted({str(r["metrics"]["fid_feature_space"]) for r in rows if r["metrics"]["fid"] is not None})
    counts = sorted({r["metrics"].get("fid_num_samples") for r in rows if r["metrics"].get("fid_num_samples")})
    fid_label = "FID" + (f" [{'; '.join(spaces)}]" if spaces else "") + (
        f" ({', '.join(f'{n:,}' for n in counts)} samples vs test)" if counts else "")
    metric_columns = columns_of_families + COMMON_METRICS
    columns = [{"key": k, "label": k} for k in axes] + [
        {"key": k, "label": fid_label if k == "fid" else label, "title": title} for k, label, title in metric_columns]
    budget = f"{base.epochs or first['epochs']} epochs" + (f" on {base.train_subset:,} random train images" if base.train_subset else "")
    sweep = {
        "description": (
            f"Grid over {', '.join(f'{k} in {v}' for k, v in axes.items())} on {first['dataset']}, {budget} per point. "
            f"Each model family's test numbers on the test split ({first['num_test_images']:,} images; VAEs: recon MSE "
            f"per pixel on {base.pixel_range} pixels, KL and -ELBO in nats per image with one z sample, active units; "
            "diffusion models: epsilon-MSE per pixel); FID of generated samples against the test split in the named "
            "feature space; training time on the machine that ran the sweep."
        ),
        "dataset": first["dataset"],
        "split": "test",
        "axes": axes,
        "columns": columns,
        "points": rows,
        "base_config": base.to_dict(),
    }
    spectra = {r["name"]: r["kl_per_dim_nats"] for r in rows if "kl_per_dim_nats" in r}
    if spectra:
        sweep["kl_per_dim_picture"] = "sweep_kl_per_dim.png"
        plots.kl_spectra(spectra, out / "sweep_kl_per_dim.png", source=first["dataset"])
    write_json(out / "sweep.json", sweep)
    write_text(out / "sweep.md", sweep_markdown(sweep))
    sweep_curves(sweep, out / "sweep_curves.png")
    return sweep


def sweep_markdown(sweep: dict) -> str:
    """``sweep.md``: the description and one table row per point."""
    cols = sweep["columns"]
    lines = [f"# Sweep on {sweep['dataset']}", "", sweep["description"], "",
             "| " + " | ".join(c["label"] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in sweep["points"]:
        flat = {**row["values"], **row["metrics"]}
        cells = []
        for c in cols:
            v = flat.get(c["key"])
            if c["key"] == "active_units" and v is not None and row["metrics"].get("latent_dim"):
                v = f"{v}/{row['metrics']['latent_dim']}"
            cells.append(_md_value(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _md_value(v: Any) -> str:
    if v is None:
        return "not computed"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10000:
        return f"{v:,}"
    return str(v)


def sweep_curves(sweep: dict, path: Path) -> None:
    """One row of panels per swept field: each metric against that field's values, one line per
    combination of the other fields (categorical x positions for non-numeric values)."""
    import matplotlib.pyplot as plt

    axes_keys = list(sweep["axes"])
    shown = [(c["key"], c["title"]) for c in sweep["columns"]
             if c["key"] not in sweep["axes"] and c["key"] != "fid_floor"
             and any(r["metrics"].get(c["key"]) is not None for r in sweep["points"])]
    ncols = min(4, len(shown))
    per_key = -(-len(shown) // ncols)  # rows of panels for one swept field
    fig, panels = plt.subplots(per_key * len(axes_keys), ncols, figsize=(3.6 * ncols, 3.0 * per_key * len(axes_keys)),
                               squeeze=False)
    for key_i, key in enumerate(axes_keys):
        for unused in range(len(shown), per_key * ncols):
            panels.flat[key_i * per_key * ncols + unused].axis("off")
        xs = sweep["axes"][key]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        others = [k for k in axes_keys if k != key]
        groups: dict[tuple, list] = {}
        for r in sweep["points"]:
            groups.setdefault(tuple(r["values"][k] for k in others), []).append(r)
        for col_i, (metric, title) in enumerate(shown):
            ax = panels.flat[key_i * per_key * ncols + col_i]
            for combo, rs in groups.items():
                rs = sorted(rs, key=lambda r: xs.index(r["values"][key]))
                pos = [r["values"][key] if numeric else xs.index(r["values"][key]) for r in rs]
                label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or None
                line = ax.plot(pos, [r["metrics"].get(metric) for r in rs], "o-", label=label)[0]
                if metric == "fid":  # the FID of real train vs real test images: the best reachable value
                    ax.plot(pos, [r["metrics"].get("fid_floor") for r in rs], "--", color=line.get_color(),
                            alpha=0.6, label="floor (real train vs test)" if not others else None)
            if numeric and min(xs) > 0 and max(xs) / min(xs) >= 4:
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.minorticks_off()
            elif not numeric:
                ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            space = next((r["metrics"].get("fid_feature_space") for r in sweep["points"] if r["metrics"].get("fid_feature_space")), None)
            ax.set_title(f"{title}" + (f"\n({space})" if metric == "fid" and space else ""), fontsize=9)
            ax.set_xlabel(key)
            ax.grid(alpha=0.3)
            if (others and col_i == 0) or (metric == "fid" and not others):
                ax.legend(fontsize=7)
    fig.suptitle(f"sweep on {sweep['dataset']} (test split)", fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, path)
