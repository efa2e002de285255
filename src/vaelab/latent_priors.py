"""Aggregated-posterior samplers for VAEs: where to draw ``z`` from instead of the prior ``N(0, I)``.

A trained VAE's aggregated posterior ``q(z) = E_x q(z | x)`` does not fill the prior ``N(0, I)``;
prior draws that land in its holes decode to blurry, off-manifold images. The cheap published fix
is to fit a density to the codes of the training images after training and sample from that:

- ``gmm``: a Gaussian mixture with full covariances (scikit-learn ``GaussianMixture``, EM, k-means
  initialisation) on the posterior means ``mu`` of the training images, 10 components by default
  (Ghosh et al. 2020, "From Variational to Deterministic Autoencoders", sec. 4 "ex-post density
  estimation"; Chadebec & Allassonniere 2022, "A Geometric Perspective on Variational Autoencoders",
  Table 1: MNIST FID 40.7 -> 13.1).
- ``two-stage``: a second, small VAE (MLPs) trained on codes ``z ~ q(z | x)`` of the training images,
  with a learned decoder standard deviation; sampling draws ``u ~ N(0, I)`` and ``z ~ p(z | u)``
  (Dai & Wipf 2019, "Diagnosing and Enhancing VAE Models", sec. 4; Fashion-MNIST FID 43.6 -> 29.3).
- ``pixelcnn``: for a model with a discrete code grid (a VQ-VAE: ``model.code_indices``), a small PixelCNN
  trained on the code grids of the training images (van den Oord et al. 2017, sec. 3.2; ``vaelab.models.pixelcnn``).

Conditional VAEs model ``q(z | y)`` instead: one mixture per class, or a second stage that takes the
one-hot label in its encoder and decoder (the label-free ``p(z | y) = N(0, I)`` of the CVAE is what
leaves holes per class). Drawing then needs labels ``y``.

Both are fitted on the run's training split exactly as trained (``Run.data().train``: its subset,
without the validation hold-out; binarised once with the run's seed for a binarised run) and cached
in the run folder (``RUN_DIR/samplers/<name>.safetensors`` and ``<name>.json``, see
``Run.write_sampler``). A cache is used only while the model's weights hash to the value stored in
it and the options match; otherwise it is fitted again. Sampler options are written
``NAME:KEY=VALUE,...``, e.g. ``gmm:components=20`` or ``two-stage:epochs=100``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import vaelab
from vaelab.data import ImageSplit, batches, binarize_split
from vaelab.errors import ConfigError, DataError
from vaelab.io import git_sha, read_cache
from vaelab.losses import gaussian_nll, kl_normal, soft_clip_log_sigma
from vaelab.models.pixelcnn import PixelCNNConfig, PixelCNNPrior, train_pixelcnn
from vaelab.runtime import derive_seed

# sampler name -> its options and their defaults (every option is a positive number)
OPTIONS: dict[str, dict[str, int | float]] = {
    "gmm": {"components": 10, "max_iter": 200},
    "two-stage": {"epochs": 50, "hidden": 256, "depth": 3, "batch_size": 256, "lr": 1e-3},
    "pixelcnn": {"epochs": 10, "hidden": 64, "layers": 5, "batch_size": 128, "lr": 1e-3},
}
DESCRIPTIONS = {
    "gmm": "z from a full-covariance Gaussian mixture fitted on the train split's posterior means (one per class "
           "for a conditional VAE; Ghosh et al. 2020, Chadebec & Allassonniere 2022)",
    "two-stage": "z from a second-stage VAE trained on the train split's latent codes (conditioned on the class for a "
                 "conditional VAE; Dai & Wipf 2019)",
    "pixelcnn": "the code grid from a PixelCNN fitted on the train split's code grids (models with a discrete code "
                "grid, the VQ-VAE; van den Oord et al. 2017)",
}
OPTION_HELP = {
    "components": "mixture components (per class for a conditional VAE; at most the number of codes)",
    "max_iter": "EM iterations at most",
    "epochs": "passes over the codes",
    "hidden": "width of the MLP layers (two-stage), channels of the masked convolutions (pixelcnn)",
    "layers": "masked convolution layers of the PixelCNN",
    "depth": "hidden layers of the encoder and of the decoder",
    "batch_size": "codes per step",
    "lr": "Adam learning rate (cosine-decayed to 0)",
}
VAL_FRACTION = 0.05  # codes held out to report the second stage's validation -ELBO


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"gmm"``, ``"gmm:components=20"``, ``"two-stage:epochs=100,hidden=512"`` -> ``(name, options)``
    with every option filled in (defaults from ``OPTIONS``).

    Raises:
        ConfigError: unknown sampler or option, a value that is not a positive number (integer where
            the default is one); the message lists the valid names.
    """
    name, _, rest = str(spec).partition(":")
    name = name.strip()
    if name not in OPTIONS:
        raise ConfigError(f"unknown latent sampler {name!r}; valid: {', '.join(OPTIONS)}")
    options = dict(OPTIONS[name])
    for item in [i for i in rest.split(",") if i.strip()]:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in options or not eq:
            raise ConfigError(f"--sampler {spec!r}: {name} takes {', '.join(f'{k}=N' for k in options)} "
                              f"(written {name}:KEY=VALUE,...); got {item.strip()!r}")
        kind = type(OPTIONS[name][key])
        try:
            number = kind(value.strip())
        except ValueError:
            number = None
        if number is None or not number > 0 or (kind is float and not math.isfinite(number)):
            raise ConfigError(f"--sampler {spec!r}: {key} must be a positive {'integer' if kind is int else 'number'}, "
                              f"got {value.strip()!r}")
        options[key] = number
    return name, options


