"""The evaluation suite: every number of a trained generative model, computed one way, with its definition.

``evaluate_run(RUN_DIR)`` writes ``RUN_DIR/eval.json`` and pictures; each metric entry names the
metric, its feature space, the number of samples and the split it was measured on.

- ``fid`` / ``kid``: Fréchet Inception Distance (Heusel et al. 2017) and Kernel Inception Distance
  (Bińkowski et al. 2018) via torchmetrics, between generated samples and the real test split, in a
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
- ``speed``: generated images per second at batch 150 and 1,000.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from vaelab import plots
from vaelab.config import load_config
from vaelab.data import ImageSplit, load_split, to_pixels, to_uint8
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.io import git_sha, write_json
from vaelab.losses import kl_normal, likelihood_note, recon_nll
from vaelab.training import ACTIVE_UNIT_THRESHOLD, COLLAPSE_KL_NATS, active_units, binarize_split, last_checkpoint, select_device

METRICS = ("fid", "kid", "confidence", "recon", "nll", "latent", "speed")
FEATURE_SPACES = ("classifier", "inception")
CONFIDENT = 0.8  # "confident" sample: evaluator max-probability >= this
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for pt_inception-2015-12-05
KID_SUBSETS = 100
MAX_PROB_BINS = 20  # histogram of the evaluator's max-probability kept in eval.json


# ---------------------------------------------------------------------------- feature spaces


class ClassifierFeatures(nn.Module):
    """FID/KID feature extractor: the evaluator's penultimate features of ``uint8`` images.

    ``forward``: ``uint8`` ``(B, C, H, W)`` 0..255 -> float32 ``(B, F)``.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.name = f"classifier (evaluator penultimate layer, {self.num_features}-d)"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_pixels(x)).float()


