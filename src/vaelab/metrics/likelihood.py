"""Likelihood of test images under a VAE: negative ELBO and the IWAE bound (Burda et al. 2015)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from vaelab.data import ImageSplit, to_pixels
from vaelab.errors import ConfigError
from vaelab.losses import likelihood_note, recon_nll


@torch.no_grad()
def importance_weights(model, x: torch.Tensor, k: int, *, y: torch.Tensor | None = None, chunk: int | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Log importance weights ``log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x)``, ``z_i ~ q(z|x)``.

    Burda et al. (2015), eq. 8. The model draws the ``z_i`` and gives ``log p(z_i) - log q(z_i|x)`` itself
    (``model.importance_samples``: its own prior, and its own posterior where that is not a diagonal Gaussian,
    e.g. a flow or a hierarchy of latent variables). The ``k`` samples are drawn in chunks of ``chunk`` (the
    images are encoded once per chunk) so at most ``B * chunk`` images are decoded at once.

    Args:
        model: a VAE with ``importance_samples``, ``decode_logits`` and ``config.recon_likelihood``.
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
    out = []
    for start in range(0, k, chunk):
        kc = min(chunk, k - start)
        z, log_ratio = model.importance_samples(x, kc, y=y, generator=generator)  # (B, kc, D), (B, kc)
        yk = y.repeat_interleave(kc) if y is not None else None
        logits = model.decode_logits(z.reshape(b * kc, -1), y=yk)
        xk = x.repeat_interleave(kc, dim=0)
        nll, _ = recon_nll(logits, xk, cfg.recon_likelihood, sigma=cfg.recon_sigma, pixel_range=cfg.pixel_range)
        out.append((-nll.reshape(b, kc) + log_ratio).double())
    return torch.cat(out, 1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """``L_k = log (1/k) sum_i w_i`` per row of ``(B, k)`` log weights (Burda et al. 2015, eq. 8), nats."""
    return torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])


# test images of the IWAE bound by default: k = 1,000 on all 10,000 is 10 million decoder passes (~25 min on 2
# CPU cores for the MNIST VAE); 500 keep a default `vaelab evaluate` within 20 min there (docs/evaluation.md)
DEFAULT_SUBSET = 500


def likelihood_target(model) -> str:
    """What the bound is a bound of: ``log p(x | y)`` for a class-conditional model (the test images'
    labels are given), else ``log p(x)``."""
    return "log p(x | y)" if getattr(model, "conditional", False) else "log p(x)"


def nll_metrics(model, test: ImageSplit, *, k: int, subset: int | None, device, seed: int) -> dict:
    """-ELBO and the IWAE bound (nats per image, bits/dim where the likelihood is discrete) on the
    test split or a seeded random subset of ``subset`` images, with their standard errors over images."""
    pixel_range = model.config.pixel_range
    n = min(len(test), subset) if subset else len(test)
    split = test
    if n < len(test):
        split = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n].sort().values)
    gen = torch.Generator(device=device).manual_seed(seed)
    # images per batch such that at most ~2,000 images are decoded at once
    b = max(1, min(100, 2000 // min(k, 2000)))
    neg_elbo, neg_iwae = [], []
    with tqdm(total=n, desc=f"IWAE k={k}", unit="img") as bar:
        for start in range(0, n, b):
            x = to_pixels(split.images[start : start + b].to(device), pixel_range)
            y = split.labels[start : start + b].to(device)
            log_w = importance_weights(model, x, k, y=y, generator=gen).cpu()
            neg_elbo.append(-log_w.mean(1))
            neg_iwae.append(-iwae_bound(log_w))
            bar.update(len(x))
    neg_elbo, neg_iwae = torch.cat(neg_elbo), torch.cat(neg_iwae)
    discrete, note = likelihood_note(model.config.recon_likelihood, split.images)
    dims = math.prod(split.shape)
    to_bpd = (lambda v: v / (dims * math.log(2))) if discrete else (lambda v: None)
    target = likelihood_target(model)
    sem = (lambda v: float(v.std() / math.sqrt(len(v)))) if n > 1 else (lambda v: None)
    chosen = f" (random, seed {seed})" if n < len(test) else ""
    return {
        "metric": f"negative ELBO and IWAE bound (Burda et al. 2015) of {target} with k={k}",
        "bound_of": target + ("; the test images' class labels y are given" if target != "log p(x)" else ""),
        "split": f"{split.source} test split, {n:,} of {len(test):,} images{chosen}",
        "k": k, "num_images": n, "recon_likelihood": model.config.recon_likelihood,
        "neg_elbo_nats": float(neg_elbo.mean()), "iwae_nll_nats": float(neg_iwae.mean()),
        "neg_elbo_nats_sem": sem(neg_elbo), "iwae_nll_nats_sem": sem(neg_iwae),
        "neg_elbo_bits_per_dim": to_bpd(float(neg_elbo.mean())), "iwae_nll_bits_per_dim": to_bpd(float(neg_iwae.mean())),
        "units": "nats per image; bits/dim = nats / (C*H*W * ln 2); *_sem: standard error of the mean over the images",
        "likelihood": note,
        "estimator": "-ELBO: mean over the k samples of -log w; IWAE: -log mean_k w on the same samples",
    }