def canonical_spec(name: str, options: dict) -> str:
    """The shortest spec that gives ``options``: the name, then the options that differ from the defaults."""
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items() if v != OPTIONS[name][k]]
    return name + (":" + ",".join(changed) if changed else "")


def cache_name(spec: str) -> str:
    """File stem of a sampler's cache: ``gmm``, ``gmm-components20``, ``two-stage-epochs100-hidden512``."""
    return spec.replace(":", "-").replace("=", "").replace(",", "-").replace(".", "p")


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of ``model``'s state dict (names and bytes): what a cache was fitted on."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- latent codes


@dataclass
class LatentCodes:
    """Posterior parameters of a split's images.

    Attributes:
        mu, logvar: ``(N, latent_dim)`` float32 (CPU).
        labels: ``(N,)`` int64 class indices.
    """

    mu: torch.Tensor
    logvar: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def encode_split(model, split: ImageSplit, *, batch_size: int = 500, desc: str = "encoding train split") -> LatentCodes:
    """``q(z | x, y)`` of every image of ``split`` (encoded with its label, on the model's device, in eval mode)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mus, logvars = [], []
    images, labels = split.images.to(device), split.labels.to(device)
    for x, y in tqdm(batches(images, labels, batch_size, pixel_range=model.config.pixel_range),
                     total=-(-len(split) // batch_size), desc=desc, unit="batch", leave=False):
        mu, logvar = model.encode(x, y=y)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    model.train(was_training)
    return LatentCodes(torch.cat(mus), torch.cat(logvars), split.labels.cpu())


def train_split(run) -> tuple[ImageSplit, str]:
    """The run's training split as trained (binarised once with the run's seed for a binarised run) and a
    description of it."""
    train = run.data().train
    if run.config.binarize:
        train = binarize_split(train, run.config.seed)
    return train, f"{train.source} train split ({len(train):,} images, validation hold-out excluded)"


def train_codes(model, run) -> tuple[LatentCodes, str]:
    """The codes of the run's training split as trained (``train_split``), and a description of that split."""
    train, described = train_split(run)
    return encode_split(model, train), described