class InceptionFeatures(nn.Module):
    """FID/KID feature extractor with the interface of the standard FID Inception-v3.

    ``net`` takes ``uint8`` ``(B, 3, H, W)`` RGB images and returns ``(B, 2048)`` pool features (it
    resizes to 299x299 itself, as torchmetrics' ``NoTrainInceptionV3`` does). Gray images are
    repeated to 3 channels first. ``forward``: ``uint8`` ``(B, C, H, W)`` -> float32 ``(B, 2048)``.
    """

    def __init__(self, net: nn.Module, *, name: str = "inception (FID Inception-v3 pt_inception-2015-12-05, pool3 2048-d)"):
        super().__init__()
        self.net = net.eval()
        self.num_features = 2048
        self.name = name

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise DataError(f"Inception features need uint8 images, got {x.dtype}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x).reshape(len(x), -1).float()


def inception_weights_path(weights: str | Path | None = None) -> Path:
    """Where the FID Inception weights are: ``weights`` if given, else torch-fidelity's cache
    ``torch.hub.get_dir()/checkpoints/weights-inception-2015-12-05-6726825d.pth``.

    Raises:
        ConfigError: the file does not exist (nothing is downloaded); the message says how to
            provide it or to use ``--fid-features classifier``.
    """
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.is_file():
        raise ConfigError(
            f"the FID Inception-v3 weights (pt_inception-2015-12-05) are not at {path}. Offline they cannot be "
            f"downloaded: copy {INCEPTION_FILE} (from torch-fidelity's releases) there or pass --inception-weights PATH, "
            "or use --fid-features classifier (the evaluator's feature space; numbers not comparable with papers)"
        )
    return path


def load_inception(weights: str | Path | None = None) -> InceptionFeatures:
    """The standard FID Inception-v3 (torchmetrics' ``NoTrainInceptionV3``, from torch-fidelity).

    Raises:
        ConfigError: weights missing (see ``inception_weights_path``) or torch-fidelity not installed.
    """
    path = inception_weights_path(weights)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--fid-features inception needs torch-fidelity: pip install torch-fidelity ({exc})") from exc
    return InceptionFeatures(net)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: torch.Tensor, *, device: torch.device | str = "cpu",
                     batch_size: int = 500, desc: str = "features") -> torch.Tensor:
    """``uint8`` ``(N, C, H, W)`` images -> float64 ``(N, F)`` features (on CPU), in batches."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        out.append(extractor(images[start : start + batch_size].to(device)).double().cpu())
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/KID run on features computed once."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID (Heusel et al. 2017): ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` of two
    ``(N, F)`` feature sets, computed by torchmetrics' ``FrechetInceptionDistance``.

    Raises:
        DataError: fewer than 2 rows in either set, or different feature sizes.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    _check_features(real, fake, minimum=2)
    metric = FrechetInceptionDistance(feature=_Precomputed(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = KID_SUBSETS,
                      subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """KID (Bińkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    ``(x.y / F + 1)^3``, mean and std over ``subsets`` random subsets (torchmetrics'
    ``KernelInceptionDistance``). ``subset_size`` is capped at the smaller set.

    Returns:
        ``(kid_mean, kid_std, subset_size_used)``.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_features(real, fake, minimum=2)
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # its "features are kept in memory" notice: they are, and they are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    state = torch.get_rng_state()
    torch.manual_seed(seed)  # torchmetrics draws the subsets with the global generator
    try:
        mean, std = metric.compute()
    finally:
        torch.set_rng_state(state)
    return float(mean), float(std), size


def _check_features(real: torch.Tensor, fake: torch.Tensor, *, minimum: int) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise DataError(f"feature sets must be (N, F) with one F, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise DataError(f"FID/KID need at least {minimum} images per set, got {len(real)} real and {len(fake)} generated")


def fid_sample_warning(n: int, num_features: int, what: str = "samples") -> str | None:
    """A warning text when ``n`` images are too few for a full-rank ``num_features``-d covariance."""
    if n > num_features:
        return None
    return (f"FID with {n} {what} in a {num_features}-d feature space: the covariance is rank-deficient and the "
            f"value unstable; use more than {num_features} (10,000 is the usual number)")


# ---------------------------------------------------------------------------- confidence metrics


def confidence_metrics(logits: torch.Tensor, *, threshold: float = CONFIDENT) -> dict:
    """Evaluator confidence on a set of images, from its logits ``(N, K)``.

    Returns:
        dict with ``mean_max_prob`` (mean over images of the largest softmax probability, in
        [1/K, 1]), ``share_confident`` (fraction with max-probability >= ``threshold``),
        ``class_distribution`` (fraction predicted as each class, K floats), ``class_entropy_nats``
        (entropy H of that distribution), ``mode_coverage`` (``H / log K`` in [0, 1]: 1 = every class
        equally often), ``effective_classes`` (``exp(H)``) and ``max_prob_histogram`` (image counts
        of the max-probability in ``MAX_PROB_BINS`` equal bins of [0, 1]).
    """
    probs = logits.float().softmax(1)
    k = probs.shape[1]
    max_prob = probs.max(1).values
    dist = torch.bincount(probs.argmax(1), minlength=k).double() / len(probs)
    entropy = float(-(dist[dist > 0] * dist[dist > 0].log()).sum())
    return {
        "mean_max_prob": float(max_prob.mean()),
        "share_confident": float((max_prob >= threshold).double().mean()),
        "confidence_threshold": threshold,
        "class_distribution": dist.tolist(),
        "class_entropy_nats": entropy,
        "mode_coverage": entropy / math.log(k),
        "effective_classes": math.exp(entropy),
        "max_prob_histogram": torch.histc(max_prob, bins=MAX_PROB_BINS, min=0.0, max=1.0).long().tolist(),
    }


# ---------------------------------------------------------------------------- likelihood


def _accepts_y(fn) -> bool:
    try:
        return "y" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _encode(model, x, y):
    return model.encode(x, y=y) if model.conditional and _accepts_y(model.encode) else model.encode(x)


def _decode_logits(model, z, y):
    return model.decode_logits(z, y=y) if model.conditional and _accepts_y(model.decode_logits) else model.decode_logits(z)


def _decode(model, z, y):
    return model.decode(z, y=y) if model.conditional and _accepts_y(model.decode) else model.decode(z)


@torch.no_grad()
def importance_weights(model, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None, chunk: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Log importance weights ``log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)``, ``z_i ~ q(z|x)``.

    Burda et al. (2015), eq. 8. The ``k`` samples are drawn in chunks of ``chunk`` so at most
    ``B * chunk`` images are decoded at once.

    Args:
        model: a VAE with ``encode``, ``decode_logits`` and ``config.recon_likelihood``.
        x: ``(B, C, H, W)`` images in the model's pixel range.
        k: samples per image; positive.

    Returns:
        ``(B, k)`` float64 log weights in nats.
    """
    if k < 1:
        raise ConfigError(f"k must be a positive integer, got {k}")
    cfg = model.config
    b = len(x)
    chunk = chunk or max(1, min(k, 2000 // max(1, b)))
    mu, logvar = _encode(model, x, y)
    std = (0.5 * logvar).exp()
    out = []
    for start in range(0, k, chunk):
        kc = min(chunk, k - start)
        eps = torch.randn((b, kc, mu.shape[1]), device=x.device, dtype=mu.dtype, generator=generator)
        z = mu[:, None] + std[:, None] * eps  # (B, kc, D)
        log_q = (-0.5 * eps.pow(2) - 0.5 * logvar[:, None] - 0.5 * math.log(2 * math.pi)).sum(2)
        log_p_z = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(2)
        yk = y.repeat_interleave(kc) if y is not None else None
        logits = _decode_logits(model, z.reshape(b * kc, -1), yk)
        xk = x.repeat_interleave(kc, dim=0)
        nll, _ = recon_nll(logits, xk, cfg.recon_likelihood, sigma=getattr(cfg, "recon_sigma", 1.0), pixel_range=cfg.pixel_range)
        out.append((-nll.reshape(b, kc) + log_p_z - log_q).double())
    return torch.cat(out, 1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """``L_k = log (1/k) sum_i w_i`` per row of ``(B, k)`` log weights (Burda et al. 2015, eq. 8), nats."""
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


# ---------------------------------------------------------------------------- the suite


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


@torch.no_grad()
def generate(model, n: int, *, num_classes: int, batch_size: int = 500, seed: int = 0,
             sample_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples as ``uint8`` ``(n, C, H, W)`` on CPU (quantised like real 8-bit images) and, for
    a conditional model, their class labels ``(n,)`` (balanced: ``i % num_classes``)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    pixel_range = getattr(model.config, "pixel_range", "[0,1]")
    labels = torch.arange(n, device=device) % num_classes if model.conditional else None
    out = []
    for start in tqdm(range(0, n, batch_size), desc="generating", unit="batch", leave=False):
        m = min(batch_size, n - start)
        y = labels[start : start + m] if labels is not None else None
        x = model.sample(m, y=y, generator=gen, **(sample_kwargs or {}))
        out.append(to_uint8(x.float(), pixel_range).cpu())
    return torch.cat(out), (labels.cpu() if labels is not None else None)


def _fid_kid(wanted: list[str], extractor: nn.Module, fake: torch.Tensor, fake_y: torch.Tensor | None,
             train: ImageSplit, test: ImageSplit, *, device, seed: int, notes: list[str]) -> dict:
    """FID/KID of ``fake`` vs the test split, their train-vs-test floors, and per-class FID."""
    n = len(fake)
    gen = torch.Generator().manual_seed(seed)
    floor_idx = torch.randperm(len(train), generator=gen)[:n]
    real_f = extract_features(extractor, test.images, device=device, desc="features: real test")
    floor_f = extract_features(extractor, train.images[floor_idx], device=device, desc="features: real train (floor)")
    fake_f = extract_features(extractor, fake, device=device, desc="features: generated")
    space = extractor.name
    for warning in (fid_sample_warning(n, extractor.num_features), fid_sample_warning(len(test), extractor.num_features, "real images")):
        if warning:
            warnings.warn(warning)
            notes.append(warning)
    common = {"feature_space": space, "num_samples": n, "real": f"{test.source} test split, {len(test):,} images"}
    floor_def = f"the same metric between {len(floor_idx):,} random real train images and the real test split"
    out = {}
    if "fid" in wanted:
        out["fid"] = {"metric": "FID", "value": fid_from_features(real_f, fake_f), **common,
                      "floor": {"value": fid_from_features(real_f, floor_f), "definition": floor_def}}
        if fake_y is not None:
            per_class = []
            for c, name in enumerate(test.classes):
                rc, fc = real_f[test.labels.cpu() == c], fake_f[fake_y == c]
                tc = floor_f[train.labels[floor_idx].cpu() == c]
                if min(len(rc), len(fc), len(tc)) < 2:
                    per_class.append({"class": name, "value": None, "note": "fewer than 2 images"})
                    continue
                per_class.append({"class": name, "value": fid_from_features(rc, fc), "floor": fid_from_features(rc, tc),
                                  "num_samples": len(fc), "num_real": len(rc)})
            warning = fid_sample_warning(n // max(1, len(test.classes)), extractor.num_features, "samples per class")
            if warning:
                notes.append(warning)
            out["fid"]["per_class"] = per_class
            out["fid"]["per_class_definition"] = "FID of samples generated with label c vs real test images of class c"
    if "kid" in wanted:
        mean, std, size = kid_from_features(real_f, fake_f, seed=seed)
        fmean, fstd, _ = kid_from_features(real_f, floor_f, seed=seed)
        out["kid"] = {"metric": "KID (cubic polynomial kernel, unbiased MMD^2)", "value": mean, "std": std,
                      "subsets": KID_SUBSETS, "subset_size": size, **common,
                      "floor": {"value": fmean, "std": fstd, "definition": floor_def}}
    return out


def _confidence(evaluator, fake, fake_y, test, run_dir: Path, *, device) -> dict:
    from vaelab.evaluator import predict_logits

    fake_logits = predict_logits(evaluator, fake, device=device, desc="classifying: generated")
    real_logits = predict_logits(evaluator, test.images, device=device, desc="classifying: real test")
    out = {
        "metric": "evaluator confidence", "feature_space": "evaluator softmax", "num_samples": len(fake),
        "split": f"{test.source} test split, {len(test):,} images",
        "generated": confidence_metrics(fake_logits), "real_test": confidence_metrics(real_logits),
        "classes": test.classes,
    }
    if fake_y is not None:
        out["generated"]["label_accuracy"] = float((fake_logits.argmax(1) == fake_y).double().mean())
        out["label_accuracy_definition"] = "share of samples generated with label c that the evaluator classifies as c"
    plots.confidence_hist([("generated samples", out)], run_dir / "confidence_hist.png")
    plots.class_coverage(out["generated"], out["real_test"], test.classes, run_dir / "class_coverage.png", source=test.source)
    return out


@torch.no_grad()
def _recon(model, test: ImageSplit, *, device, batch_size: int = 500) -> dict:
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    pixel_range = model.config.pixel_range
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(device)
    sse, n = 0.0, 0
    for start in tqdm(range(0, len(test), batch_size), desc="reconstructing", unit="batch", leave=False):
        x = to_pixels(test.images[start : start + batch_size].to(device), pixel_range)
        y = test.labels[start : start + batch_size].to(device) if model.conditional else None
        x01 = to_pixels(to_uint8(x, pixel_range))  # both sides on the [0, 1] scale
        r01 = to_pixels(to_uint8(_decode(model, _encode(model, x, y)[0], y).float(), pixel_range))
        sse += float((r01 - x01).pow(2).sum())
        n += x01.numel()
        psnr.update(r01, x01)
        ssim.update(r01, x01)
    return {"metric": "reconstruction at z = mu (decoder mean, quantised to 8 bits)",
            "split": f"{test.source} test split, {len(test):,} images",
            "mse_per_pixel": sse / n, "psnr_db": float(psnr.compute()), "ssim": float(ssim.compute()),
            "units": "pixels on the [0, 1] scale; PSNR (data range 1) averaged over images; SSIM (Gaussian 11x11) averaged over images"}


def _nll(model, test: ImageSplit, *, k: int, subset: int | None, device, seed: int) -> dict:
    pixel_range = model.config.pixel_range
    n = min(len(test), subset) if subset else len(test)
    split = test.subset(slice(0, n))
    gen = torch.Generator(device=device).manual_seed(seed)
    # images per batch such that at most ~2,000 images are decoded at once
    b = max(1, min(100, 2000 // min(k, 2000)))
    sums = torch.zeros(3, dtype=torch.float64)  # -elbo, -iwae, count
    for start in tqdm(range(0, n, b), desc=f"IWAE k={k}", unit="batch", leave=False):
        x = to_pixels(split.images[start : start + b].to(device), pixel_range)
        y = split.labels[start : start + b].to(device) if model.conditional else None
        log_w = importance_weights(model, x, k, y=y, generator=gen).cpu()
        sums += torch.tensor([-log_w.mean(1).sum().item(), -iwae_bound(log_w).sum().item(), len(x)], dtype=torch.float64)
    neg_elbo, neg_iwae, count = sums.tolist()
    discrete, note = likelihood_note(model.config.recon_likelihood, split.images)
    dims = math.prod(split.shape)
    to_bpd = (lambda v: v / (dims * math.log(2))) if discrete else (lambda v: None)
    return {
        "metric": f"negative ELBO and IWAE bound (Burda et al. 2015) with k={k}",
        "split": f"{split.source} test split, {n:,} of {len(test):,} images" + (" (first N)" if n < len(test) else ""),
        "k": k, "num_images": n, "recon_likelihood": model.config.recon_likelihood,
        "neg_elbo_nats": neg_elbo / count, "iwae_nll_nats": neg_iwae / count,
        "neg_elbo_bits_per_dim": to_bpd(neg_elbo / count), "iwae_nll_bits_per_dim": to_bpd(neg_iwae / count),
        "units": "nats per image; bits/dim = nats / (C*H*W * ln 2)",
        "likelihood": note,
        "estimator": "-ELBO: mean over the k samples of -log w; IWAE: -log mean_k w on the same samples",
    }


@torch.no_grad()
def _latent(model, test: ImageSplit, run_dir: Path, *, device, batch_size: int = 500) -> dict:
    pixel_range = model.config.pixel_range
    mus, kls = [], []
    for start in tqdm(range(0, len(test), batch_size), desc="encoding", unit="batch", leave=False):
        x = to_pixels(test.images[start : start + batch_size].to(device), pixel_range)
        y = test.labels[start : start + batch_size].to(device) if model.conditional else None
        mu, logvar = _encode(model, x, y)
        mus.append(mu.float().cpu())
        kls.append(kl_normal(mu, logvar).double().sum(0).cpu())
    mu = torch.cat(mus)
    kl_dim = (torch.stack(kls).sum(0) / len(test)).tolist()
    variance = mu.var(0).tolist()
    au = active_units(mu)
    total_kl = sum(kl_dim)
    collapsed = au < 1 or total_kl < COLLAPSE_KL_NATS
    plots.kl_per_dim(kl_dim, variance, run_dir / "kl_per_dim.png", threshold=ACTIVE_UNIT_THRESHOLD, source=test.source)
    return {
        "metric": "latent diagnostics", "split": f"{test.source} test split, {len(test):,} images",
        "latent_dim": mu.shape[1], "active_units": au,
        "active_unit_definition": f"dims with Cov_x(E_q[z_i]) > {ACTIVE_UNIT_THRESHOLD} (Burda et al. 2015)",
        "kl_nats": total_kl, "kl_per_dim_nats": kl_dim, "mu_variance_per_dim": variance,
        "posterior_collapse": collapsed,
        "collapse_definition": f"fewer than 1 active unit or total KL below {COLLAPSE_KL_NATS} nats per image",
    }


@torch.no_grad()
def _speed(model, *, num_classes: int, sample_kwargs: dict | None, seed: int) -> dict:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = {}
    for batch in (150, 1000):
        y = torch.arange(batch, device=device) % num_classes if model.conditional else None
        model.sample(min(batch, 8), y=y[:8] if y is not None else None, generator=gen, **(sample_kwargs or {}))  # warm-up
        times = []
        for _ in tqdm(range(3), desc=f"speed batch {batch}", unit="rep", leave=False):
            t0 = time.perf_counter()
            model.sample(batch, y=y, generator=gen, **(sample_kwargs or {}))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows[f"batch_{batch}"] = {"samples_per_s": batch / best, "seconds_per_batch": best}
    return {"metric": "generation speed: model.sample(batch), best of 3 after a warm-up",
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "sample_kwargs": sample_kwargs or {}, **rows}


def evaluate_run(
    run_dir: str | Path,
    *,
    metrics: str | Iterable[str] | None = None,
    fid_features: str = "classifier",
    num_samples: int = 10000,
    iwae_k: int = 1000,
    device: str | torch.device = "auto",
    sample_kwargs: dict | None = None,
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
        sample_kwargs: passed to ``model.sample`` (e.g. ``{"sampler": "ddim", "steps": 50}``).
        nll_subset: evaluate the likelihood on the first N test images only (IWAE with large k is
            slow on CPU); ``None`` = the whole test split. The count used is recorded.
        inception_weights: path of the FID Inception weights (``fid_features="inception"``).
        seed: seeds sampling, floors and KID subsets.

    Returns:
        The dict written to ``eval.json``. Metrics a model cannot support (e.g. ``nll`` for a model
        without ``encode``) are listed under ``not_applicable`` with the reason.

    Writes:
        ``eval.json``, ``eval_samples.png`` (64 of the generated images), ``confidence_hist.png``,
        ``class_coverage.png``, ``kl_per_dim.png`` (for the metrics requested).

    Raises:
        ConfigError: unknown metric or feature space, non-positive N or K, missing Inception weights.
        VaelabError: no checkpoint in ``run_dir``; DataError: the dataset's images have another shape
            than the model's. All raised before any file is written.
    """
    from vaelab.evaluator import build_evaluator
    from vaelab.models import load_model

    # 1. validate everything before any work
    wanted = _parse_metrics(metrics)
    if fid_features not in FEATURE_SPACES:
        raise ConfigError(f"unknown FID feature space {fid_features!r}; valid: {', '.join(FEATURE_SPACES)}")
    _positive("num_samples", num_samples)
    _positive("iwae_k", iwae_k)
    _positive("nll_subset", nll_subset, allow_none=True)
    run_dir = Path(run_dir)
    ckpt = last_checkpoint(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise VaelabError(f"{run_dir} has no config.yaml; expected a run folder written by 'vaelab train'")
    config = load_config(run_dir / "config.yaml")
    inception = load_inception(inception_weights) if fid_features == "inception" and {"fid", "kid"} & set(wanted) else None
    dev = select_device(str(device))
    model = load_model(ckpt, device=dev)
    test = load_split(config.dataset, "test", config.data_root)
    mcfg = model.config
    want_shape = (getattr(mcfg, "in_channels", None), getattr(mcfg, "image_size", None), getattr(mcfg, "image_size", None))
    if None not in want_shape and tuple(test.shape) != want_shape:
        raise DataError(f"{config.dataset} test images are {'x'.join(map(str, test.shape))} but the model of {run_dir} "
                        f"expects {'x'.join(map(str, want_shape))}")
    if getattr(config, "binarize", False):
        test = binarize_split(test, config.seed)
    has_vae = all(hasattr(model, f) for f in ("encode", "decode", "decode_logits"))
    print(f"evaluating {ckpt} on {test.source} test ({len(test):,} images), device {dev}: {', '.join(wanted)}")

    result: dict = {
        "run": str(run_dir), "checkpoint": str(ckpt), "dataset": test.source, "split": "test",
        "model": {"model_type": mcfg.model_type, "kind": getattr(model, "kind", None),
                  "conditional": bool(getattr(model, "conditional", False))},
        "settings": {"metrics": wanted, "fid_features": fid_features, "num_samples": num_samples, "iwae_k": iwae_k,
                     "nll_subset": nll_subset, "seed": seed, "sample_kwargs": sample_kwargs or {}},
        "device": str(dev), "not_applicable": {}, "warnings": [],
    }
    notes: list[str] = result["warnings"]
    for name in ("recon", "nll", "latent"):
        if name in wanted and not has_vae:
            result["not_applicable"][name] = "the model has no encode/decode (not a VAE)"
    if "nll" in wanted and has_vae and not hasattr(mcfg, "recon_likelihood"):
        result["not_applicable"]["nll"] = "the model config names no recon_likelihood"
    todo = [m for m in wanted if m not in result["not_applicable"]]

    # 2. generated samples and the evaluator (shared by FID, KID and confidence)
    num_classes = len(test.classes)
    fake = fake_y = evaluator = None
    if {"fid", "kid", "confidence"} & set(todo):
        fake, fake_y = generate(model, num_samples, num_classes=num_classes, seed=seed, sample_kwargs=sample_kwargs)
        pick = torch.arange(min(64, len(fake)))
        plots.save_grid(to_pixels(fake[pick]), run_dir / "eval_samples.png", nrow=8)
    if "confidence" in todo or ("fid" in todo or "kid" in todo) and inception is None:
        evaluator, ev_info = build_evaluator(config.dataset, data_root=config.data_root, device=dev)
        result["evaluator"] = {k: ev_info[k] for k in ("test_accuracy", "test_source", "test_images", "epochs",
                                                       "train_time_s", "device", "widths", "data_fingerprint", "recipe_version")}

    # 3. the metrics, each with its definition
    if "fid" in todo or "kid" in todo:
        extractor = inception.to(dev) if inception is not None else ClassifierFeatures(evaluator)
        train = load_split(config.dataset, "train", config.data_root)
        if getattr(config, "binarize", False):
            train = binarize_split(train, config.seed)
        result.update(_fid_kid(todo, extractor, fake, fake_y, train, test, device=dev, seed=seed, notes=notes))
    if "confidence" in todo:
        result["confidence"] = _confidence(evaluator, fake, fake_y, test, run_dir, device=dev)
    if "recon" in todo:
        result["recon"] = _recon(model, test, device=dev)
    if "nll" in todo:
        result["nll"] = _nll(model, test, k=iwae_k, subset=nll_subset, device=dev, seed=seed)
    if "latent" in todo:
        result["latent"] = _latent(model, test, run_dir, device=dev)
    if "speed" in todo:
        result["speed"] = _speed(model, num_classes=num_classes, sample_kwargs=sample_kwargs, seed=seed)
    result["git_sha"] = git_sha()
    write_json(run_dir / "eval.json", result)
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
        lines.append(f"  speed ({s['device']}, {s['dtype']}): {s['batch_150']['samples_per_s']:.0f} samples/s at batch 150, "
                     f"{s['batch_1000']['samples_per_s']:.0f} at batch 1000")
    for name, why in result["not_applicable"].items():
        lines.append(f"  {name}: not applicable ({why})")
    for w in result["warnings"]:
        lines.append(f"  WARNING: {w}")
    return "\n".join(lines)
