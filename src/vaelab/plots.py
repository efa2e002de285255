"""Pictures of a run: image grids (torchvision), curves and latent projections (matplotlib, scikit-learn).

Every writer goes through ``vaelab.io.atomic_path``, so a picture is either complete or absent.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from vaelab.data import to_unit_interval  # noqa: E402
from vaelab.io import atomic_path  # noqa: E402


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int = 8, pixel_range: str = "[0,1]", min_side: int = 64) -> None:
    """Save ``(B, C, H, W)`` float images (in ``pixel_range``) as one PNG grid.

    Images smaller than ``min_side`` pixels are enlarged with nearest-neighbour scaling so a
    28x28 digit stays readable.
    """
    x = to_unit_interval(images.detach().float().cpu(), pixel_range)
    scale = max(1, -(-min_side // x.shape[-1]))
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    with atomic_path(path) as tmp:
        save_image(x, str(tmp), nrow=nrow, padding=2, pad_value=1.0)


def sample_rows(rows: list[tuple[str, torch.Tensor]], path: str | Path) -> None:
    """One labelled row of images per model, in one PNG: ``rows`` is ``[(label, uint8 (n, C, H, W))]``
    (images of one size across rows; grayscale shown as gray). More than 16 images of a model wrap onto
    further lines of its row."""
    grids = [make_grid(images.float() / 255.0, nrow=min(len(images), 16), padding=2, pad_value=1.0) for _, images in rows]
    height, width = grids[0].shape[1:]
    row_inches = max(0.9, 12.0 * height / width)
    fig, axes = plt.subplots(len(rows), 1, figsize=(12.0 + 2.4, row_inches * len(rows)), squeeze=False)
    for ax, (label, _), grid in zip(axes[:, 0], rows, grids):
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(left=2.4 / 14.4, right=0.995, top=0.995, bottom=0.005, hspace=0.08)
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """Write a matplotlib figure as a PNG (atomically) and close it, also when writing fails."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def training_curves(rows: list[dict], path: str | Path) -> None:
    """Recon, KL and total loss per epoch, train and validation (nats per image)."""
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("recon", "kl", "loss"), ("reconstruction NLL", "KL(q(z|x) || p(z))", "total: recon + beta*KL")):
        ax.plot(epochs, [r[f"train_{key}"] for r in rows], "o-", label="train (running mean over epoch)")
        ax.plot(epochs, [r[f"val_{key}"] for r in rows], "s-", label="validation (end of epoch)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def latent_scatter(points: np.ndarray, labels: np.ndarray, classes: list[str], path: str | Path, *, title: str, method: str = "pca") -> None:
    """2-D projection (PCA or t-SNE) of ``(N, D)`` latent statistics, coloured by class."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[1] == 1:
        xy = np.concatenate([points, np.zeros_like(points)], axis=1)
        axis_names = ("dim 0", "")
    elif method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2).fit(points)
        xy = pca.transform(points)
        ev = pca.explained_variance_ratio_
        axis_names = (f"PC1 ({ev[0]:.0%} of variance)", f"PC2 ({ev[1]:.0%} of variance)")
    else:
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, init="pca", random_state=0, perplexity=min(30, len(points) - 1)).fit_transform(points)
        axis_names = ("t-SNE 1", "t-SNE 2")
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.6, color=cmap(c % cmap.N), label=name)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_title(title, fontsize=10)
    ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2 if len(classes) > 10 else 1)
    save_figure(fig, path)


def class_balance(generated: dict, real: dict, classes: list[str], path: str | Path, *, source: str) -> None:
    """Bar chart of the evaluator's predicted-class distribution, generated vs real test images."""
    k = len(classes)
    pos = np.arange(k)
    fig, ax = plt.subplots(figsize=(max(6.4, 0.6 * k), 4.0))
    ax.bar(pos - 0.2, real["class_distribution"], 0.4, label=f"real test (class balance {real['class_balance']:.3f})")
    ax.bar(pos + 0.2, generated["class_distribution"], 0.4, label=f"generated (class balance {generated['class_balance']:.3f})")
    ax.axhline(1.0 / k, color="k", ls="--", lw=1, label="uniform")
    ax.set_xticks(pos, classes, rotation=45 if max(len(c) for c in classes) > 3 else 0, ha="right" if max(len(c) for c in classes) > 3 else "center", fontsize=8)
    ax.set_ylabel("share of images predicted as the class")
    ax.set_title(f"predicted-class distribution ({source}); class balance = entropy / log K", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def kl_per_dim(kl: list[float], variance: list[float], path: str | Path, *, threshold: float, source: str) -> None:
    """Bar chart of the mean KL per latent dimension; active dims (Var_x(mu_i) > threshold) coloured."""
    d = len(kl)
    active = np.asarray(variance) > threshold
    # a quarter inch per bar up to 64 dims, then thinner bars: a 256-d latent drawn at 64 inches was unreadable
    fig, ax = plt.subplots(figsize=(min(max(6.4, 0.25 * d), 16.0), 3.8))
    for mask, colour, name in ((active, "tab:blue", "active"), (~active, "tab:gray", "inactive")):
        if mask.any():  # an empty bar group still gets a legend entry, in the wrong colour
            ax.bar(np.arange(d)[mask], np.asarray(kl)[mask], color=colour, label=f"{name} ({mask.sum()})")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("mean KL(q(z_i|x) || N(0,1)), nats")
    ax.set_title(f"KL per latent dimension ({source} test), total {sum(kl):.2f} nats", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def kl_spectra(kl_by_label: dict[str, list[float]], path: str | Path, *, source: str, floor: float = 1e-4) -> None:
    """How models of several latent sizes use their dimensions: per-dimension test KL of each model,
    sorted (left, one line per model, against the dimension's rank) and as a histogram over log10 KL
    (right, one step line per model). A collapsed dimension carries ~0 nats (clipped at ``floor`` on the
    log axis); a sweep over ``latent_dim`` shows whether added dimensions carry information or collapse.

    Args:
        kl_by_label: ``{label: mean KL(q(z_i|x) || N(0, 1)) per dimension, nats}`` (any lengths).
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.0))
    values = {k: np.maximum(np.sort(np.asarray(v, dtype=float))[::-1], floor) for k, v in kl_by_label.items()}
    top = max(float(v.max()) for v in values.values())
    bins = np.linspace(np.log10(floor), np.log10(top) + 0.1, 40)
    for label, v in values.items():
        line = left.plot(np.arange(1, len(v) + 1), v, lw=1.6, label=f"{label}: {v.sum():.1f} nats in {len(v)} dims")[0]
        right.hist(np.log10(v), bins=bins, histtype="step", lw=1.6, color=line.get_color(), label=label)
    left.set_xscale("log")
    left.set_yscale("log")
    left.set_xlabel("latent dimension, sorted by KL (rank)")
    left.set_ylabel(f"mean KL per dimension, nats (clipped at {floor:g})")
    left.set_title(f"KL spectrum ({source} test)", fontsize=10)
    left.legend(fontsize=8)
    right.set_xlabel("log10 mean KL per dimension (nats)")
    right.set_ylabel("dimensions")
    right.set_title("histogram of per-dimension KL: collapsed dimensions pile up on the left", fontsize=10)
    right.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- diffusion runs

def loss_curves(rows: list[dict], path: str | Path, *, ylabel: str) -> None:
    """One panel: train and validation loss per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train (running mean over epoch)")
    ax.plot(epochs, [r["val_loss"] for r in rows], "s-", label="validation (end of epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("training curves")
    save_figure(fig, path)


def denoising_figure(states: list[tuple[int, torch.Tensor, torch.Tensor]], path: str | Path, *, pixel_range: str, title: str) -> None:
    """Columns = timesteps; rows = the state ``x_t`` and the estimate ``x0_hat`` of one image.

    ``states`` as returned by ``DDPM.denoise(1, snapshots=K)``: ``(t, x_t, x0_hat)`` with ``(1, C, H, W)``
    tensors in ``pixel_range``.
    """
    fig, axes = plt.subplots(2, len(states), figsize=(1.3 * len(states), 3.2), squeeze=False)
    for col, (t, x_t, x0) in enumerate(states):
        for row, img in enumerate((x_t, x0)):
            a = to_unit_interval(img[0].detach().float().cpu(), pixel_range).permute(1, 2, 0).numpy()
            ax = axes[row, col]
            ax.imshow(a[..., 0] if a.shape[-1] == 1 else a, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"t={t}", fontsize=8)
    axes[0, 0].set_ylabel("x_t", fontsize=8)
    axes[1, 0].set_ylabel("x0 estimate", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# ---------------------------------------------------------------------------- comparisons


def compare_samples(grids: list[Path], labels: list[str], path: str | Path, *, columns: int = 5) -> None:
    """The sample grids of several generators side by side, one titled panel each, at most ``columns``
    panels a row (a fifteen-entry comparison in one row would make every panel too small to judge)."""
    cols = min(columns, len(grids))
    rows = -(-len(grids) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 4.3 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, grid, label in zip(axes.flat, grids, labels):
        ax.imshow(plt.imread(str(grid)), interpolation="nearest")
        ax.set_title(label, fontsize=10)
    fig.suptitle("samples (same seed for every generator)", fontsize=10)
    save_figure(fig, path)


def confidence_hist(entries: list[tuple[str, dict]], path: str | Path) -> None:
    """Evaluator max-probability histograms of several generators (and of real test images) on one plot.

    ``entries``: ``(label, confidence)`` with ``confidence`` the ``"confidence"`` dict of an
    ``eval.json`` (its ``generated`` / ``real_test`` hold ``max_prob_histogram`` counts over equal
    bins of [0, 1]).
    """
    fig, ax = plt.subplots(figsize=(7.0, 4.2))

    def step(counts: list[int], **kw) -> None:
        counts = np.asarray(counts, dtype=float)
        edges = np.linspace(0.0, 1.0, len(counts) + 1)
        ax.stairs(counts / counts.sum() / np.diff(edges), edges, **kw)

    real = entries[0][1]["real_test"]
    step(real["max_prob_histogram"], fill=True, alpha=0.25, color="gray",
         label=f"real test images (mean {real['mean_max_prob']:.3f})")
    for label, conf in entries:
        g = conf["generated"]
        step(g["max_prob_histogram"], lw=1.8, label=f"{label} (mean {g['mean_max_prob']:.3f}, n={conf['num_samples']:,})")
    threshold = real["confidence_threshold"]
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"confident: max-prob >= {threshold}")
    ax.set_xlabel("evaluator max softmax probability")
    ax.set_ylabel("density")
    ax.set_title(f"evaluator confidence on generated samples ({entries[0][1]['split']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, path)
