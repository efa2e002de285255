"""Labelled synthetic datasets decoded from a trained VAE's latent space.

Class-mean latent synthesis: encode the images the run was trained on, take the posterior means ``mu``
of each class ``c``, and sample codes around that class's statistics; decode them and label them
``c``. ``METHODS`` lists the latent distributions. The seeds' recipe is "class mean + noise" without
a noise scale; unit noise (``noise_scale=1``) is our default, not theirs. ``class-gmm`` fits a
full-covariance Gaussian mixture to each class's codes instead (the per-class version of the
aggregated-posterior sampler of ``vaelab.latent_priors``: the class-mean recipe is its crudest form,
one component with unit covariance). A conditional model (``cvae-*``, or a class-conditional DDPM)
can instead draw from its own sampler with the condition ``c`` (``method="prior"``; for a VAE any
``--sampler``: ``prior``, ``gmm``, ``two-stage``). Which methods a model supports comes from its
family (``synthesis_methods``).

Output folder (written to a temporary folder, then renamed, so it is complete or absent)::

    OUT/train/<class>/NNNNN.png   ImageFolder of PNGs   -> load_split("imagefolder", "train", data_root=OUT)
    OUT/train.safetensors         images uint8 (N,C,H,W), labels int64 (N,)
                                                        -> load_split("tensors", "train", data_root=OUT)
    OUT/class_latents.safetensors per-class mean/std/count of mu (class-* methods)
    OUT/class_gmm.safetensors     per-class mixture weights/means/covariances (class-gmm)
    OUT/manifest.json             source run, method, noise, counts, seed, classes, timings
    OUT/synthetic_grid.png        one row per class (first 10 classes), 10 samples each
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import vaelab
from vaelab.data import ImageSplit, to_uint8, write_tensor_file
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.families import family_of
from vaelab.io import git_sha, write_json
from vaelab.latent_priors import LatentMixture, encode_split, fit_gmm
from vaelab.plots import save_grid
from vaelab.run import Run
from vaelab.runtime import select_device

# method -> how z is drawn for class c (eps ~ N(0, I); mean_c, std_c, Cov_c are statistics of mu over class c)
METHODS: dict[str, str] = {
    "class-mean": "z = mean_c + noise_scale * eps",
    "class-std": "z = mean_c + noise_scale * std_c * eps",
    "class-gaussian": "z = mean_c + noise_scale * L_c eps, L_c L_c^T = Cov_c (full covariance)",
    "class-gmm": "k ~ Categorical(w_c), z = mean_ck + noise_scale * L_ck eps: a full-covariance Gaussian mixture fitted "
                 "on the codes of class c (scikit-learn GaussianMixture)",
    "prior": "the model's own sampler (VAE: --sampler prior | gmm | two-stage) with condition c (conditional models only)",
}
GRID_CLASSES, GRID_PER_CLASS = 10, 10


@dataclass
class ClassLatentStats:
    """Per-class statistics of posterior means.

    Attributes:
        mean: ``(K, D)`` float32, mean of ``mu`` over the images of each class.
        std: ``(K, D)`` float32, unbiased standard deviation of ``mu`` within each class (0 for one image).
        cov: ``(K, D, D)`` float32, unbiased covariance of ``mu`` within each class (0 for one image).
        count: ``(K,)`` int64, images per class.
    """

    mean: torch.Tensor
    std: torch.Tensor
    cov: torch.Tensor
    count: torch.Tensor


def class_latent_stats(mu: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassLatentStats:
    """Mean, std and covariance of ``mu`` ``(N, D)`` within each class of ``labels`` ``(N,)`` int64.

    Raises:
        DataError: shapes disagree, labels fall outside ``0..num_classes-1``, or a class has no images.
    """
    if mu.ndim != 2 or labels.shape != (mu.shape[0],):
        raise DataError(f"expected mu (N, D) and labels (N,), got {tuple(mu.shape)} and {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels span {int(labels.min())}..{int(labels.max())}, expected 0..{num_classes - 1}")
    mu = mu.double()
    count = torch.bincount(labels, minlength=num_classes)
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(f"class(es) {empty} have no images to take a latent mean from")
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()  # (N, K)
    mean = onehot.T @ mu / count[:, None]
    centered = mu - mean[labels]
    # sum over the images of class k of centered^T centered, for every k at once
    scatter = torch.einsum("nk,nd,ne->kde", onehot, centered, centered)
    cov = scatter / (count - 1).clamp(min=1)[:, None, None]
    std = torch.diagonal(cov, dim1=1, dim2=2).sqrt()
    return ClassLatentStats(mean.float(), std.float(), cov.float(), count)


@torch.no_grad()
def encode_class_stats(model, split: ImageSplit, *, batch_size: int = 500) -> ClassLatentStats:
    """Encode ``split`` (on the model's device) with ``model`` and return the per-class stats of ``mu``."""
    codes = encode_split(model, split, batch_size=batch_size, desc="encoding real train split")
    return class_latent_stats(codes.mu, codes.labels, len(split.classes))


def fit_class_gmms(mu: torch.Tensor, labels: torch.Tensor, num_classes: int, *, components: int,
                   seed: int) -> tuple[LatentMixture, list[dict]]:
    """One full-covariance Gaussian mixture per class of the codes ``mu`` ``(N, D)`` (``labels`` ``(N,)``),
    with ``min(components, images of the class)`` components each (``vaelab.latent_priors.fit_gmm``).

    Returns:
        The mixtures (``LatentMixture`` with one group per class, CPU) and each class's fit report.

    Raises:
        DataError: a class with fewer than 2 images.
    """
    fits = []
    for c in tqdm(range(num_classes), desc="fitting a Gaussian mixture per class", unit="class", leave=False):
        z = mu[labels == c]
        if len(z) < 2:
            raise DataError(f"class {c} has {len(z)} training image(s); class-gmm needs at least 2 per class")
        fits.append(fit_gmm(z, components, seed=seed))
    return LatentMixture.from_groups([t for t, _ in fits]), [{"class": c, **i} for c, (_, i) in enumerate(fits)]


def sample_latents(stats: ClassLatentStats, c: int, n: int, *, method: str, noise_scale: float,
                   latent_dim: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, latent_dim)`` codes for class ``c`` drawn as ``METHODS[method]`` says for a class-* method
    (CPU, float32)."""
    eps = torch.randn(n, latent_dim, generator=generator)
    if method == "class-mean":
        return stats.mean[c] + noise_scale * eps
    if method == "class-std":
        return stats.mean[c] + noise_scale * stats.std[c] * eps
    # a tiny jitter keeps the Cholesky factor defined for rank-deficient covariances
    cov = stats.cov[c].double() + 1e-6 * torch.eye(latent_dim, dtype=torch.float64)
    return stats.mean[c] + noise_scale * (eps.double() @ torch.linalg.cholesky(cov).T).float()


def class_folders(classes: list[str]) -> list[str]:
    """ImageFolder folder names for ``classes`` that reload in the same label order.

    The class names themselves when they are safe file names and already sorted (torchvision's
    ``ImageFolder`` numbers folders in sorted order); otherwise ``NN-<name with unsafe characters
    replaced by _>``.
    """
    safe = [re.sub(r"[^\w .+-]", "_", c).strip() or "class" for c in classes]
    if safe == list(classes) and safe == sorted(safe) and len(set(safe)) == len(safe) and not any(s.startswith(".") for s in safe):
        return safe
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}-{s}" for i, s in enumerate(safe)]


def _check_args(per_class: int, noise_scale: float, method: str | None, out: Path, components: int = 10) -> None:
    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class <= 0:
        raise ConfigError(f"--per-class must be a positive integer, got {per_class!r}")
    if not isinstance(components, int) or isinstance(components, bool) or components <= 0:
        raise ConfigError(f"--components must be a positive integer, got {components!r}")
    if not noise_scale >= 0:
        raise ConfigError(f"--noise-scale must be >= 0, got {noise_scale!r}")
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown synthesis method {method!r}; valid: {', '.join(METHODS)}")
    if out.exists():
        raise VaelabError(f"{out} already exists; choose another --out (synthesis never overwrites a folder)")


def synthesize(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    per_class: int = 5000,
    method: str | None = None,
    noise_scale: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 500,
    components: int = 10,
    sampler: str | None = None,
) -> Path:
    """Write a labelled synthetic dataset decoded from the newest checkpoint of ``run_dir``.

    Args:
        run_dir: a run folder written by ``vaelab train`` (its ``config.yaml`` names the dataset).
        out: the folder to create (see the module docstring for its layout); must not exist.
        per_class: images per class.
        method: a key of ``METHODS`` the model supports; default ``"class-mean"`` for unconditional
            VAEs, ``"prior"`` for conditional models.
        noise_scale: scale of ``eps`` for class-* methods (1.0: ``mean_c + N(0, I)``, our default; the
            seeds name no scale; for ``class-gmm`` 1.0 is a draw from the mixture).
        components: mixture components per class for ``class-gmm`` (at most the class's image count).
        sampler: for ``method="prior"``: the model family's sampler (a VAE: ``prior``, ``gmm``,
            ``two-stage``, fitted on the run and cached in it; see ``vaelab.families.vae.sampler``).
        seed: seeds every latent draw (class-* codes come from a CPU ``torch.Generator``, so they
            match across devices).
        device: where encoding and decoding run.
        batch_size: images per encoder/decoder call.

    Returns:
        ``out``.

    Raises:
        ConfigError: non-positive ``per_class`` or ``components``, negative ``noise_scale``, unknown
            method, a method the model does not support (e.g. ``"prior"`` with an unconditional model),
            ``sampler`` with a method other than ``prior``.
        DataError: the run's dataset has fewer than 2 classes (unlabelled), or its class count
            differs from the conditional model's.
        VaelabError: ``out`` exists, or ``run_dir`` is not a run folder with a checkpoint.
    """
    out = Path(out)
    _check_args(per_class, noise_scale, method, out, components)
    run = Run(run_dir)
    run_dir, config = run.path, run.config
    ckpt = run.last_checkpoint()
    dev = select_device(device)
    model = run.load_model(dev, checkpoint=ckpt)
    supported = family_of(model).synthesis_methods(model)
    if not supported:
        raise ConfigError(f"{run_dir} holds an unconditional {config.model}: labelled synthesis needs a VAE (class "
                          "statistics of its latent codes) or a class-conditional model")
    method = method or supported[0]
    if method == "prior" and noise_scale != 1.0:
        raise ConfigError("--noise-scale applies to the class-* methods; 'prior' uses the model's own sampler")
    if sampler is not None and method != "prior":
        raise ConfigError(f"--sampler applies to --method prior (a conditional model's own sampler), not to {method!r}; "
                          "for per-class mixtures of an unconditional VAE use --method class-gmm")
    if method not in supported:
        raise ConfigError(f"method {method!r} does not apply to {config.model} ({run_dir}); valid for it: "
                          f"{', '.join(supported)}" + (" ('prior' needs a conditional model)" if method == "prior" else ""))
    data = run.data()
    train = data.train  # the images the model was trained on (its subset, without the validation hold-out)
    classes = list(train.classes)
    if len(classes) < 2:
        raise DataError(f"{run_dir} was trained on {train.source}, which has {len(classes)} class ({classes}): "
                        "the images are unlabelled, and class-conditional synthesis needs at least 2 labelled classes")
    if getattr(model.config, "num_classes", len(classes)) != len(classes):
        raise DataError(f"the model of {run_dir} has {model.config.num_classes} classes but {train.source} has {len(classes)}")

    t0 = time.perf_counter()
    stats = mixture = draw = gmm_fits = None
    if method == "prior":
        draw = family_of(model).sampler(model, run, sampler=sampler)
    else:
        codes = encode_split(model, train, batch_size=batch_size, desc="encoding real train split")
        stats = class_latent_stats(codes.mu, codes.labels, len(classes))
        if method == "class-gmm":
            mixture, gmm_fits = fit_class_gmms(codes.mu, codes.labels, len(classes), components=components, seed=seed)
    images = _decode_all(model, stats, len(classes), per_class, method=method, noise_scale=noise_scale,
                         seed=seed, batch_size=batch_size, draw=draw, mixture=mixture)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    how = f"{method}, sampler {draw.options['sampler']}" if draw is not None else f"{method}, noise {noise_scale:g}"
    source = f"synthetic ({how}) from {config.model} run {run_dir.name} on {train.source}"
    split = ImageSplit(images, labels, classes, source, "tensors")
    manifest = {
        "format": "vaelab synthetic dataset",
        "source_run": str(run_dir.resolve()),
        "checkpoint": ckpt.name,
        "model": config.model,
        "family": family_of(model).NAME,
        "dataset": config.dataset,
        "real_source": train.source,
        "encoded_images": None if stats is None else len(train),
        "method": method,
        "method_formula": METHODS[method],
        "noise_scale": noise_scale,
        "sampler": None if draw is None else draw.options,
        "class_gmm": None if gmm_fits is None else {"components_asked": components, "per_class": gmm_fits},
        "per_class": per_class,
        "num_images": len(split),
        "counts": {c: per_class for c in classes},
        "classes": classes,
        "folders": class_folders(classes),
        "image_shape": list(split.shape),
        "seed": seed,
        "source": source,
        "files": {"imagefolder": "train/<class>/NNNNN.png", "tensors": "train.safetensors",
                  "grid": "synthetic_grid.png", "class_latents": None if stats is None else "class_latents.safetensors",
                  "class_gmm": None if mixture is None else "class_gmm.safetensors"},
        "generate_time_s": time.perf_counter() - t0,
        "device": str(dev),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vaelab_version": vaelab.__version__,
        "git_sha": git_sha(),
    }
    _write_folder(out, split, stats, manifest, mixture)
    return out


@torch.no_grad()
def _decode_all(model, stats, num_classes: int, per_class: int, *, method: str, noise_scale: float, seed: int,
                batch_size: int, draw=None, mixture: LatentMixture | None = None) -> torch.Tensor:
    """``uint8`` ``(num_classes * per_class, C, H, W)``, class-major. ``draw``: the family ``Sampler`` of
    method ``prior``; ``mixture``: the per-class mixtures of ``class-gmm``."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)  # class-* codes: CPU draws, the same images on any device
    sampler = draw
    device_gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    bar = tqdm(total=num_classes * per_class, desc=f"decoding ({method})", unit="img")
    for c in range(num_classes):
        for start in range(0, per_class, batch_size):
            n = min(batch_size, per_class - start)
            y = torch.full((n,), c, dtype=torch.int64, device=device)
            if sampler is not None:
                x = sampler.draw(n, device_gen, y)
            elif mixture is not None:
                z = mixture.sample(n, generator=gen, y=torch.full((n,), c, dtype=torch.int64), scale=noise_scale)
                x = model.decode(z.to(device), y=y)
            else:
                z = sample_latents(stats, c, n, method=method, noise_scale=noise_scale,
                                   latent_dim=stats.mean.shape[1], generator=gen).to(device)
                x = model.decode(z, y=y)
            out.append(to_uint8(x, model.config.pixel_range).cpu())
            bar.update(n)
    bar.close()
    return torch.cat(out)


def _write_folder(out: Path, split: ImageSplit, stats: ClassLatentStats | None, manifest: dict,
                  mixture: LatentMixture | None = None) -> None:
    """Everything into a hidden temporary sibling of ``out``, then one ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        folders = manifest["folders"]
        width = max(5, len(str(manifest["per_class"] - 1)))
        for folder in folders:
            (tmp / "train" / folder).mkdir(parents=True)
        index = torch.zeros(len(folders), dtype=torch.int64)
        for img, label in tqdm(zip(split.images, split.labels.tolist()), total=len(split), desc="writing PNGs",
                               unit="img", leave=False):
            _write_png(img, tmp / "train" / folders[label] / f"{int(index[label]):0{width}d}.png")
            index[label] += 1
        write_tensor_file(split, tmp / "train.safetensors")
        if stats is not None:
            save_file({"mean": stats.mean, "std": stats.std, "count": stats.count}, str(tmp / "class_latents.safetensors"),
                      metadata={"classes": str(manifest["classes"]), "what": "statistics of the posterior means mu"})
        if mixture is not None:
            save_file({k: v.contiguous() for k, v in mixture.tensors().items()}, str(tmp / "class_gmm.safetensors"),
                      metadata={"classes": str(manifest["classes"]), "what": "one Gaussian mixture per class of the "
                                "posterior means mu: weights (K, M), means (K, M, D), covariances (K, M, D, D)"})
        rows = torch.arange(min(GRID_CLASSES, len(folders)))
        pick = (rows[:, None] * manifest["per_class"] + torch.arange(min(GRID_PER_CLASS, manifest["per_class"]))).flatten()
        save_grid(split.images[pick].float() / 255.0, tmp / "synthetic_grid.png", nrow=min(GRID_PER_CLASS, manifest["per_class"]))
        write_json(tmp / "manifest.json", manifest)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_png(img: torch.Tensor, path: Path) -> None:
    """One ``uint8`` ``(C, H, W)`` image (C = 1 or 3) as a PNG file."""
    from PIL import Image

    arr = img.permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
