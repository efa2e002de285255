"""Classification Accuracy Score (CAS): train on synthetic, test on real.

Ravuri & Vinyals (2019), "Classification Accuracy Score for Conditional Generative Models": train a
classifier from scratch on generated labelled images and report its top-1 accuracy on the real test
split. We train the evaluator's architecture and recipe (``vaelab.evaluator.train_classifier`` with
``default_recipe(dataset)``) three times, with the same epochs, augmentation and seed:

- ``real``: the real train split;
- ``synthetic``: the synthetic set only;
- ``real+synthetic``: both, concatenated.

Outputs (written to a temporary folder, then renamed): ``cas.json`` (every number and the recipe),
``cas.md`` (the table) and ``cas_confusion.png`` (row-normalised confusion matrices on the real test split).
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import vaelab  # noqa: E402
from vaelab.data import ImageSplit, load_split  # noqa: E402
from vaelab.errors import ConfigError, DataError, VaelabError  # noqa: E402
from vaelab.evaluator import classifier_accuracy, default_recipe, train_classifier  # noqa: E402
from vaelab.io import git_sha, write_json, write_text  # noqa: E402
from vaelab.plots import save_figure  # noqa: E402
from vaelab.runtime import select_device  # noqa: E402

ROWS = ("real", "synthetic", "real+synthetic")


def load_synthetic(folder: str | os.PathLike) -> ImageSplit:
    """The train split of a synthetic set: ``FOLDER/train.safetensors`` if present, else the
    ImageFolder ``FOLDER/train/<class>/*``.

    Raises:
        DataError: neither exists.
    """
    folder = Path(folder)
    if (folder / "train.safetensors").is_file():
        return load_split("tensors", "train", data_root=folder)
    if (folder / "train").is_dir():
        return load_split("imagefolder", "train", data_root=folder)
    raise DataError(f"{folder} holds no synthetic set: expected {folder}/train.safetensors or {folder}/train/<class>/*")


def check_compatible(synthetic: ImageSplit, real: ImageSplit) -> None:
    """Same class names in the same order, and the same image shape.

    Raises:
        DataError: naming both class lists or both shapes.
    """
    if synthetic.classes != real.classes:
        raise DataError(f"the synthetic classes {synthetic.classes} do not match the real classes {real.classes} "
                        f"of {real.source}; CAS needs the same class names in the same label order")
    if synthetic.shape != real.shape:
        raise DataError(f"synthetic images are {'x'.join(map(str, synthetic.shape))} (C x H x W) but the real images of "
                        f"{real.source} are {'x'.join(map(str, real.shape))}")


def concat(a: ImageSplit, b: ImageSplit) -> ImageSplit:
    """Two splits with the same classes as one (``a`` first)."""
    return ImageSplit(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), a.classes,
                      f"{a.source} + {b.source}", "combined")


def cas(
    synthetic_dir: str | os.PathLike,
    dataset: str,
    *,
    data_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    seed: int = 0,
    device: str = "auto",
    train_subset: int | None = None,
    test_subset: int | None = None,
    recipe: dict | None = None,
    rows: tuple[str, ...] = ROWS,
) -> dict:
    """Train the evaluator's classifier on real / synthetic / real+synthetic and test on real.

    Args:
        synthetic_dir: a folder written by ``vaelab synth`` (or any ``train.safetensors`` /
            ``train/<class>/*`` set with the real dataset's classes and image shape).
        dataset: the real dataset (a key of ``vaelab.data.DATASETS``) giving the train and test splits.
        data_root: where the real dataset lives.
        out: folder to create for the results; default ``SYNTHETIC_DIR/cas``. Must not exist.
        epochs: classifier epochs for every row (default: the evaluator recipe's).
        seed: seeds initialisation, batch order and augmentation of every row.
        train_subset, test_subset: use the first N real train / test images (quick runs).
        recipe: overrides of ``default_recipe(dataset)`` keys (``batch_size``, ``lr``, ``augment``, ``widths``).
        rows: which of ``ROWS`` to train.

    Returns:
        The ``cas.json`` dict: ``rows`` (each with ``top1``, ``per_class``, ``confusion``,
        ``train_images``, ``train_time_s``), the shared ``recipe``, the data sources and ``table``.

    Raises:
        ConfigError: non-positive epochs/subsets, unknown rows or recipe keys.
        DataError: missing data, or synthetic classes / image shape that differ from the real dataset's.
        VaelabError: ``out`` already exists.
    """
    synthetic_dir = Path(synthetic_dir)
    out = Path(out) if out is not None else synthetic_dir / "cas"
    bad_rows = [r for r in rows if r not in ROWS]
    if bad_rows or not rows:
        raise ConfigError(f"unknown CAS row(s) {bad_rows}; valid: {', '.join(ROWS)}")
    for name, value in (("epochs", epochs), ("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    settings = default_recipe(dataset)
    unknown = sorted(set(recipe or {}) - set(settings))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(settings)}")
    settings.update(recipe or {})
    if epochs is not None:
        settings["epochs"] = epochs
    if out.exists():
        raise VaelabError(f"{out} already exists; choose another --out")

    synthetic = load_synthetic(synthetic_dir)
    real_train = load_split(dataset, "train", data_root)
    real_test = load_split(dataset, "test", data_root)
    check_compatible(synthetic, real_train)
    if train_subset:
        real_train = real_train.subset(slice(0, train_subset))
    if test_subset:
        real_test = real_test.subset(slice(0, test_subset))
    dev = select_device(device)
    sets = {"real": real_train, "synthetic": synthetic, "real+synthetic": concat(real_train, synthetic)}

    results = {}
    for row in rows:
        print(f"CAS row {row!r}: training on {len(sets[row]):,} images ({sets[row].source}), {settings['epochs']} epochs")
        model, info = train_classifier(sets[row], epochs=settings["epochs"], batch_size=settings["batch_size"],
                                       lr=settings["lr"], augment=settings["augment"], flip=settings.get("flip"),
                                       widths=tuple(settings["widths"]), seed=seed, device=dev)
        acc = classifier_accuracy(model, real_test, device=dev)
        results[row] = {"train_images": len(sets[row]), "train_source": sets[row].source,
                        "train_time_s": info["train_time_s"], **{k: acc[k] for k in ("top1", "per_class", "confusion")}}
        print(f"CAS row {row!r}: top-1 {acc['top1']:.2%} on the real test split ({info['train_time_s']:.0f} s of training)")
    report = {
        "metric": "CAS (Ravuri & Vinyals 2019): top-1 accuracy on the real test split of a classifier trained from scratch",
        "dataset": dataset,
        "test_source": real_test.source,
        "test_images": len(real_test),
        "real_train_images": len(real_train),
        "synthetic_dir": str(synthetic_dir.resolve()),
        "synthetic_source": synthetic.source,
        "synthetic_images": len(synthetic),
        "classes": real_test.classes,
        "classifier": "ResNetClassifier (the evaluator's architecture), trained with vaelab.evaluator.train_classifier",
        "recipe": {**settings, "widths": list(settings["widths"]), "seed": seed},
        "device": str(dev),
        "rows": results,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "vaelab_version": vaelab.__version__,
        "git_sha": git_sha(),
    }
    report["table"] = markdown_table(report)
    _write(out, report)
    return report


def markdown_table(report: dict) -> str:
    """The CAS table with the shared recipe and the test data stated under it."""
    r = report["recipe"]
    lines = ["| training set | train images | top-1 on real test | train time (s) |", "|---|---:|---:|---:|"]
    for row, res in report["rows"].items():
        lines.append(f"| {row} | {res['train_images']:,} | {100 * res['top1']:.2f} % | {res['train_time_s']:.0f} |")
    lines += [
        "",
        f"Test: {report['test_images']:,} images of the real test split of {report['test_source']}. "
        f"Synthetic: {report['synthetic_source']}.",
        f"Classifier: ResNetClassifier widths {tuple(r['widths'])}, {r['epochs']} epoch{'s' if r['epochs'] != 1 else ''}, "
        f"batch {r['batch_size']}, "
        f"SGD-Nesterov one-cycle peak lr {r['lr']}, augmentation {_augmentation(r)}, seed {r['seed']}, "
        f"identical for every row; device {report['device']}.",
    ]
    return "\n".join(lines) + "\n"


def _augmentation(recipe: dict) -> str:
    if not recipe["augment"]:
        return "off"
    flip = recipe.get("flip")
    return "random crop" + {True: " + horizontal flip", False: " (no flip)"}.get(flip, " (+ flip for RGB)")


def _confusion_figure(report: dict):
    rows = report["rows"]
    classes = report["classes"]
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4.4), squeeze=False)
    for ax, (row, res) in zip(axes[0], rows.items()):
        m = np.asarray(res["confusion"], dtype=np.float64)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"trained on {row}\ntop-1 {100 * res['top1']:.1f} % on real test", fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ticks = range(len(classes))
        ax.set_xticks(ticks, [str(i) for i in ticks], fontsize=7)
        ax.set_yticks(ticks, [c[:14] for c in classes], fontsize=7)
    fig.suptitle(f"CAS confusion matrices (row-normalised), {report['test_source']} test split", fontsize=11)
    fig.tight_layout()
    return fig


def _write(out: Path, report: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write_json(tmp / "cas.json", report)
        write_text(tmp / "cas.md", report["table"])
        save_figure(_confusion_figure(report), tmp / "cas_confusion.png")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
