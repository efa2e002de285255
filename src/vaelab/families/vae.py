"""The VAE family: VAE, beta-VAE, conditional VAE and the zoo of VAE objectives and priors (IWAE,
beta-TC-VAE, InfoVAE/WAE-MMD, RAE, VampPrior; ``vaelab.models``).

Loss terms in nats per image: ``recon = -log p(x | z)`` and ``kl = KL(q(z | x) || p(z))``
(Kingma & Welling 2013), the training loss is ``recon + beta * kl`` (Higgins et al. 2017).
Every model of the family takes class labels ``y`` (or ``None``) in ``encode``, ``decode``,
``decode_logits``, ``loss``, ``reconstruct`` and ``sample``; unconditional models ignore them.
See ``vaelab.families`` for the contract this module implements.

The zoo's contract: what a model of this family may change, all on the model class (``ConvVAE`` holds
the defaults), so that this module and everything outside it never ask which model it is:

- ``loss`` may return ``LossOutput.objective`` (its own per-image objective; validation ``loss`` and the LR
  schedule use it) and ``LossOutput.extra`` (its own per-image terms, named in ``EXTRA_TERMS``: reported as
  ``val_<name>`` per epoch and ``test_<name>`` in ``summary.json``);
- ``log_prior(z, y=)`` and ``sample_prior(n, y=, generator=)``: its prior, used by the prior sampler, the
  pictures and the IWAE likelihood bound; ``PRIOR`` names it in words;
- ``importance_samples(x, k, y=, generator=)``: ``k`` posterior draws per image and ``log p - log q`` of every
  latent variable, read by the IWAE likelihood bound (a model whose posterior is not the diagonal Gaussian of
  ``encode``, a flow or a hierarchy, gives its own);
- ``DEFAULT_SAMPLER``: the sampler drawn when none is asked for (e.g. ``gmm`` for a model without a prior);
- ``HAS_ELBO = False``: a deterministic encoder; KL and -ELBO are reported as ``null``;
- ``NOT_APPLICABLE``: ``vaelab evaluate`` metrics it cannot support, with the reason;
- ``latent_shape``: the shape of one code; codes travel flattened to ``prod(latent_shape)`` numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vaelab import latent_priors, plots
from vaelab.data import DIGIT_LIKE, ImageSplit, to_pixels
from vaelab.errors import ConfigError
from vaelab.families.base import Sampler, constant_labels, cycle_labels, eval_blocks, gather_rows
from vaelab.losses import likelihood_note
from vaelab.metrics.latent import COLLAPSE_KL_NATS, active_units
from vaelab.models import MODEL_TYPES, PRESETS
from vaelab.runtime import Distributed
from vaelab.tblog import add_grid

NAME = "vae"
DESCRIPTION = "variational autoencoder (VAE, beta-VAE, conditional VAE, and the zoo's objectives and priors)"
LOSS_UNIT = "nats per image (recon + beta * KL)"
LOSS_FORMAT = ".2f"
TERMS = {"recon": "nats per image", "kl": "nats per image"}
USES_BETA = True
HEADLINE = ("test_recon_nats", "test_kl_nats", "test_neg_elbo_nats", "test_mse_per_pixel", "active_units", "train_time_s")
SWEEP_COLUMNS = [
    ("recon_mse", "recon MSE / pixel", "test recon MSE per pixel"),
    ("kl", "KL (nats)", "test KL (nats / image)"),
    ("neg_elbo", "-ELBO (nats)", "test -ELBO (nats / image)"),
    ("active_units", "active units", "active units (test)"),
]
NOT_APPLICABLE: dict[str, str] = {}
# sampler name -> how z is drawn (each decoded in one pass); gmm and two-stage are fitted on the run's train
# split and cached in RUN_DIR/samplers/ (vaelab.latent_priors); options are written NAME:KEY=VALUE,...
SAMPLERS = {"prior": "z ~ p(z) (the model's prior, N(0, I) unless the model has its own)", **latent_priors.DESCRIPTIONS}
SYNTHESIS_METHODS = ("class-mean", "class-std", "class-gaussian", "class-gmm")

# file -> caption; {source} is the dataset label, {n_test} the number of test images
PICTURES = {
    "training_curves.png": "Training curves: reconstruction NLL, KL(q(z|x) || p(z)) and the total loss recon + beta*KL (a "
                           "zoo model's own objective, docs/model-zoo.md), in nats per image, per epoch. Train = running "
                           "mean over each epoch on the {source} train split; validation = the held-out part of the train "
                           "split, evaluated at the end of each epoch.",
    "reconstructions.png": "Reconstructions: top row, 8 random images of the {source} test split; bottom row, their "
                           "reconstructions (decoder mean at z = mu).",
    "samples.png": "Samples from the prior: decoder means of 64 draws z ~ {prior} (no test image involved) of the model "
                   "trained on {source}.",
    "interpolation.png": "Latent interpolation: each row decodes 10 evenly spaced points on the straight line between the "
                         "posterior means mu of two {source} test images (left and right ends).",
    "latent_mu_pca.png": "PCA to 2-D of the posterior means mu of {n_test} {source} test images, coloured by class.",
    "latent_sigma_pca.png": "PCA to 2-D of the posterior standard deviations exp(0.5 * logvar) of {n_test} {source} test "
                            "images, coloured by class.",
    "latent_mu_tsne.png": "t-SNE to 2-D of the posterior means mu of (at most the first 3,000) {source} test images, "
                          "coloured by class.",
    "per_class_samples.png": "Conditional samples: one row per class, column j decoded from the same z_j ~ N(0, I) with "
                             "each row's label (model trained on {source}).",
}


# the default likelihood of continuous (not digit-like) data. Measured (docs/samplers.md, "Fixed vs fitted decoder
# sigma"): gaussian_calibrated wins on -ELBO, reconstructions and FID with --sampler gmm/two-stage, but not with the
# default prior sampler (Fashion-MNIST FID 12.6 vs 12.3, CIFAR-10 prior grids worse), so the fixed sigma stays
CONTINUOUS_LIKELIHOOD = "gaussian"
# data-derived defaults (image folders): Bernoulli when at least this share of pixels is near black or white
NEAR_BINARY = 0.7
WIDTHS = (32, 64, 128, 256)


def resolve_config(config) -> None:
    """Default likelihood (Bernoulli for digit-like data, else ``CONTINUOUS_LIKELIHOOD``) and Gaussian sigma
    (sqrt 0.5: fixed, or the starting value of a fitted one).

    Raises:
        ConfigError: ``first_stage`` is set (latent diffusion models only).
    """
    if config.first_stage is not None:
        raise ConfigError(f"first_stage applies to latent diffusion models (ldm-mlp, ldm-unet); model {config.model!r} "
                          "is a VAE (remove it from the config or command line)")
    if config.recon_likelihood is None:
        config.recon_likelihood = "bernoulli" if config.dataset in DIGIT_LIKE else CONTINUOUS_LIKELIHOOD
    if config.recon_sigma is None:
        config.recon_sigma = 0.5**0.5


def data_defaults(config, stats) -> dict[str, str]:
    """Fill the unset VAE fields that depend on the images (image folders; ``stats``: a ``config.DataStats``)
    and return ``{field: "value: why"}``.

    - ``recon_likelihood``: Bernoulli when at least ``NEAR_BINARY`` of the pixels are within 10 % of black
      or white (ink on a background, like MNIST: 91 %; a 16x16 resize of MNIST: 79 %), else
      ``CONTINUOUS_LIKELIHOOD`` (Fashion-MNIST: 61 %, photos lower).
    - for the presets that take their input shape from the data (no ``image_size`` fixed: ``conv``,
      ``cvae-conv``, ``iwae-conv``, ...): one stride-2 conv per halving down to a 4-7 px feature map
      (widths from ``WIDTHS``, at most 4), a 256-wide hidden layer, and ``latent_dim`` 16 for images of at
      most 1,024 sub-pixels (the size of mnist-small's code), else the preset's.
    """
    derived = {}
    if config.recon_likelihood is None:
        binary = stats.near_binary >= NEAR_BINARY and config.pixel_range == "[0,1]"
        config.recon_likelihood = "bernoulli" if binary else CONTINUOUS_LIKELIHOOD
        derived["recon_likelihood"] = (
            f"bernoulli: {stats.near_binary:.0%} of the pixels are within 10% of black or white (>= {NEAR_BINARY:.0%}): "
            "near-binary images, where the Bernoulli likelihood is the usual choice (as for MNIST)" if binary else
            f"{CONTINUOUS_LIKELIHOOD}: continuous pixel values (only {stats.near_binary:.0%} within 10% of black or "
            f"white, < {NEAR_BINARY:.0%}{'' if config.pixel_range == '[0,1]' else '; Bernoulli needs [0,1] pixels'})")
    model_type, preset = PRESETS[config.model]
    # a network sized from the data; a config class may opt out (kl-f4: no fully connected layer)
    if "image_size" not in preset and getattr(MODEL_TYPES[model_type][0], "sized_from_data", True):
        side = min(stats.height, stats.width)
        n = max(1, min(len(WIDTHS), int(math.log2(max(side // 4, 1)))))
        args = config.model_args
        if "channels" not in args:
            args["channels"] = list(WIDTHS[:n])
            derived["model_args.channels"] = (f"{args['channels']}: {n} stride-2 conv(s) take {side} px down to "
                                              f"{side >> n} px")
        if "fc_hidden" not in args:
            args["fc_hidden"] = 256
            derived["model_args.fc_hidden"] = "256: a hidden layer between the conv stack and the code (as mnist-small)"
        if config.latent_dim is None and stats.channels * stats.height * stats.width <= 1024:
            config.latent_dim = 16
            derived["latent_dim"] = (f"16: small images ({stats.channels}x{stats.height}x{stats.width} <= 1,024 "
                                     "sub-pixels), the code size of mnist-small")
    return derived


def prepare_model(model, train: ImageSplit, config) -> str | None:
    """Nothing to set up from the data."""
    return None


def after_step(model) -> None:
    """Nothing to do after an optimiser step."""


@torch.no_grad()
def evaluate(model, split: ImageSplit, *, beta: float = 1.0, seed: int = 0, keep_latents: bool = False,
             dist: Distributed | None = None) -> dict:
    """Mean loss terms of ``model`` over ``split`` (on the model's device), one seeded ``z`` per image
    (see ``eval_blocks``: the same numbers with any number of data-parallel ranks), in float32.

    Returns:
        dict with ``loss`` (the model's objective, recon + beta*kl for a VAE), ``recon``, ``kl``,
        ``neg_elbo`` (nats per image; ``None`` for a model without an ELBO, ``HAS_ELBO = False``),
        ``mse`` (per pixel), ``mu_mean``, ``logvar_mean``, ``active_units`` (dims with
        Var_x(E_q[z_i]) > 0.01, Burda et al. 2015), the means of the model's ``EXTRA_TERMS`` and, if
        ``keep_latents``, ``mu`` and ``logvar`` as ``(N, latent_dim)`` CPU tensors in the split's order.
    """
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    device = split.images.device
    extra = tuple(model.EXTRA_TERMS)
    sums = torch.zeros(5 + len(extra), device=device)  # loss, recon, kl, mse, *extra, n
    mus, logvars, idxs = [], [], []
    for x, y, noise, idx in eval_blocks(model, split, seed=seed, dist=dist):
        out = model.loss(x, beta=beta, y=y, noise=noise)
        sums += torch.stack([out.per_image(beta).sum(), out.recon.sum(), out.kl.sum(), out.mse.sum(),
                             *(out.extra[k].sum() for k in extra), torch.tensor(float(len(x)), device=device)])
        mus.append(out.mu.float())
        logvars.append(out.logvar.float())
        idxs.append(idx)
    model.train(was_training)
    loss, recon, kl, mse, *extra_sums, n = dist.all_reduce(sums).tolist()
    d = math.prod(model.latent_shape)
    mu, logvar = gather_rows(dist, torch.cat(idxs) if idxs else torch.zeros(0, dtype=torch.int64),
                             torch.cat(mus) if mus else torch.zeros(0, d), torch.cat(logvars) if logvars else torch.zeros(0, d))
    elbo = model.HAS_ELBO
    result = {
        "loss": loss / n,
        "recon": recon / n,
        "kl": kl / n if elbo else None,
        "neg_elbo": (recon + kl) / n if elbo else None,
        "mse": mse / n,
        **{k: v / n for k, v in zip(extra, extra_sums)},
        "mu_mean": mu.mean().item(),
        "logvar_mean": logvar.mean().item(),
        "active_units": active_units(mu) if len(mu) > 1 else 0,
    }
    if keep_latents:
        result["mu"], result["logvar"] = mu, logvar
    return result


def epoch_line(row: dict, model) -> str:
    def kl(key: str) -> str:
        return f" kl {row[key]:.2f}" if row.get(key) is not None and model.HAS_ELBO else ""

    extra = "".join(f" {k} {row[f'val_{k}']:.2f}" for k in model.EXTRA_TERMS)
    return (f"train loss {row['train_loss']:.2f} recon {row['train_recon']:.2f}{kl('train_kl')} | "
            f"val loss {row['val_loss']:.2f} recon {row['val_recon']:.2f}{kl('val_kl')}{extra} | "
            f"mu mean {row['val_mu_mean']:+.3f} logvar mean {row['val_logvar_mean']:+.3f} | active units "
            f"{row['val_active_units']}/{math.prod(model.latent_shape)} | beta {row['beta']:.3g}")


def epoch_warning(rows: list[dict]) -> str | None:
    """The posterior-collapse warning when the validation KL stayed below 0.1 nats for the last two epochs."""
    low = 0
    for row in reversed(rows):
        if row["val_kl"] is None or row["val_kl"] >= COLLAPSE_KL_NATS:  # None: no KL (a deterministic encoder)
            break
        low += 1
    if low < 2:
        return None
    return (f"WARNING: posterior collapse: validation KL is {rows[-1]['val_kl']:.3f} nats/image (< {COLLAPSE_KL_NATS}) "
            f"for {low} epochs in a row; the decoder is ignoring z. Try a smaller beta, KL annealing "
            "(--kl-anneal-epochs) or a cyclical schedule.")


def summary(model, test: ImageSplit, config, metrics: dict) -> dict:
    """Test-split numbers of a VAE run for ``summary.json`` (``metrics`` from ``evaluate``)."""
    c, h, w = test.shape
    discrete, likelihood = likelihood_note(model.config.recon_likelihood, test.images)
    log_sigma = model.decoder_log_sigma()
    return {
        "latent_dim": model.config.latent_dim,
        "recon_likelihood": model.config.recon_likelihood,
        # the Gaussian decoder's standard deviation in pixel units (fitted for gaussian_learned/_calibrated)
        "decoder_sigma": None if log_sigma is None else math.exp(log_sigma.item()),
        "prior": model.PRIOR,
        "test_recon_nats": metrics["recon"],
        "test_kl_nats": metrics["kl"],
        "test_neg_elbo_nats": metrics["neg_elbo"],
        "test_neg_elbo_bits_per_dim": metrics["neg_elbo"] / (c * h * w * math.log(2)) if discrete and model.HAS_ELBO else None,
        "test_mse_per_pixel": metrics["mse"],
        "active_units": metrics["active_units"],
        **({"test_loss": metrics["loss"], **{f"test_{k}": metrics[k] for k in model.EXTRA_TERMS},
            "terms": dict(model.EXTRA_TERMS)} if model.EXTRA_TERMS else {}),
        "units": f"recon/KL/-ELBO in nats per image (one z sample); MSE per pixel on {model.config.pixel_range} pixels"
                 + ("" if model.HAS_ELBO else "; no KL or -ELBO: the encoder is deterministic"),
        "likelihood": likelihood,
    }


@torch.no_grad()
def write_pictures(run_dir: Path, model, data, rows: list[dict], config, metrics: dict) -> dict[str, str]:
    """The run's pictures (``PICTURES``) from the test split and ``metrics`` (``evaluate(keep_latents=True)``);
    returns ``{file: caption}`` of those written."""
    run_dir, test = Path(run_dir), data.test
    model.eval()
    pr = model.config.pixel_range
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    written = []

    def grid(images: torch.Tensor, name: str, nrow: int) -> None:
        plots.save_grid(images, run_dir / name, nrow=nrow, pixel_range=pr)
        written.append(name)

    if rows:
        plots.training_curves(rows, run_dir / "training_curves.png")
        written.append("training_curves.png")
    # 8 images to reconstruct + 6 interpolation pairs; a tiny test split repeats its images
    pick = torch.randperm(len(test), generator=gen).repeat(-(-20 // len(test)))[:20]
    x = to_pixels(test.images[pick.to(test.images.device)], pr).to(device)
    y = test.labels[pick.to(test.labels.device)].to(device)
    grid(torch.cat([x[:8], model.reconstruct(x[:8], y=y[:8])]), "reconstructions.png", 8)
    z = model.sample_prior(64, generator=gen)
    y64 = cycle_labels(model, 64)
    grid(model.decode(z, y=None if y64 is None else y64.to(device)), "samples.png", 8)
    grid(interpolations(model, x[8:14], x[14:20], y_a=y[8:14], y_b=y[14:20]), "interpolation.png", 10)
    if model.conditional:
        grid(per_class_samples(model, generator=gen), "per_class_samples.png", 10)
    mu, logvar, labels = metrics["mu"], metrics["logvar"], test.labels.cpu().numpy()
    plots.latent_scatter(mu.numpy(), labels, test.classes, run_dir / "latent_mu_pca.png",
                         title=f"PCA of posterior means mu ({test.source} test, n={len(labels):,})")
    written.append("latent_mu_pca.png")
    if model.HAS_ELBO:  # a deterministic encoder has no posterior spread to plot
        plots.latent_scatter((0.5 * logvar).exp().numpy(), labels, test.classes, run_dir / "latent_sigma_pca.png",
                             title=f"PCA of posterior std exp(0.5*logvar) ({test.source} test, n={len(labels):,})")
        written.append("latent_sigma_pca.png")
    if config.tsne:
        n = min(3000, len(labels))
        plots.latent_scatter(mu[:n].numpy(), labels[:n], test.classes, run_dir / "latent_mu_tsne.png",
                             title=f"t-SNE of mu ({test.source} test, first {n:,})", method="tsne")
        written.append("latent_mu_tsne.png")
    return {name: PICTURES[name].format(source=test.source, n_test=f"{len(test):,}", prior=model.PRIOR) for name in written}


@torch.no_grad()
def interpolations(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, *,
                   y_a: torch.Tensor | None = None, y_b: torch.Tensor | None = None) -> torch.Tensor:
    """Decode linear paths ``z = (1-t) mu_a + t mu_b`` for ``t`` in ``linspace(0, 1, steps)``.

    Each image is encoded with its own label and the whole path is decoded with ``y_a`` (for a
    conditional model: the style of ``b`` drawn as class ``a``; unconditional models ignore labels).

    Returns ``(P * steps, C, H, W)`` decoder means, row ``p`` holding pair ``p``'s path.
    """
    mu_a, mu_b = model.encode(x_a, y=y_a)[0], model.encode(x_b, y=y_b)[0]
    t = torch.linspace(0, 1, steps, device=mu_a.device)[None, :, None]
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (P, steps, D)
    return model.decode(z.flatten(0, 1), y=None if y_a is None else y_a.repeat_interleave(steps))


@torch.no_grad()
def per_class_samples(model, *, per_class: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples of a conditional model, one row per class, column ``j`` sharing one ``z_j ~ N(0, I)``.

    Returns ``(num_classes * per_class, C, H, W)`` decoder means, class-major.
    """
    device = next(model.parameters()).device
    k = model.config.num_classes
    z = torch.randn(per_class, model.config.latent_dim, generator=generator).to(device)
    y = torch.arange(k, device=device).repeat_interleave(per_class)
    return model.decode(z.repeat(k, 1), y=y)


def log_images(writer, model, val: ImageSplit, epoch: int, seed: int) -> None:
    """TensorBoard: 8 validation images above their reconstructions, and 16 prior samples (fixed seed)."""
    x, y = val.images[:8], val.labels[:8]
    if len(x):
        x = to_pixels(x, model.config.pixel_range)
        add_grid(writer, "reconstructions/val", torch.cat([x, model.reconstruct(x, y=y)]), model.config.pixel_range, 8, epoch)
    gen = torch.Generator(device=val.images.device).manual_seed(seed)
    y16 = cycle_labels(model, 16)
    samples = model.sample(16, y=None if y16 is None else y16.to(val.images.device), generator=gen)
    add_grid(writer, "samples/prior", samples, model.config.pixel_range, 8, epoch)


def sweep_metrics(summary: dict) -> dict:
    return {"recon_mse": summary["test_mse_per_pixel"], "kl": summary["test_kl_nats"],
            "neg_elbo": summary["test_neg_elbo_nats"], "active_units": summary["active_units"],
            "latent_dim": summary["latent_dim"]}


def sampler(model, run=None, *, sampler: str | None = None, steps: int | None = None) -> Sampler:
    """How to draw images from a VAE: ``z`` from one of ``SAMPLERS``, decoded in one pass (decoder means).

    - ``prior`` (default unless the model's ``DEFAULT_SAMPLER`` says otherwise): ``z ~ p(z)``
      (``model.sample_prior``: ``N(0, I)``, or the model's own prior such as a VampPrior).
    - ``gmm[:components=K,max_iter=N]``: a full-covariance Gaussian mixture (10 components by default)
      fitted on the posterior means of the run's train split; per class for a conditional VAE.
    - ``two-stage[:epochs=E,hidden=H,depth=L,batch_size=B,lr=R]``: a second-stage VAE trained on the
      train split's codes (Dai & Wipf 2019); conditioned on the class for a conditional VAE.

    The fitted samplers need ``run`` and are read from (or fitted and written to) ``RUN_DIR/samplers/``
    (``vaelab.latent_priors.load_or_fit``) at their first ``draw``: building one only checks its options.
    A conditional model drawn without labels draws the classes in turn (``arange(n) % num_classes``), as
    its prior sampler does. ``draw`` is seeded by its generator.

    Raises:
        ConfigError: ``steps`` (diffusion only), an unknown sampler or option, or a fitted sampler without a run.
    """
    if steps is not None:
        raise ConfigError("--steps applies to diffusion samplers; a VAE decodes an image in one pass")
    spec = sampler or model.DEFAULT_SAMPLER
    name = spec.partition(":")[0].strip()
    if name not in SAMPLERS:
        raise ConfigError(f"unknown VAE sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    cfg = model.config
    decoder = f"{cfg.recon_likelihood} decoder"
    if name == "prior":
        if ":" in spec:
            raise ConfigError(f"--sampler {spec!r}: the prior sampler takes no options")

        def draw(n: int, generator: torch.Generator | None, y: torch.Tensor | None) -> torch.Tensor:
            return model.sample(n, y=y, generator=generator)

        return Sampler(name=name, options={"sampler": name}, label="prior", network_evaluations=1,
                       latent_space=f"z in R^{math.prod(model.latent_shape)}, prior {model.PRIOR}; encoder gives q(z|x) ({decoder})",
                       draw=draw)
    name, options = latent_priors.parse_spec(spec)  # every option checked before any fitting
    latent_priors.check_fits(name, model)
    if run is None:
        raise ConfigError(f"--sampler {name} is fitted on a run's training split: it needs the run folder")
    spec = latent_priors.canonical_spec(name, options)
    device = next(model.parameters()).device
    fitted: list = []  # read or fitted at the first draw, so that building samplers (e.g. compare's) costs nothing

    def draw_fitted(n: int, generator: torch.Generator | None, y: torch.Tensor | None) -> torch.Tensor:
        if not fitted:
            fitted.append(latent_priors.load_or_fit(name, options, model, run,
                                                    num_classes=cfg.num_classes if model.conditional else None))
        if y is None and model.conditional:
            y = cycle_labels(model, n)
        y = None if y is None else y.to(device)
        z = fitted[0].sample(n, generator=generator, y=y if model.conditional else None)
        return model.decode(z, y=y)

    per_class = " per class" if model.conditional else ""
    # passes per image: the decoder, plus the second stage's small MLP decoder or the PixelCNN's one per grid cell
    if name == "gmm":
        what, passes = f"Gaussian mixture (up to {options['components']} full-covariance components{per_class})", 1
    elif name == "two-stage":
        what, passes = f"second-stage VAE{' conditioned on y' if model.conditional else ''}", 2
    else:
        what, passes = "PixelCNN over the code grid", 1 + math.prod(model.latent_shape[1:])
    return Sampler(name=name, options={"sampler": spec, **options}, label=spec, network_evaluations=passes,
                   latent_space=f"z in R^{math.prod(model.latent_shape)} drawn from a {what} fitted on the train split's codes "
                                f"(RUN_DIR/samplers/{latent_priors.cache_name(spec)}.json); {decoder}",
                   draw=draw_fitted)


def comparison_samplers(model, run=None, *, ddim_steps: int = 50) -> list[Sampler]:
    """The entries of a comparison: the prior sampler and, given the run, the two aggregated-posterior
    samplers (``gmm``, ``two-stage``) and the model's default sampler where it is another, with their default
    options."""
    names = ["prior"] if run is None else ["prior", "gmm", "two-stage"]
    if run is not None and model.DEFAULT_SAMPLER not in names:
        names.append(model.DEFAULT_SAMPLER)
    return [sampler(model, run, sampler=name) for name in names]


def sample_labels(model, n: int) -> torch.Tensor | None:
    return cycle_labels(model, n)


def class_labels(model, index: int, n: int) -> torch.Tensor:
    return constant_labels(model, index, n)


def synthesis_methods(model) -> list[str]:
    """Conditional VAEs default to their own sampler (``--sampler``, prior by default) with the class as
    condition; VAEs to class-mean codes. ``class-gmm``: a Gaussian mixture per class of the codes."""
    return ["prior", *SYNTHESIS_METHODS] if model.conditional else list(SYNTHESIS_METHODS)