@torch.no_grad()
def code_grids(model, split: ImageSplit, *, batch_size: int = 500) -> torch.Tensor:
    """``model.code_indices`` of every image of ``split``: ``(N, h, w)`` int64 (CPU), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    grids = [model.code_indices(x, y=y).cpu() for x, y in batches(split.images.to(device), split.labels.to(device),
                                                                  batch_size, pixel_range=model.config.pixel_range)]
    model.train(was_training)
    return torch.cat(grids)


def check_fits(name: str, model) -> None:
    """Raise ``ConfigError`` when sampler ``name`` cannot be fitted for ``model`` (``pixelcnn`` needs a discrete
    code grid, ``model.code_indices``)."""
    if name == "pixelcnn" and not hasattr(model, "code_indices"):
        raise ConfigError("--sampler pixelcnn models a discrete code grid: it needs a model with one (a VQ-VAE, "
                          "vqvae-*); use gmm or two-stage for a Gaussian code")


# ---------------------------------------------------------------------------- Gaussian mixtures


def fit_gmm(z: torch.Tensor, components: int, *, seed: int, max_iter: int = 200) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit a full-covariance Gaussian mixture to ``z`` ``(N, D)`` with scikit-learn (EM, k-means init).

    ``min(components, N)`` components are used. Returns ``({"weights": (K,), "means": (K, D),
    "covariances": (K, D, D)}`` float64 CPU tensors, ``info``)``, ``info`` holding the components used,
    convergence, EM iterations and the mean log-likelihood of ``z`` under the mixture and under ``N(0, I)``
    (nats per code: how much closer the mixture is to the codes than the prior).

    Raises:
        DataError: fewer than 2 codes, or non-finite codes.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    z = z.double().cpu()
    if z.ndim != 2 or len(z) < 2:
        raise DataError(f"a Gaussian mixture needs at least 2 codes (N, D), got shape {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise DataError("the latent codes hold NaN or infinite values; the model's encoder is broken")
    k = min(components, len(z))
    gm = GaussianMixture(n_components=k, covariance_type="full", max_iter=max_iter, random_state=seed % (2**32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in info["converged"]
        gm.fit(z.numpy())
    d = z.shape[1]
    prior = float((-0.5 * z.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)).mean())
    info = {"codes": len(z), "components": k, "converged": bool(gm.converged_), "em_iterations": int(gm.n_iter_),
            "mean_log_likelihood_nats": float(gm.score(z.numpy())), "prior_mean_log_likelihood_nats": prior}
    tensors = {"weights": torch.from_numpy(gm.weights_), "means": torch.from_numpy(gm.means_),
               "covariances": torch.from_numpy(gm.covariances_)}
    return tensors, info


class LatentMixture:
    """Gaussian mixtures over ``z``: one (``G = 1``, unconditional) or one per class (``G = num_classes``).

    Args:
        weights: ``(G, K)``, rows sum to 1 (padded with 0 where a group has fewer components).
        means: ``(G, K, D)``.
        covariances: ``(G, K, D, D)`` symmetric positive definite.
    """

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor):
        self.weights = weights.float()
        self.means = means.float()
        self.covariances = covariances.double()  # kept (and cached) in float64, as fitted
        self.chol = torch.linalg.cholesky(self.covariances).float()  # float64 factorisation: stable for small variances

    @classmethod
    def from_groups(cls, groups: list[dict[str, torch.Tensor]]) -> "LatentMixture":
        """Stack ``fit_gmm`` results (one per group), padding groups with fewer components."""
        k = max(len(g["weights"]) for g in groups)
        d = groups[0]["means"].shape[1]
        f64 = torch.float64
        w, m = torch.zeros(len(groups), k, dtype=f64), torch.zeros(len(groups), k, d, dtype=f64)
        c = torch.eye(d, dtype=f64).repeat(len(groups), k, 1, 1)
        for i, g in enumerate(groups):
            n = len(g["weights"])
            w[i, :n], m[i, :n], c[i, :n] = g["weights"], g["means"], g["covariances"]
        return cls(w, m, c)

    def to(self, device) -> "LatentMixture":
        for name in ("weights", "means", "covariances", "chol"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "means": self.means, "covariances": self.covariances}

    def sample(self, n: int, *, generator: torch.Generator | None = None, y: torch.Tensor | None = None,
               scale: float = 1.0) -> torch.Tensor:
        """``n`` codes ``(n, D)`` float32 on the mixture's device: component ``k ~ Categorical(weights)`` of
        group ``y`` (``None``: group 0), then ``z = means_k + scale * L_k eps``, ``L_k L_k^T = Cov_k``,
        ``eps ~ N(0, I)`` (``scale`` 1: a draw from the mixture).

        Raises:
            ConfigError: labels outside ``0..G-1``, or missing for a per-class mixture.
        """
        device, g = self.means.device, len(self.weights)
        if y is None:
            if g > 1:
                raise ConfigError("this sampler has one mixture per class: pass class labels y")
            y = torch.zeros(n, dtype=torch.int64, device=device)
        y = y.to(device).long()
        if y.shape != (n,) or (n and (int(y.min()) < 0 or int(y.max()) >= g)):
            raise ConfigError(f"labels must be an int64 tensor of shape ({n},) with values in 0..{g - 1}")
        u = torch.rand(n, device=device, generator=generator)
        eps = torch.randn(n, self.means.shape[2], device=device, generator=generator)
        cum = self.weights.cumsum(1)[y]  # (n, K)
        comp = torch.searchsorted(cum, (u * cum[:, -1])[:, None].contiguous()).squeeze(1).clamp(max=self.weights.shape[1] - 1)
        return self.means[y, comp] + scale * (self.chol[y, comp] @ eps[:, :, None])[:, :, 0]

    def log_prob(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``(n,)`` log density of codes ``z`` ``(n, D)`` under the mixture of group ``y`` (``None``: 0), nats."""
        y = torch.zeros(len(z), dtype=torch.int64, device=z.device) if y is None else y.long()
        comp = torch.distributions.MultivariateNormal(self.means[y], scale_tril=self.chol[y])
        logw = torch.log(self.weights[y].clamp(min=1e-30)).masked_fill(self.weights[y] == 0, -math.inf)
        return torch.logsumexp(comp.log_prob(z[:, None, :]) + logw, dim=1)


