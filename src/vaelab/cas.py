"""Classification Accuracy Score (CAS): train on synthetic, test on real.

Ravuri & Vinyals (2019), "Classification Accuracy Score for Conditional Generative Models": train a
classifier from scratch on generated labelled images and report its top-1 accuracy on the real test
split. We train the evaluator's architecture and recipe (``vaelab.evaluator.train_classifier`` with
``default_recipe(dataset)``) three times, with the same optimizer-step budget (so the same number of
images seen, whatever the size of each set), batch size, augmentation and seed:

- ``real``: the real train split;
- ``synthetic``: the synthetic set only;
- ``real+synthetic``: both, concatenated.

Outputs (written to a temporary folder, then renamed): ``cas.json`` (every number, the recipe, the
budget and each classifier's ``history``), ``cas.md`` (the table), ``cas_confusion.png`` (row-normalised
confusion matrices on the real test split) and ``cas_history.png`` (real-test accuracy during training).
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

from vaelab.data import ImageSplit, load_split  # noqa: E402
from vaelab.errors import ConfigError, DataError, VaelabError  # noqa: E402
from vaelab.evaluator import classifier_accuracy, default_recipe, train_classifier  # noqa: E402
from vaelab.io import write_json, write_text  # noqa: E402
from vaelab.plots import save_figure  # noqa: E402
from vaelab.runtime import distributed, provenance, resolve_precision  # noqa: E402

ROWS = ("real", "synthetic", "real+synthetic")
BUDGETS = {
    "steps": "every row trains the same number of optimizer steps with the same batch size (so the same number of "
             "images seen), cycling through its own set as often as that takes",
    "epochs": "every row trains the same number of passes over its own set (a smaller set gets fewer steps)",
}


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
    steps: int | None = None,
    budget: str = "steps",
    augment: bool | None = None,
    seed: int = 0,
    device: str = "auto",
    precision: str = "auto",
    train_subset: int | None = None,
    test_subset: int | None = None,
    recipe: dict | None = None,
    rows: tuple[str, ...] = ROWS,
    history_points: int = 10,
) -> dict:
    """Train the evaluator's classifier on real / synthetic / real+synthetic and test on real.

    Args:
        synthetic_dir: a folder written by ``vaelab synth`` (or any ``train.safetensors`` /
            ``train/<class>/*`` set with the real dataset's classes and image shape).
        dataset: the real dataset (a key of ``vaelab.data.DATASETS``) giving the train and test splits.
        data_root: where the real dataset lives.
        out: folder to create for the results; default ``SYNTHETIC_DIR/cas``. Must not exist.
        epochs: classifier epochs on the real train split (default: the evaluator recipe's); with
            ``budget="steps"`` it only sets the step budget (see ``steps``).
        steps: the optimizer-step budget of every row (``budget="steps"``); default ``epochs`` passes
            over the real train split, so the real row trains exactly as before and every other row
            gets as many steps (and, the batch size being shared, as many images seen).
        budget: ``"steps"`` (equal optimizer steps for all rows, the fair comparison; default) or
            ``"epochs"`` (each row ``epochs`` passes over its own set: a small synthetic set then gets
            few steps; kept to compare with older numbers).
        augment: random crop + flip for every row (default: the recipe's; ``False`` = ``--no-augment``).
        seed: seeds initialisation, batch order and augmentation of every row.
        device, precision: where and in which precision the classifiers train (``vaelab.runtime``).
        train_subset, test_subset: N real train / test images drawn at random, seed 0 (quick runs).
        recipe: overrides of ``default_recipe(dataset)`` keys (``batch_size``, ``lr``, ``augment``, ``widths``).
        rows: which of ``ROWS`` to train.
        history_points: test accuracy recorded this many times during each row's training.

    Returns:
        The ``cas.json`` dict: ``rows`` (each with ``top1``, ``per_class``, ``confusion``,
        ``train_images``, ``steps``, ``epochs``, ``images_seen``, ``train_time_s``, ``history``), the
        shared ``recipe`` and ``budget``, the data sources and ``table``.

    Raises:
        ConfigError: non-positive epochs/steps/subsets, unknown rows, budget or recipe keys.
        DataError: missing data, or synthetic classes / image shape that differ from the real dataset's.
        VaelabError: ``out`` already exists.
    """
    synthetic_dir = Path(synthetic_dir)
    out = Path(out) if out is not None else synthetic_dir / "cas"
    bad_rows = [r for r in rows if r not in ROWS]
    if bad_rows or not rows:
        raise ConfigError(f"unknown CAS row(s) {bad_rows}; valid: {', '.join(ROWS)}")
    if budget not in BUDGETS:
        raise ConfigError(f"unknown CAS budget {budget!r}; valid: {', '.join(BUDGETS)}")
    for name, value in (("epochs", epochs), ("steps", steps), ("train_subset", train_subset),
                        ("test_subset", test_subset), ("history_points", history_points)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if steps is not None and budget != "steps":
        raise ConfigError("--steps sets an equal-steps budget; it cannot be combined with --budget epochs")
    settings = default_recipe(dataset)
    unknown = sorted(set(recipe or {}) - set(settings))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(settings)}")
    settings.update(recipe or {})
    if epochs is not None:
        settings["epochs"] = epochs
    if augment is not None:
        settings["augment"] = augment
    if not settings["augment"]:
        settings["flip"] = False  # flips are part of the augmentation: without it no image is flipped
    if out.exists():
        raise VaelabError(f"{out} already exists; choose another --out")

    synthetic = load_synthetic(synthetic_dir)
    real_train = load_split(dataset, "train", data_root)
    real_test = load_split(dataset, "test", data_root)
    check_compatible(synthetic, real_train)
    if train_subset:
        real_train = real_train.sample(train_subset)
    if test_subset:
        real_test = real_test.sample(test_subset)
    dist, dev = distributed(device)
    precision = resolve_precision(precision, dev)
    sets = {"real": real_train, "synthetic": synthetic, "real+synthetic": concat(real_train, synthetic)}
    global_batch = settings["batch_size"] * dist.world_size
    if budget == "steps" and steps is None:
        steps = settings["epochs"] * max(1, len(real_train) // global_batch)

    results = {}
    for row in rows:
        n = len(sets[row])
        row_steps = steps if budget == "steps" else settings["epochs"] * max(1, n // global_batch)
        _say(dist, f"CAS row {row!r}: training on {n:,} images ({sets[row].source}), {row_steps:,} steps "
                   f"({row_steps * global_batch / n:.2f} passes)")
        model, info = train_classifier(sets[row], steps=row_steps, batch_size=settings["batch_size"], lr=settings["lr"],
                                       augment=settings["augment"], flip=settings.get("flip"),
                                       widths=tuple(settings["widths"]), seed=seed, device=dev, test=real_test,
                                       history_every=max(1, row_steps // history_points), precision=precision, dist=dist)
        acc = classifier_accuracy(model, real_test, device=dev)
        results[row] = {"train_images": n, "train_source": sets[row].source, "steps": info["steps"],
                        "epochs": info["epochs"], "images_seen": info["images_seen"], "train_time_s": info["train_time_s"],
                        "history": info["history"], **{k: acc[k] for k in ("top1", "per_class", "confusion")}}
        _say(dist, f"CAS row {row!r}: top-1 {acc['top1']:.2%} on the real test split ({info['train_time_s']:.0f} s of training)")
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
        "recipe": {**settings, "widths": list(settings["widths"]), "seed": seed, "precision": precision},
        "budget": {"kind": budget, "definition": BUDGETS[budget], "steps": steps, "batch_size": global_batch,
                   "images_seen": steps * global_batch if steps else None},
        "rows": results,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **provenance(dev, seed),
    }
    report["table"] = markdown_table(report)
    if dist.main:
        _write(out, report)
    dist.barrier()
    return report


def _say(dist, text: str) -> None:
    if dist.main:
        print(text)


def markdown_table(report: dict) -> str:
    """The CAS table with the shared recipe and the test data stated under it."""
    r = report["recipe"]
    b = report["budget"]
    lines = ["| training set | train images | steps | passes over the set | top-1 on real test | train time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for row, res in report["rows"].items():
        lines.append(f"| {row} | {res['train_images']:,} | {res['steps']:,} | {res['epochs']:.2f} | "
                     f"{100 * res['top1']:.2f} % | {res['train_time_s']:.0f} |")
    lines += [
        "",
        f"Test: {report['test_images']:,} images of the real test split of {report['test_source']}. "
        f"Synthetic: {report['synthetic_source']}.",
        f"Budget: {b['definition']}" + (f" ({b['steps']:,} steps of {b['batch_size']} images)." if b["steps"] else "."),
        f"Classifier: ResNetClassifier widths {tuple(r['widths'])}, batch {r['batch_size']}, "
        f"SGD-Nesterov one-cycle peak lr {r['lr']}, augmentation {_augmentation(r)}, {r['precision']}, seed {r['seed']}, "
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
    fig, axes = plt.subplots(1, len(rows), figsize=(4.6 * len(rows), 4.9), squeeze=False)
    for ax, (row, res) in zip(axes[0], rows.items()):
        m = np.asarray(res["confusion"], dtype=np.float64)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        ax.set_title(f"trained on {row}\ntop-1 {100 * res['top1']:.1f} % on real test", fontsize=10)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ticks, names = range(len(classes)), [c[:14] for c in classes]
        ax.set_xticks(ticks, names, fontsize=7, rotation=90)
        ax.set_yticks(ticks, names, fontsize=7)
    fig.suptitle(f"CAS confusion matrices (row-normalised), {report['test_source']} test split", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))  # leave the suptitle its own strip
    return fig


def _history_figure(report: dict):
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row, res in report["rows"].items():
        hist = res["history"]
        ax.plot([h["step"] for h in hist], [100 * h["test_accuracy"] for h in hist], "o-", label=f"trained on {row}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("top-1 on the real test split (%)")
    ax.set_title(f"CAS: real-test accuracy during training ({report['test_source']})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
        save_figure(_history_figure(report), tmp / "cas_history.png")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
