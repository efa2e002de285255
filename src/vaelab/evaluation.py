"""The evaluation suite: every number of a trained generative model, computed one way, with its definition.

``evaluate_run(RUN_DIR)`` writes ``RUN_DIR/eval.json`` and pictures; each metric entry names the
metric, its feature space, the number of samples and the split it was measured on. The metrics
themselves live in ``vaelab.metrics`` (one module per concern); this module orchestrates them.

- ``fid`` / ``kid``: Fréchet Inception Distance (Heusel et al. 2017) and Kernel Inception Distance
  (Bińkowski et al. 2018) via torchmetrics, between generated samples and the run's test split, in a
  named feature space: ``classifier`` (the dataset's evaluator classifier, penultimate features,
  offline default) or ``inception`` (the standard FID Inception-v3 ``pt_inception-2015-12-05``;
  needs its weights). Each comes with its floor: real train images vs the real test split, same N.
  Class-conditional models also get a per-class FID.
- ``confidence``: the evaluator's mean max-probability, share of samples with max-probability >= 0.8,
  predicted-class distribution and its entropy, for samples and for real test images.
- ``recon``: per-pixel MSE, PSNR and SSIM (torchmetrics) of test reconstructions.
- ``nll``: negative ELBO and the importance-weighted bound (IWAE, Burda et al. 2015) with ``k``
  samples, nats per image, and bits/dim where the likelihood is discrete.
- ``latent``: active units (Burda et al. 2015), KL per latent dimension, posterior-collapse verdict.
- ``speed``: generated images per second at batch 150 and 1,000 (``vaelab.metrics.speed``).

Metrics a model's family cannot support (e.g. ``nll`` for a diffusion model) are listed under
``not_applicable`` with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from vaelab import plots
from vaelab.data import binarize_split, load_split, to_pixels
from vaelab.errors import ConfigError, DataError
from vaelab.families import family_of
from vaelab.generation import generate
from vaelab.io import write_json
from vaelab.metrics.confidence import confidence_report
from vaelab.metrics.distances import fid_kid_metrics
from vaelab.metrics.features import ClassifierFeatures, load_inception
from vaelab.metrics.latent import latent_metrics
from vaelab.metrics.likelihood import nll_metrics
from vaelab.metrics.reconstruction import recon_metrics
from vaelab.metrics.speed import speed_metrics
from vaelab.run import Run
from vaelab.runtime import provenance, select_device

METRICS = ("fid", "kid", "confidence", "recon", "nll", "latent", "speed")
FEATURE_SPACES = ("classifier", "inception")


def _parse_metrics(metrics: str | Iterable[str] | None) -> list[str]:
    if metrics is None:
        return list(METRICS)
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def evaluate_run(
    run_dir: str | Path,
    *,
    metrics: str | Iterable[str] | None = None,
    fid_features: str = "classifier",
    num_samples: int = 10000,
    iwae_k: int = 1000,
    device: str | torch.device = "auto",
    sampler: str | None = None,
    steps: int | None = None,
    nll_subset: int | None = None,
    inception_weights: str | Path | None = None,
    seed: int = 0,
) -> dict:
    """Evaluate the newest checkpoint of a run; write ``RUN_DIR/eval.json`` and pictures.

    Args:
        run_dir: a run folder written by ``vaelab train`` (``config.yaml`` + ``checkpoints/``).
        metrics: names from ``METRICS`` (list or comma-separated string); default all.
        fid_features: ``"classifier"`` (evaluator features, offline) or ``"inception"``.
        num_samples: generated images for FID/KID/confidence (10,000 is the usual FID number).
        iwae_k: importance samples per test image for the IWAE bound.
        device: ``auto``, ``cpu``, ``cuda``, ...
        sampler, steps: the model family's sampler for the generated images (e.g. ``ddim`` and 50
            for a diffusion run); default the family's.
        nll_subset: evaluate the likelihood on the first N test images only (IWAE with large k is
            slow on CPU); ``None`` = the whole test split of the run. The count used is recorded.
        inception_weights: path of the FID Inception weights (``fid_features="inception"``).
        seed: seeds sampling, floors and KID subsets.

    Returns:
        The dict written to ``eval.json``. Metrics the model's family cannot support are listed under
        ``not_applicable`` with the reason.

    Writes:
        ``eval.json``, ``eval_samples.png`` (64 of the generated images), ``confidence_hist.png``,
        ``class_coverage.png``, ``kl_per_dim.png`` (for the metrics requested).

    Raises:
        ConfigError: unknown metric, feature space or sampler, non-positive N or K, missing Inception weights.
        VaelabError: no run or checkpoint in ``run_dir``; DataError: the dataset's images have another
            shape than the model's. All raised before any file is written.
    """
    from vaelab.evaluator import build_evaluator

    # 1. validate everything before any work
    wanted = _parse_metrics(metrics)
    if fid_features not in FEATURE_SPACES:
        raise ConfigError(f"unknown FID feature space {fid_features!r}; valid: {', '.join(FEATURE_SPACES)}")
    _positive("num_samples", num_samples)
    _positive("iwae_k", iwae_k)
    _positive("nll_subset", nll_subset, allow_none=True)
    run = Run(run_dir)
    ckpt = run.last_checkpoint()
    config = run.config
    inception = load_inception(inception_weights) if fid_features == "inception" and {"fid", "kid"} & set(wanted) else None
    dev = select_device(device)
    model = run.load_model(dev, checkpoint=ckpt)
    family = family_of(model)
    draw = family.sampler(model, run, sampler=sampler, steps=steps)
    test = run.data().test
    want_shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    if tuple(test.shape) != want_shape:
        raise DataError(f"{config.dataset} test images are {'x'.join(map(str, test.shape))} but the model of {run.path} "
                        f"expects {'x'.join(map(str, want_shape))}")
    print(f"evaluating {ckpt} on {test.source} test ({len(test):,} images), device {dev}: {', '.join(wanted)}")

    result: dict = {
        "run": str(run.path), "checkpoint": str(ckpt), "dataset": test.source, "split": "test",
        "model": {"model_type": model.config.model_type, "family": family.NAME},
        "settings": {"metrics": wanted, "fid_features": fid_features, "num_samples": num_samples, "iwae_k": iwae_k,
                     "nll_subset": nll_subset, "seed": seed, "sampler": draw.options},
        **provenance(dev, seed), "not_applicable": {}, "warnings": [],
    }
    notes: list[str] = result["warnings"]
    for name in wanted:
        if name in family.NOT_APPLICABLE:
            result["not_applicable"][name] = family.NOT_APPLICABLE[name]
    todo = [m for m in wanted if m not in result["not_applicable"]]

    # 2. generated samples and the evaluator (shared by FID, KID and confidence)
    fake = fake_y = evaluator = None
    if {"fid", "kid", "confidence"} & set(todo):
        fake, fake_y = generate(model, draw, num_samples, seed=seed)
        plots.save_grid(to_pixels(fake[: min(64, len(fake))]), run.path / "eval_samples.png", nrow=8)
    if "confidence" in todo or ("fid" in todo or "kid" in todo) and inception is None:
        evaluator, ev_info = build_evaluator(config.dataset, data_root=config.data_root, device=dev)
        result["evaluator"] = {k: ev_info[k] for k in ("test_accuracy", "test_source", "test_images", "epochs",
                                                       "train_time_s", "device", "widths", "data_fingerprint", "recipe_version")}

    # 3. the metrics, each with its definition
    if "fid" in todo or "kid" in todo:
        extractor = inception.to(dev) if inception is not None else ClassifierFeatures(evaluator)
        train = load_split(config.dataset, "train", config.data_root)  # the floor's reference: real train images
        if config.binarize:
            train = binarize_split(train, config.seed)
        result.update(fid_kid_metrics(todo, extractor, fake, fake_y, train, test, device=dev, seed=seed, notes=notes))
    if "confidence" in todo:
        result["confidence"] = confidence_report(evaluator, fake, fake_y, test, run.path, device=dev)
    if "recon" in todo:
        result["recon"] = recon_metrics(model, test, device=dev)
    if "nll" in todo:
        result["nll"] = nll_metrics(model, test, k=iwae_k, subset=nll_subset, device=dev, seed=seed)
    if "latent" in todo:
        result["latent"] = latent_metrics(model, test, run.path, device=dev)
    if "speed" in todo:
        result["speed"] = speed_metrics(model, draw, seed=seed)
    write_json(run.path / "eval.json", result)
    return result


def describe(result: dict) -> str:
    """A few lines for people: the headline numbers of an ``eval.json``."""
    lines = [f"{result['run']} on {result['dataset']} ({result['split']} split)"]
    if "fid" in result:
        f = result["fid"]
        lines.append(f"  FID {f['value']:.3f} (floor train-vs-test {f['floor']['value']:.3f}); {f['feature_space']}, "
                     f"{f['num_samples']:,} samples")
        for row in f.get("per_class", []):
            if row["value"] is not None:
                lines.append(f"    class {row['class']}: FID {row['value']:.3f} (floor {row['floor']:.3f})")
    if "kid" in result:
        k = result["kid"]
        lines.append(f"  KID {k['value']:.5f} ± {k['std']:.5f} (floor {k['floor']['value']:.5f}); subset size {k['subset_size']}")
    if "confidence" in result:
        g, r = result["confidence"]["generated"], result["confidence"]["real_test"]
        lines.append(f"  confidence: mean max-prob {g['mean_max_prob']:.3f} (real {r['mean_max_prob']:.3f}), "
                     f"share >= {g['confidence_threshold']}: {g['share_confident']:.3f} (real {r['share_confident']:.3f}), "
                     f"mode coverage {g['mode_coverage']:.3f} (real {r['mode_coverage']:.3f})")
    if "recon" in result:
        r = result["recon"]
        lines.append(f"  recon: MSE/pixel {r['mse_per_pixel']:.5f}, PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.4f}")
    if "nll" in result:
        n = result["nll"]
        bpd = f", {n['iwae_nll_bits_per_dim']:.4f} bits/dim" if n["iwae_nll_bits_per_dim"] is not None else ""
        lines.append(f"  -ELBO {n['neg_elbo_nats']:.2f} nats, IWAE NLL (k={n['k']}) {n['iwae_nll_nats']:.2f} nats{bpd} "
                     f"on {n['num_images']:,} test images")
    if "latent" in result:
        lt = result["latent"]
        lines.append(f"  latent: {lt['active_units']}/{lt['latent_dim']} active units, KL {lt['kl_nats']:.2f} nats, "
                     f"posterior collapse: {'YES' if lt['posterior_collapse'] else 'no'}")
    if "speed" in result:
        s = result["speed"]
        lines.append(f"  speed ({s['batch_150']['device']}, {s['dtype']}): {s['batch_150']['samples_per_s']:.0f} samples/s at batch 150, "
                     f"{s['batch_1000']['samples_per_s']:.0f} at batch 1000")
    for name, why in result["not_applicable"].items():
        lines.append(f"  {name}: not applicable ({why})")
    for w in result["warnings"]:
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)
