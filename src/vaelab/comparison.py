"""Side-by-side comparison of trained runs (e.g. a beta-VAE and a DDPM): cost, speed and sample quality.

For every entry: model family, parameters, latent space, network passes per image, training time
per epoch and images/s (from its ``metrics.jsonl``), generation time for 150 and 1,000 samples
(``vaelab.metrics.speed.time_generation``: same device, one batch, warmed up, median of repeats)
and every metric of ``vaelab evaluate`` (``vaelab.evaluation.evaluate_run``). Each run gives the
entries its family names (``comparison_samplers``): a VAE its prior sampler, a diffusion run the
full ``T``-step ancestral DDPM sampler and DDIM with ``ddim_steps`` steps.

Output folder (must be new; written to a temporary folder, then renamed into place)::

    comparison.md  comparison.json  compare_samples.png  confidence_hist.png
    samples_<entry>.png  confidence_<entry>.png   (the per-entry pictures of evaluate_run)

An interrupted comparison resumes: every finished entry is kept in ``.<out>.partial/`` beside ``out``
(``entry_<entry>.json`` and its pictures, under a ``key.json`` of the settings and the SHA-256 of every
run's weights); the same command again skips those entries. A partial folder whose key differs (other
settings, retrained runs) is discarded with a warning.

Finished entries are also cached across comparisons (``vaelab.data.cache_dir()/comparison-entries/``), keyed
by the SHA-256 of the run's weights, the sampler, the number of samples, the seed, the device, the data and
every evaluation and timing setting: a study that compares runs another comparison already measured (the
same weights, e.g. copied into a second study) takes those entries instead of sampling again, as long as
the cached entry measured every metric wanted (extra ones are dropped). A reused entry says so
(``reused_from``: where and when it was measured); ``use_cache=False`` measures everything.

Entries are timed one after another, between evaluations that can take hours, and a reused entry keeps
the time of the comparison that measured it: on a machine whose load changes, one comparison's times can
then come from different conditions. ``retime=True`` (``--retime``) times every entry again, back to back,
once all are evaluated, so the times in the table share one set of conditions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path

from vaelab import plots
from vaelab.data import cache_dir
from vaelab.errors import ConfigError
from vaelab.families import family_of
from vaelab.io import DamagedFileError, dumps, read_cache, read_json, warn, write_json, write_text
from vaelab.metrics.likelihood import DEFAULT_SUBSET
from vaelab.metrics.speed import SIZES as TIMING_SIZES
from vaelab.metrics.speed import time_generation
from vaelab.models import count_parameters
from vaelab.run import Run
from vaelab.runtime import provenance, select_device


def _check_positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def _training_stats(run: Run) -> dict:
    rows = run.metrics()
    summary = run.summary() or {}
    if not rows:
        return {"epochs": 0, "note": "no metrics.jsonl rows"}
    seconds = sum(r["epoch_time_s"] for r in rows)
    images = sum(r["images_per_s"] * r["epoch_time_s"] for r in rows)
    return {
        "epochs": rows[-1]["epoch"],
        "train_images_per_epoch": round(images / len(rows)),
        "epoch_time_s": seconds / len(rows),
        "images_per_s": images / seconds,
        "train_time_s": seconds,
        # CPU time (all threads) says what the training cost on a machine shared with other jobs, where
        # wall time also counts the waiting; the run's summary has it (None where a row predates it)
        "train_cpu_time_s": summary.get("train_cpu_time_s"),
        "device": summary.get("device"),
        "definition": "epoch_time_s: mean over the epochs in metrics.jsonl of the wall time of the training passes "
                      "(validation excluded); train_time_s: their sum; train_cpu_time_s: the process CPU time of "
                      "the same passes, summed",
    }


PARTIAL_KEY = "key.json"
ENTRY_CACHE_VERSION = 1  # raise when what an entry measures changes (a metric's protocol, the timing method)


def _entry_cache_folder(key: dict) -> Path:
    digest = hashlib.sha1(dumps({"version": ENTRY_CACHE_VERSION, **key}, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "comparison-entries" / digest[:24]


def _cached_entry(key: dict, metrics: list[str]) -> tuple[dict, Path] | None:
    """The cached ``{generation_time, evaluation, pictures, measured}`` of an entry with ``key`` whose
    evaluation covers ``metrics`` (the others' results removed), and its folder; ``None`` when there is none
    (a damaged cache file is a warning, then a miss)."""
    folder = _entry_cache_folder(key)
    if not (folder / "entry.json").is_file():
        return None
    stored = read_cache(folder / "entry.json", lambda p: json.loads(p.read_text()), redo="measuring the entry again")
    if not stored or stored.get("key") != json.loads(dumps(key)):
        return None
    evaluation = stored["evaluation"]
    measured = evaluation.get("settings", {}).get("metrics", [])
    if not set(metrics) <= set(measured):
        return None
    spaces = evaluation["settings"].get("fid_features") or []
    for extra in set(measured) - set(metrics):
        for name in [extra, *(f"{extra}_{space}" for space in spaces)]:
            evaluation.pop(name, None)
        evaluation.get("not_applicable", {}).pop(extra, None)
    evaluation["settings"]["metrics"] = [m for m in measured if m in metrics]
    if any(not (folder / f).is_file() for f in stored["pictures"].values()):
        return None
    return stored, folder


def _cache_entry(key: dict, result: dict, pictures_from: Path, measured: dict) -> None:
    """Store a finished entry's measurements and pictures for later comparisons of the same weights;
    ``measured``: ``{"comparison": its folder, "at": ISO time}``."""
    folder = _entry_cache_folder(key)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in result["pictures"].values():
        shutil.copyfile(pictures_from / name, tmp / name)
    write_json(tmp / "entry.json", {"key": key, "generation_time": result["generation_time"],
                                    "evaluation": result["evaluation"], "pictures": result["pictures"],
                                    "measured": measured})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _partial_folder(out: Path, key: dict) -> Path:
    """``.<out>.partial`` beside ``out``: kept from an interrupted comparison with the same ``key``, else new.

    A folder with another key (or an unreadable one) is discarded with a warning, so a resumed comparison
    never mixes entries measured under different settings or of other weights.
    """
    tmp = out.parent / f".{out.name}.partial"
    if tmp.is_dir():
        try:
            kept = read_json(tmp / PARTIAL_KEY, remedy="starting the comparison afresh")
        except DamagedFileError:
            kept = None
        if kept == json.loads(dumps(key)):
            return tmp
        warn(f"{tmp} holds entries of an interrupted comparison with other settings or other weights; "
             "discarding them and starting afresh")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_json(tmp / PARTIAL_KEY, key)
    return tmp


def compare_runs(
    run_dirs: list[str | Path],
    *,
    out: str | Path | None = None,
    num_samples: int = 10000,
    ddpm_num_samples: int | None = None,
    ddim_steps: int = 50,
    metrics: list[str] | str | None = None,
    fid_features: str | None = None,
    iwae_k: int = 1000,
    nll_subset: int | None = DEFAULT_SUBSET,
    timing_repeats: int = 3,
    timing_max_steps: int | None = None,
    allow_mixed: bool = False,
    device: str = "auto",
    seed: int = 0,
    inception_weights: str | Path | None = None,
    feature_precision: str = "fp32",
    inception_engine: str = "auto",
    use_cache: bool = True,
    retime: bool = False,
) -> Path:
    """Compare trained runs; write ``comparison.md``, ``comparison.json`` and pictures into ``out``.

    Args:
        run_dirs: two or more run folders written by ``vaelab train``.
        out: the comparison folder to create (default ``runs/compare-<timestamp>``); it must not
            exist (an empty folder is accepted): compare never deletes or replaces a folder.
        num_samples: generated images per entry for FID/KID/confidence.
        ddpm_num_samples: the same for the full ``T``-step DDPM sampler (default ``num_samples``;
            the ``T``-step chain is ``T / ddim_steps`` times slower than DDIM).
        ddim_steps: DDIM steps for diffusion runs, in ``[1, T]``.
        metrics: metrics of ``evaluate_run`` (default: all but ``speed``, which this comparison
            measures itself with one protocol for every entry).
        fid_features, iwae_k, nll_subset, inception_weights, feature_precision, inception_engine: passed to
            ``evaluate_run`` (default feature
            spaces: Inception then classifier when the Inception weights are installed; likelihood on
            500 random test images).
        timing_repeats: timed runs per measurement (median reported).
        timing_max_steps: time diffusion samplers with more steps than this on a shortened chain
            and scale linearly (stated in the output); ``None`` times the full chain.
        allow_mixed: accept runs trained on different datasets.
        device: ``auto``, ``cpu``, ``cuda``...; the same for every entry.
        seed: seeds sampling (the same for every entry).
        use_cache: take entries measured by an earlier comparison with the same weights and settings from
            the entry cache (and store this one's); also passed to ``evaluate_run`` (cached reference
            statistics and features). ``False`` measures everything and stores nothing.
        retime: time every entry's generation again, back to back, after all are evaluated (replacing the
            times taken entry by entry or from the cache; the cache keeps its own).

    Returns:
        The comparison folder.

    Raises:
        ConfigError: fewer than two runs, a non-positive count, DDIM steps outside ``[1, T]``,
            an unknown metric, runs on different datasets without ``allow_mixed``, or an existing
            ``out``. VaelabError: a folder is not a run with a checkpoint.
            All raised before any work.
    """
    from vaelab.evaluation import DEFAULT_METRICS, DISTANCES, evaluate_run, feature_spaces, parse_metrics
    from vaelab.metrics.inception import ENGINES, PRECISIONS

    # 1. validate everything before any work
    run_dirs = [Path(r) for r in run_dirs]
    if len(run_dirs) < 2:
        raise ConfigError(f"compare needs at least two run folders, got {len(run_dirs)}")
    for name, value in (("num_samples", num_samples), ("ddim_steps", ddim_steps), ("iwae_k", iwae_k),
                        ("timing_repeats", timing_repeats)):
        _check_positive(name, value)
    for name, value in (("ddpm_num_samples", ddpm_num_samples), ("nll_subset", nll_subset),
                        ("timing_max_steps", timing_max_steps)):
        _check_positive(name, value, allow_none=True)
    metrics = [m for m in DEFAULT_METRICS if m != "speed"] if metrics is None else parse_metrics(metrics)
    if set(DISTANCES) & set(metrics):
        feature_spaces(fid_features, inception_weights)  # raises for unknown spaces or missing weights
    if feature_precision not in PRECISIONS or inception_engine not in ENGINES:
        raise ConfigError(f"feature precision {feature_precision!r} / Inception engine {inception_engine!r}: expected "
                          f"one of {', '.join(PRECISIONS)} / {', '.join(ENGINES)}")
    runs = [Run(r) for r in run_dirs]
    for run in runs:
        run.last_checkpoint()
    configs = [run.config for run in runs]
    datasets = {(c.dataset, c.data_root if c.dataset == "imagefolder" else None) for c in configs}
    if len(datasets) > 1 and not allow_mixed:
        listing = ", ".join(f"{r} ({c.dataset}{' at ' + str(c.data_root) if c.dataset == 'imagefolder' else ''})"
                            for r, c in zip(run_dirs, configs))
        raise ConfigError(f"the runs were trained on different datasets: {listing}; compare runs of one dataset "
                          "or pass --allow-mixed")
    out = Path(out) if out else Path("runs") / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists; choose a new folder (compare never replaces or deletes one)")
    dev = select_device(device)
    models = [run.load_model(dev) for run in runs]
    # one entry per (run, sampler): a VAE gives its prior sampler, a DDPM the T-step chain and DDIM
    entries = [(run, model, sampler) for run, model in zip(runs, models)
               for sampler in family_of(model).comparison_samplers(model, run, ddim_steps=ddim_steps)]

    settings = {"num_samples": num_samples, "ddpm_num_samples": ddpm_num_samples or num_samples,
                "ddim_steps": ddim_steps, "metrics": metrics, "fid_features": fid_features, "iwae_k": iwae_k,
                "nll_subset": nll_subset, "timing_repeats": timing_repeats, "timing_max_steps": timing_max_steps,
                "timing_sizes": list(TIMING_SIZES), "seed": seed, "allow_mixed": allow_mixed}
    key = {"settings": settings, "device": str(dev), "feature_precision": feature_precision,
           "inception_engine": inception_engine, "inception_weights": str(inception_weights),
           "runs": [{"run": str(run.path.resolve()), "weights_sha256": run.weights_sha256()} for run in runs]}

    # 2. per entry: timing, then the evaluation suite; each finished entry is kept in the partial folder
    tmp = _partial_folder(out, key)
    shas = {r["run"]: r["weights_sha256"] for r in key["runs"]}
    results = []
    for run, model, sampler in entries:
        family = family_of(model)
        label = f"{run.path.name} ({family.NAME.upper()}, {sampler.label})"
        slug = _slug(label)
        done = tmp / f"entry_{slug}.json"
        n_eval = ddpm_num_samples if sampler.name == "ddpm" and ddpm_num_samples else num_samples
        sha = shas[str(run.path.resolve())]
        cache_key = {"weights_sha256": sha, "sampler": sampler.options, "num_samples": n_eval, "device": str(dev),
                     "dataset": run.config.dataset, "data_root": str(run.config.data_root),
                     "feature_precision": feature_precision, "inception_engine": inception_engine,
                     "inception_weights": str(inception_weights),
                     **{k: settings[k] for k in ("fid_features", "iwae_k", "nll_subset", "timing_repeats",
                                                 "timing_max_steps", "timing_sizes", "seed")}}
        if done.is_file():
            try:
                kept = read_json(done, remedy="evaluating the entry again")
                kept["weights_sha256"] = sha  # the partial folder's key holds these weights' SHA-256
                results.append(kept)
                print(f"comparing {label}: finished in an earlier, interrupted run ({done})")
                if use_cache and "reused_from" not in kept and not _entry_cache_folder(cache_key).is_dir():
                    at = datetime.fromtimestamp(done.stat().st_mtime).isoformat(timespec="seconds")
                    _cache_entry(cache_key, kept, tmp, {"comparison": str(out), "at": at})
                continue
            except DamagedFileError as exc:
                warn(str(exc))
        result = {
            "label": label, "run": str(run.path), "weights_sha256": sha, "dataset": run.config.dataset,
            "model": run.config.model, "family": family.NAME, "sampler": sampler.options,
            "parameters": count_parameters(model), "latent_space": sampler.latent_space,
            "network_evaluations": sampler.network_evaluations, "training": _training_stats(run),
        }
        hit = _cached_entry(cache_key, metrics) if use_cache else None
        if hit:
            stored, folder = hit
            print(f"comparing {label}: measured by an earlier comparison ({stored['measured']['comparison']}, "
                  f"{stored['measured']['at']}), taken from the entry cache")
            pictures = {}
            for name, src in stored["pictures"].items():
                pictures[name] = f"{name}_{slug}.png"
                shutil.copyfile(folder / src, tmp / pictures[name])
            result.update(generation_time=stored["generation_time"], evaluation=stored["evaluation"],
                          pictures=pictures, reused_from=stored["measured"])
        else:
            print(f"comparing {label}: timing generation ({', '.join(map(str, TIMING_SIZES))} samples)")
            timing = {str(n): time_generation(model, sampler, n, repeats=timing_repeats, max_steps=timing_max_steps,
                                              seed=seed) for n in TIMING_SIZES}
            print(f"comparing {label}: evaluate_run with {n_eval:,} samples")
            scratch = tmp / ".evaluation"  # this entry's eval.json and pictures (the run folder is left alone)
            shutil.rmtree(scratch, ignore_errors=True)
            evaluation = evaluate_run(run.path, metrics=metrics, fid_features=fid_features, num_samples=n_eval,
                                      iwae_k=iwae_k, nll_subset=nll_subset, device=str(dev), seed=seed,
                                      sampler=sampler.options.get("sampler"), steps=sampler.options.get("steps"),
                                      inception_weights=inception_weights, feature_precision=feature_precision,
                                      inception_engine=inception_engine, out=scratch, use_cache=use_cache)
            pictures = {}
            for name, src in {"samples": "eval_samples.png", "confidence": "confidence_hist.png"}.items():
                if (scratch / src).is_file():
                    pictures[name] = f"{name}_{slug}.png"
                    shutil.copyfile(scratch / src, tmp / pictures[name])
            shutil.rmtree(scratch)
            result.update(generation_time=timing, evaluation=evaluation, pictures=pictures)
        write_json(done, result)
        if use_cache and not hit:
            _cache_entry(cache_key, result, tmp, {"comparison": str(out), "at": datetime.now().isoformat(timespec="seconds")})
        results.append(result)

    if retime:  # one set of times under one set of conditions (see the module docstring)
        for (run, model, sampler), result in zip(entries, results):
            print(f"comparing {result['label']}: timing generation again, back to back with the other entries")
            result["generation_time"] = {str(n): time_generation(model, sampler, n, repeats=timing_repeats,
                                                                 max_steps=timing_max_steps, seed=seed)
                                         for n in TIMING_SIZES}

    # 3. outputs, written into the partial folder, which then becomes ``out``
    report = {"entries": results, **provenance(dev, seed), "settings": {**settings, "retime": retime}}
    write_json(tmp / "comparison.json", report)
    write_text(tmp / "comparison.md", comparison_markdown(report))
    with_grids = [r for r in results if "samples" in r["pictures"]]
    if with_grids:  # none when no metric drew samples (e.g. --metrics recon,nll)
        plots.compare_samples([tmp / r["pictures"]["samples"] for r in with_grids],
                              [r["label"] for r in with_grids], tmp / "compare_samples.png")
    hists = [(r["label"], r["evaluation"]["confidence"]) for r in results if "confidence" in r["evaluation"]]
    if hists:
        plots.confidence_hist(hists, tmp / "confidence_hist.png")
    for path in [tmp / PARTIAL_KEY, *tmp.glob("entry_*.json")]:  # kept until every output is written
        path.unlink()
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.replace(tmp, out)
    return out


def _fmt(value, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def distance_rows(spaces: list[str], ev, pair) -> list[tuple]:
    """Table rows of FID, its floor, KID and precision/recall/density/coverage for every feature space."""
    rows = []
    for i, space in enumerate(spaces):
        fid, kid, prdc = ("fid", "kid", "prdc") if i == 0 else (f"fid_{space}", f"kid_{space}", f"prdc_{space}")
        rows += [
            (f"FID [{space}]", lambda r, fid=fid: ev(r, fid, "value")),
            ("  floor (real train vs test)", lambda r, fid=fid: ev(r, fid, "floor", "value")),
            (f"KID [{space}]", lambda r, kid=kid: ev(r, kid, "value", spec=".4f")),
            (f"precision / recall (k=3) [{space}]",
             lambda r, p=prdc: pair(r, p, (("precision",), ".3f"), (("recall",), ".3f"))),
            (f"density / coverage (k=5) [{space}]",
             lambda r, p=prdc: pair(r, p, (("density",), ".3f"), (("coverage",), ".3f"))),
        ]
    return rows


def comparison_markdown(report: dict) -> str:
    """The comparison table (one column per entry) with every number's definition below it."""
    entries = report["entries"]

    def ev(r: dict, *path, spec: str = ".4g") -> str:
        node = r["evaluation"]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return "n/a"
            node = node[key]
        return _fmt(node, spec)

    def gen_time(r: dict, n: int) -> str:
        t = r["generation_time"][str(n)]
        mark = " (extrapolated)" if t["method"].startswith("extrapolated") else ""
        rate = t["samples_per_s"]
        return f"{t['seconds']:.4g} s ({rate:,.0f}/s){mark}" if rate >= 100 else f"{t['seconds']:.4g} s ({rate:.3g}/s){mark}"

    def pair(r: dict, metric: str, a: tuple, b: tuple) -> str:
        if metric not in r["evaluation"]:
            return ev(r, metric)
        return f"{ev(r, metric, *a[0], spec=a[1])} / {ev(r, metric, *b[0], spec=b[1])}"

    rows = [
        ("model family", lambda r: f"{r['family'].upper()} ({r['model']})"),
        ("parameters", lambda r: f"{r['parameters']:,}"),
        ("latent space", lambda r: r["latent_space"]),
        ("network passes per image", lambda r: str(r["network_evaluations"])),
        ("training: epochs", lambda r: str(r["training"].get("epochs"))),
        ("training: time per epoch", lambda r: f"{_fmt(r['training'].get('epoch_time_s'), '.1f')} s"),
        ("training: images/s", lambda r: _fmt(r["training"].get("images_per_s"), ".1f")),
        ("training device", lambda r: str(r["training"].get("device"))),
        ("generation time, 150 samples", lambda r: gen_time(r, 150)),
        ("generation time, 1,000 samples", lambda r: gen_time(r, 1000)),
        ("samples for the metrics", lambda r: ev(r, "settings", "num_samples", spec=",")),
        *distance_rows(entries[0]["evaluation"].get("settings", {}).get("fid_features") or [], ev, pair),
        ("evaluator mean max-probability", lambda r: ev(r, "confidence", "generated", "mean_max_prob", spec=".3f")),
        ("  same on real test images", lambda r: ev(r, "confidence", "real_test", "mean_max_prob", spec=".3f")),
        ("share with max-probability >= 0.8", lambda r: ev(r, "confidence", "generated", "share_confident", spec=".3f")),
        ("class balance of samples (entropy / log K)", lambda r: ev(r, "confidence", "generated", "class_balance", spec=".3f")),
        ("recon MSE per pixel (test)", lambda r: ev(r, "recon", "mse_per_pixel", spec=".5f")),
        ("recon PSNR dB / SSIM", lambda r: pair(r, "recon", (("psnr_db",), ".2f"), (("ssim",), ".3f"))),
        ("-ELBO nats (test)", lambda r: ev(r, "nll", "neg_elbo_nats", spec=".2f")),
        ("IWAE NLL nats (test)", lambda r: ev(r, "nll", "iwae_nll_nats", spec=".2f")),
        ("  bound of", lambda r: ev(r, "nll", "bound_of", spec="")),
        ("active units", lambda r: pair(r, "latent", (("active_units",), "d"), (("latent_dim",), "d"))),
    ]
    head = "| | " + " | ".join(r["label"] for r in entries) + " |"
    lines = [f"# Comparison of {len(entries)} generators", "", head, "|---" * (len(entries) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(fn(r).replace("|", "\\|") for r in entries) + " |" for name, fn in rows]
    first = entries[0]["evaluation"]
    s = report["settings"]
    lines += [
        "",
        "## Definitions",
        f"- Dataset: {', '.join(sorted({r['evaluation'].get('dataset', r['dataset']) for r in entries}))}; metrics on the test split.",
        f"- Device for generation timing and metrics: {report['device']}"
        + (f" ({report['threads']} threads)" if report["threads"] else "") + ". Training numbers come from each run's "
        "own metrics.jsonl (training device in the table).",
        f"- Generation time: `model.sample(n)` in one batch of n, seed {s['seed']}, median of {s['timing_repeats']} runs "
        "after a warm-up; DDPM/DDIM use the EMA weights."
        + (f" Chains longer than {s['timing_max_steps']} steps are timed on {s['timing_max_steps']} steps and scaled "
           "linearly (every step is one UNet evaluation plus a scheduler update), marked 'extrapolated'."
           if s["timing_max_steps"] else "")
        + (" Every entry was timed again after all were evaluated, one after another in this process (--retime), so "
           "the times share one set of machine conditions." if s.get("retime") else
           " Entries are timed one by one before their evaluation, and an entry from the entry cache keeps the time "
           "measured with it: on a machine whose load changes, --retime times them all back to back."),
    ]
    for i, space in enumerate(first.get("settings", {}).get("fid_features") or []):
        entry = first.get("fid" if i == 0 else f"fid_{space}") or first.get("prdc" if i == 0 else f"prdc_{space}")
        if entry:
            lines.append(f"- FID/KID/precision-recall [{space}]: {entry['feature_space']}, generated samples vs "
                         f"{entry['real']}; the floor is {entry['floor']['definition']}.")
    if "prdc" in first:
        lines.append(f"- Precision/recall/density/coverage: {first['prdc']['metric']}; {first['prdc']['definition']}.")
    if "confidence" in first:
        lines.append(f"- Confidence: the evaluator classifier's softmax on the generated samples (threshold "
                     f"{first['confidence']['generated']['confidence_threshold']}).")
    reasons: dict[tuple[str, str], list[str]] = {}
    for r in entries:
        for metric, why in r["evaluation"].get("not_applicable", {}).items():
            reasons.setdefault((metric, why), []).append(r["label"])
    for (metric, why), labels in reasons.items():
        lines.append(f"- n/a, {metric} of {', '.join(dict.fromkeys(labels))}: {why.rstrip('.')}.")
    for r in entries:
        if "reused_from" in r:
            lines.append(f"- {r['label']}: measured by the comparison {r['reused_from']['comparison']} at "
                         f"{r['reused_from']['at']} (the same weights, sampler and settings), taken from the entry cache.")
    warnings = sorted({w for r in entries for w in r["evaluation"].get("warnings", [])})
    if warnings:
        lines += ["", "## Warnings", *[f"- {w}" for w in warnings]]
    pictures = []
    if any("samples" in r["pictures"] for r in entries):
        pictures.append("compare_samples.png (samples side by side)")
    if any("confidence" in r["evaluation"] for r in entries):
        pictures.append("confidence_hist.png (evaluator max-probability, all entries and real test images)")
    if pictures:
        lines += ["", f"Pictures: {', '.join(pictures)}."]
    return "\n".join(lines) + "\n"