# ---------------------------------------------------------------------------- second-stage VAE


@dataclass
class SecondStageConfig:
    """Architecture of a ``SecondStageVAE`` (Dai & Wipf 2019, sec. 4; their MLP is 3 layers of 1,024, ours
    defaults to 3 of 256 to train in seconds on a CPU).

    Attributes:
        latent_dim: ``D``, the first stage's latent size (input and output of this model).
        code_dim: size of its own latent ``u`` (``None``: ``D``, as in the paper).
        hidden: MLP width; depth: hidden layers of the encoder and of the decoder.
        num_classes: ``K > 0`` conditions both networks on a one-hot label (conditional first stage); 0 for none.
    """

    latent_dim: int
    code_dim: int | None = None
    hidden: int = 256
    depth: int = 3
    num_classes: int = 0

    def __post_init__(self) -> None:
        self.code_dim = self.code_dim or self.latent_dim
        for name in ("latent_dim", "code_dim", "hidden", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"second-stage {name} must be a positive integer, got {v!r}")


def _mlp(n_in: int, n_out: int, hidden: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out))


class SecondStageVAE(nn.Module):
    """A VAE on latent codes: ``q(u | z[, y])`` and ``p(z | u[, y]) = N(decoder(u), sigma^2 I)`` with one
    learned ``sigma`` (Dai & Wipf's gamma, soft-clipped at ``exp(-6)``), prior ``p(u) = N(0, I)``.

    Shapes: ``z`` ``(B, latent_dim)``, ``u`` ``(B, code_dim)``, labels ``y`` int64 ``(B,)`` or ``None``.
    """

    def __init__(self, config: SecondStageConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoder = _mlp(c.latent_dim + c.num_classes, 2 * c.code_dim, c.hidden, c.depth)
        self.decoder = _mlp(c.code_dim + c.num_classes, c.latent_dim, c.hidden, c.depth)
        self.log_sigma_raw = nn.Parameter(torch.zeros(()))

    def _with_label(self, v: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if not self.config.num_classes:
            return v
        if y is None:
            raise ConfigError("this second-stage VAE is conditional: pass class labels y")
        return torch.cat([v, F.one_hot(y.long(), self.config.num_classes).to(v.dtype)], dim=1)

    def encode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu_u, logvar_u)``, each ``(B, code_dim)``."""
        return self.encoder(self._with_label(z, y)).chunk(2, dim=1)

    def decode(self, u: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder mean of ``z``: ``(B, latent_dim)``."""
        return self.decoder(self._with_label(u, y))

    def log_sigma(self) -> torch.Tensor:
        return soft_clip_log_sigma(self.log_sigma_raw)

    def loss(self, z: torch.Tensor, y: torch.Tensor | None, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(recon, kl)``, each ``(B,)`` nats per code: ``-log p(z | u)`` at ``u = mu + sigma * eps`` and
        ``KL(q(u | z) || N(0, I))`` (Kingma & Welling 2013, eq. 10)."""
        mu, logvar = self.encode(z, y)
        u = mu + (0.5 * logvar).exp() * eps
        recon = gaussian_nll(z, self.decode(u, y), self.log_sigma()).sum(1)
        return recon, kl_normal(mu, logvar).sum(1)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` codes ``z`` ``(n, latent_dim)`` from the model's density: ``u ~ N(0, I)``, ``z = decoder(u) +
        sigma * eps``. Dai & Wipf decode with the mean alone, which is the same when sigma has shrunk towards 0
        (their analysis); when the second stage has collapsed to ``N(mean, sigma^2 I)`` (codes that already look
        Gaussian) the mean alone would give one image, the noise gives that Gaussian."""
        device = self.log_sigma_raw.device
        u = torch.randn(n, self.config.code_dim, device=device, generator=generator)
        eps = torch.randn(n, self.config.latent_dim, device=device, generator=generator)
        return self.decode(u, None if y is None else y.to(device)) + self.log_sigma().exp() * eps


def train_second_stage(codes: LatentCodes, *, num_classes: int, options: dict, seed: int,
                       device: torch.device | str = "cpu") -> tuple[SecondStageVAE, dict]:
    """Train a ``SecondStageVAE`` on codes ``z ~ q(z | x)`` (drawn afresh every epoch from ``codes``).

    Adam with ``options["lr"]`` cosine-decayed to 0 over ``options["epochs"]`` passes of
    ``options["batch_size"]`` codes; ``VAL_FRACTION`` of the codes (seeded) are held out and their
    -ELBO (nats per code; a density on R^D, so it can be negative) is reported every epoch.

    Returns:
        The model (eval mode, on ``device``) and a report: per-epoch rows, final numbers, time.
    """
    with torch.inference_mode(False), torch.enable_grad():  # also when called lazily from a no-grad sampling loop
        return _train_second_stage(codes, num_classes=num_classes, options=options, seed=seed, device=device)


def _train_second_stage(codes: LatentCodes, *, num_classes: int, options: dict, seed: int,
                        device: torch.device | str) -> tuple[SecondStageVAE, dict]:
    t0 = time.perf_counter()
    n = len(codes.mu)
    gen = torch.Generator().manual_seed(derive_seed(seed, "two-stage", "split"))
    perm = torch.randperm(n, generator=gen)
    n_val = max(1, round(VAL_FRACTION * n)) if n >= 20 else 0
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    mu, std, labels = codes.mu.to(device), (0.5 * codes.logvar).exp().to(device), codes.labels.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "two-stage", "init"))
        model = SecondStageVAE(SecondStageConfig(latent_dim=mu.shape[1], hidden=options["hidden"], depth=options["depth"],
                                                 num_classes=num_classes)).to(device)
    y_of = (lambda idx: labels[idx]) if num_classes else (lambda idx: None)
    bs = min(options["batch_size"], len(train_idx))
    steps_per_epoch = -(-len(train_idx) // bs)
    opt = torch.optim.Adam(model.parameters(), lr=options["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=options["epochs"] * steps_per_epoch)
    rows = []

    @torch.no_grad()
    def validate() -> dict | None:
        if not n_val:
            return None
        model.eval()
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, "two-stage", "val"))
        idx = val_idx.to(device)
        z = mu[idx] + std[idx] * torch.randn(len(idx), mu.shape[1], device=device, generator=g)
        recon, kl = model.loss(z, y_of(idx), torch.randn(len(idx), model.config.code_dim, device=device, generator=g))
        model.train()
        return {"val_neg_elbo": (recon + kl).mean().item(), "val_recon": recon.mean().item(), "val_kl": kl.mean().item()}

    model.train()
    for epoch in tqdm(range(1, options["epochs"] + 1), desc="training second-stage VAE", unit="epoch", leave=False):
        g = torch.Generator(device=device).manual_seed(derive_seed(seed, "two-stage", "epoch", epoch))
        order = train_idx.to(device)[torch.randperm(len(train_idx), device=device, generator=g)]
        sums = torch.zeros(3, device=device)
        for start in range(0, len(order), bs):
            idx = order[start : start + bs]
            z = mu[idx] + std[idx] * torch.randn(len(idx), mu.shape[1], device=device, generator=g)
            recon, kl = model.loss(z, y_of(idx), torch.randn(len(idx), model.config.code_dim, device=device, generator=g))
            loss = (recon + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            sums += torch.stack([recon.detach().sum(), kl.detach().sum(), torch.tensor(float(len(idx)), device=device)])
        recon_sum, kl_sum, count = sums.tolist()
        row = {"epoch": epoch, "train_neg_elbo": (recon_sum + kl_sum) / count, "train_recon": recon_sum / count,
               "train_kl": kl_sum / count, "sigma": model.log_sigma().exp().item()}
        row.update(validate() or {})
        if not all(math.isfinite(v) for v in row.values()):
            raise DataError(f"the second-stage VAE diverged at epoch {epoch} (non-finite loss); try "
                            "--sampler two-stage:lr=0.0003")
        rows.append(row)
    model.eval()
    report = {
        "epochs": rows, "train_codes": len(train_idx), "val_codes": n_val, "steps": options["epochs"] * steps_per_epoch,
        "final": rows[-1], "train_time_s": time.perf_counter() - t0, "architecture": asdict(model.config),
        "units": "nats per code (a density of z in R^D: can be negative); sigma in units of z",
    }
    return model, report


# ---------------------------------------------------------------------------- fitted samplers


class FittedSampler:
    """A fitted latent sampler: ``sample(n, generator=, y=)`` -> codes ``(n, latent_dim)`` on the model's device.

    Attributes:
        name, options, spec: the sampler (``spec``: canonical ``NAME[:KEY=VALUE,...]``).
        report: what ``samplers/<name>.json`` holds (how it was fitted, its metrics).
        cached: whether it was read from the run folder rather than fitted now.
    """

    def __init__(self, name: str, options: dict, body, report: dict, *, cached: bool):
        self.name, self.options, self.body, self.report, self.cached = name, options, body, report, cached
        self.spec = canonical_spec(name, options)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.body.sample(n, generator=generator, y=y)


def load_or_fit(name: str, options: dict, model, run, *, num_classes: int | None = None) -> FittedSampler:
    """The latent sampler ``name`` with ``options`` of ``model`` (the run's newest checkpoint), read from
    ``run``'s folder when a cache fitted on these exact weights and options exists, else fitted on the
    run's training split (``train_codes``) and written there.

    Args:
        num_classes: fit per class (``q(z | y)``; a conditional VAE) when given, else one model of ``q(z)``.

    Raises:
        ConfigError: unknown sampler or options. DataError: too few or non-finite codes.
    """
    if name not in OPTIONS:
        raise ConfigError(f"unknown latent sampler {name!r}; valid: {', '.join(OPTIONS)}")
    check_fits(name, model)
    spec = canonical_spec(name, options)
    stem = cache_name(spec)
    device = next(model.parameters()).device
    fingerprint = weights_fingerprint(model)
    key = {"sampler": name, "options": options, "weights_sha256": fingerprint, "num_classes": num_classes}
    cached = run.read_sampler(stem)
    if cached is not None and {k: cached[1].get(k) for k in key} == key:
        tensors, info = cached
        redo = f"fitting the {stem} sampler again (it replaces the file)"  # a damaged cache is refitted
        report_path = run.path / "samplers" / f"{stem}.json"
        report = read_cache(report_path, lambda p: json.loads(p.read_text()), redo=redo) if report_path.is_file() else {}
        body = read_cache(run.path / "samplers" / f"{stem}.safetensors", lambda p: _rebuild(name, tensors, info),
                          redo=redo) if report is not None else None
        if body is not None:
            return FittedSampler(name, options, body.to(device), report, cached=True)

    t0 = time.perf_counter()
    seed = derive_seed(run.config.seed, "latent-sampler", spec)
    if name == "pixelcnn":
        train, described = train_split(run)
        grids = code_grids(model, train)
        print(f"fitting the {spec} prior on {len(grids):,} code grids of the {described} "
              f"(cached in {run.path / 'samplers' / stem}.safetensors)")
        body, details = train_pixelcnn(grids, model.codebook, options=options, seed=seed, device=device)
        info = {**key, "architecture": asdict(body.net.config)}
        report = {"sampler": name, "spec": spec, "options": options, "description": DESCRIPTIONS[name],
                  "fitted_on": described, "codes": len(grids), "grid": list(grids.shape[1:]), "per_class": False,
                  "weights_sha256": fingerprint, "checkpoint": run.last_checkpoint().name,
                  "fit_time_s": time.perf_counter() - t0, **details, "seed": seed,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "vaelab_version": vaelab.__version__, "git_sha": git_sha()}
        run.write_sampler(stem, body.state_dict(), info, report)
        return FittedSampler(name, options, body, report, cached=False)
    codes, described = train_codes(model, run)
    print(f"fitting the {spec} latent sampler on {len(codes.mu):,} codes of the {described} "
          f"(cached in {run.path / 'samplers' / stem}.safetensors)")
    groups = list(range(num_classes)) if num_classes else [None]
    if name == "gmm":
        fits = []
        for g in tqdm(groups, desc="fitting Gaussian mixtures", unit="mixture", leave=False, disable=len(groups) == 1):
            z = codes.mu if g is None else codes.mu[codes.labels == g]
            if len(z) < 2:
                raise DataError(f"class {g} has {len(z)} training image(s): a per-class mixture needs at least 2")
            fits.append(fit_gmm(z, options["components"], seed=seed, max_iter=options["max_iter"]))
        body = LatentMixture.from_groups([t for t, _ in fits])
        tensors = body.tensors()
        details = {"groups": [{"label": g, **i} for g, (_, i) in zip(groups, fits)]}
        arch = None
    else:
        stage2, details = train_second_stage(codes, num_classes=num_classes or 0, options=options, seed=seed, device=device)
        body, tensors, arch = stage2, stage2.state_dict(), asdict(stage2.config)
    info = {**key, "architecture": arch}
    report = {
        "sampler": name, "spec": spec, "options": options, "description": DESCRIPTIONS[name],
        "fitted_on": described, "codes": len(codes.mu), "latent_dim": codes.mu.shape[1],
        "per_class": bool(num_classes), "weights_sha256": fingerprint, "checkpoint": run.last_checkpoint().name,
        "fit_time_s": time.perf_counter() - t0, **details, "seed": seed,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vaelab_version": vaelab.__version__, "git_sha": git_sha(),
    }
    run.write_sampler(stem, tensors, info, report)
    return FittedSampler(name, options, body.to(device), report, cached=False)


def _rebuild(name: str, tensors: dict[str, torch.Tensor], info: dict):
    if name == "gmm":
        return LatentMixture(tensors["weights"], tensors["means"], tensors["covariances"])
    if name == "pixelcnn":
        prior = PixelCNNPrior(PixelCNNConfig(**info["architecture"]), tensors["codebook"])
        prior.load_state_dict(tensors)
        return prior.eval()
    model = SecondStageVAE(SecondStageConfig(**info["architecture"]))
    model.load_state_dict(tensors)
    return model.eval()
