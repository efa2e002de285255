"""Evaluator classifiers: one small ResNet per dataset, trained on the real train split, cached.

The evaluator is the shared yardstick of the evaluation suite: its penultimate features are the
``classifier`` FID/KID feature space, its softmax gives the confidence metrics, and the same
``train_classifier`` recipe trains the classifiers of classification-accuracy-score experiments.

Recipe (airbench-style, Jordan 2024): SGD with Nesterov momentum, one-cycle learning rate (Smith &
Topin 2019), label smoothing 0.1, weight decay, batched on-device augmentation (random crop with
zero padding; horizontal flips except for digits, since a mirrored digit is another symbol). The whole
train split lives on the device as ``uint8`` and batches are ``randperm`` slices.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vaelab.data import DATASETS, ImageSplit, cache_dir, global_batches, load_split, to_pixels
from vaelab.data import augment as augment_batch
from vaelab.errors import ConfigError, DataError
from vaelab.io import DamagedFileError, read_cache, warn, write_json
from vaelab.models import load_model, save_model
from vaelab.models.classifier import ClassifierConfig, ResNetClassifier
from vaelab.runtime import Distributed, autocast, derive_seed

# bump when the training code or architecture changes; the recipe values are part of the cache key too
RECIPE_VERSION = 2  # 2: per-epoch seeded batch order (data-parallel ready)

# dataset -> training recipe and architecture of its evaluator (measured numbers in docs/evaluation.md)
RECIPES: dict[str, dict] = {
    "mnist": dict(epochs=2, batch_size=256, lr=0.1, augment=True, flip=False, widths=(32, 64, 128)),
    "fashion-mnist": dict(epochs=8, batch_size=256, lr=0.1, augment=True, flip=False, widths=(32, 64, 128)),
    "cifar10": dict(epochs=6, batch_size=256, lr=0.1, augment=True, flip=True, widths=(32, 64, 128)),
}
# any other dataset (imagefolder, synthetic sets)
DEFAULT_RECIPE = dict(epochs=10, batch_size=256, lr=0.1, augment=True, flip=None, widths=(32, 64, 128))

LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


def default_recipe(dataset: str) -> dict:
    """The training recipe of ``dataset``'s evaluator: ``epochs``, ``batch_size``, ``lr`` (peak of the
    one-cycle schedule), ``augment``, ``flip`` and the architecture's ``widths``.

    Raises:
        DataError: ``dataset`` is not a key of ``vaelab.data.DATASETS``.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    return dict(RECIPES.get(dataset, DEFAULT_RECIPE))


def _check_split(split: ImageSplit, what: str) -> None:
    if split.images.dtype != torch.uint8 or split.images.ndim != 4:
        raise DataError(f"{what} images must be uint8 (N, C, H, W), got {split.images.dtype} {tuple(split.images.shape)}")
    if len(split) == 0:
        raise DataError(f"{what} split holds no images")
    if split.labels.shape != (len(split),):
        raise DataError(f"{what} labels must be int64 (N,) with N={len(split)}, got {tuple(split.labels.shape)}")


def train_classifier(
    train: ImageSplit,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 256,
    lr: float = 0.1,
    augment: bool,
    seed: int = 0,
    device: torch.device | str = "cpu",
    test: ImageSplit | None = None,
    widths: tuple[int, ...] = (32, 64, 128),
    flip: bool | None = None,
    progress: bool = True,
    history_every: int | None = None,
    precision: str = "fp32",
    dist: Distributed | None = None,
) -> tuple[ResNetClassifier, dict]:
    """Train a ``ResNetClassifier`` from scratch on ``train`` (real or synthetic images).

    Args:
        train: ``uint8`` ``(N, C, H, W)`` images with ``int64`` labels in ``0..len(classes)-1``.
        epochs: passes over ``train`` (the budget is ``epochs * (N // global batch)`` steps), or
        steps: the budget in optimizer steps, however many passes over ``train`` that is (the
            fair budget when sets of different sizes are compared, as in CAS). Give exactly one.
        batch_size: images per SGD step and process (data-parallel: ``batch_size * world_size`` per step).
        lr: peak learning rate of the one-cycle schedule (Smith & Topin 2019).
        augment: random crop (2-px padding for 1-channel images, 4-px for RGB) and horizontal flips.
        flip: flip images left-right when augmenting; ``None``: for RGB images only (a mirrored
            digit is another symbol).
        seed: seeds the initialisation, batch order and augmentation.
        device: where the model and the whole ``uint8`` train split live during training.
        test: if given, the returned dict holds its ``test_accuracy`` (top-1, a fraction), and each
            history point its test accuracy.
        widths: the architecture's stage widths (see ``ClassifierConfig``).
        progress: show a tqdm bar.
        history_every: record a history point every this many steps (and at the end): running train
            loss and accuracy since the previous point, and ``test`` accuracy.
        precision: ``fp32`` | ``bf16`` | ``fp16`` autocast (see ``vaelab.runtime.resolve_precision``).
        dist: data-parallel context (``vaelab.runtime.distributed``); ranks share one batch order and
            average their gradients (DistributedDataParallel).

    Returns:
        ``(model, info)``: the model in eval mode on ``device``; ``info`` with ``epochs`` (passes, may
        be fractional), ``steps``, ``batch_size``, ``lr``, ``augment``, ``train_images``,
        ``images_seen``, ``train_time_s`` (wall-clock seconds of the optimisation), ``device``,
        ``precision``, ``train_source``, ``history`` and, with ``test``, ``test_accuracy``,
        ``test_source``, ``test_images``.

    Raises:
        ConfigError: not exactly one of ``epochs`` / ``steps``, or a non-positive ``epochs``, ``steps``,
            ``batch_size`` or ``lr``.
        DataError: malformed splits, or labels outside ``0..len(classes)-1``.
    """
    dist = dist or Distributed()
    if (epochs is None) == (steps is None):
        raise ConfigError(f"give exactly one of epochs and steps, got epochs={epochs!r}, steps={steps!r}")
    for name, value in (("epochs", epochs), ("steps", steps), ("batch_size", batch_size), ("history_every", history_every)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr!r}")
    _check_split(train, "train")
    num_classes = len(train.classes)
    if int(train.labels.min()) < 0 or int(train.labels.max()) >= num_classes:
        raise DataError(f"train labels must lie in 0..{num_classes - 1} (one per class name), got "
                        f"{int(train.labels.min())}..{int(train.labels.max())}")
    if test is not None:
        _check_split(test, "test")
        if test.shape != train.shape:
            raise DataError(f"test images are {test.shape} but train images are {train.shape}")
    device = torch.device(device)
    c, h, w = train.shape
    if h != w:
        raise DataError(f"the classifier needs square images, got {h}x{w}")
    torch.manual_seed(seed)
    model = ResNetClassifier(ClassifierConfig(c, h, num_classes, tuple(widths))).to(device)
    if dist.active and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=MOMENTUM, nesterov=True)
    global_batch = batch_size * dist.world_size
    steps_per_epoch = len(train) // global_batch or 1
    total = steps if steps is not None else epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.25,
                                                anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model
    images, labels = train.images.to(device), train.labels.to(device)
    pad = 2 if c == 1 else 4
    flip = c == 3 if flip is None else flip
    history, step, epoch = [], 0, 0
    sums = torch.zeros(3, device=device)  # loss * n, correct, n since the last history point (no per-step host sync)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="classifier", unit="step", leave=False, disable=not (progress and dist.main))
    while step < total:
        epoch += 1
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "epoch", epoch))
        aug_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "augment", epoch, dist.rank))
        order = torch.randperm(len(train), device=device, generator=gen)
        if len(train) < global_batch:  # a set smaller than one batch: every step sees all of it
            order = order.repeat(-(-global_batch // len(train)))
        for _, idx in global_batches(len(order), batch_size, order=order, rank=dist.rank, world_size=dist.world_size,
                                     drop_last=True, device=device):
            xb, yb = images[idx], labels[idx]
            if augment:
                xb = augment_batch(xb, pad=pad, flip=flip, generator=aug_gen)
            with autocast(device, precision):
                logits = net(to_pixels(xb))
            loss = F.cross_entropy(logits.float(), yb, label_smoothing=LABEL_SMOOTHING)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            sums += torch.stack([loss.detach() * len(yb), (logits.argmax(1) == yb).sum(), torch.tensor(float(len(yb)), device=device)])
            bar.update(1)
            if step == total or (history_every and step % history_every == 0):
                history.append(_history_point(model, sums, step, steps_per_epoch, global_batch, test, dist, device))
                sums.zero_()
                bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", acc=f"{history[-1]['train_accuracy']:.3f}")
            if step == total:
                break
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    info = {
        "epochs": total / steps_per_epoch, "steps": total, "batch_size": batch_size, "processes": dist.world_size,
        "lr": lr, "augment": augment, "flip": flip, "widths": list(widths), "train_images": len(train),
        "images_seen": total * global_batch, "train_source": train.source, "train_time_s": time.perf_counter() - t0,
        "device": str(device), "precision": precision, "seed": seed, "history": history,
    }
    model.eval()
    if test is not None:
        info.update(test_accuracy=history[-1]["test_accuracy"], test_images=len(test), test_source=test.source)
    return model, info


def _history_point(model, sums: torch.Tensor, step: int, steps_per_epoch: int, global_batch: int,
                   test: ImageSplit | None, dist: Distributed, device) -> dict:
    loss, correct, n = dist.all_reduce(sums.clone()).tolist()
    point = {"step": step, "epoch": step / steps_per_epoch, "images_seen": step * global_batch,
             "train_loss": loss / n, "train_accuracy": correct / n}
    if test is not None:
        point["test_accuracy"] = classifier_accuracy(model, test, device=device)["top1"]
        model.train()
    return point


@torch.no_grad()
def predict_logits(model: ResNetClassifier, images: torch.Tensor, *, device: torch.device | str, batch_size: int = 1000,
                   desc: str = "classifying") -> torch.Tensor:
    """Logits ``(N, K)`` float32 (on CPU) of ``uint8`` ``(N, C, H, W)`` images, in batches."""
    model.eval()
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        out.append(model(to_pixels(images[start : start + batch_size].to(device))).float().cpu())
    return torch.cat(out)


def classifier_accuracy(model: ResNetClassifier, split: ImageSplit, *, device: torch.device | str = "cpu",
                        batch_size: int = 1000) -> dict:
    """Top-1 accuracy of ``model`` on ``split``.

    Returns:
        dict with ``top1`` (fraction in [0, 1]), ``per_class`` (list of K fractions; ``None`` for a
        class without images), ``confusion`` (K x K list of counts, row = true class, column =
        predicted), ``num_images`` and ``source`` (what the images are).
    """
    _check_split(split, "evaluation")
    k = model.config.num_classes
    pred = predict_logits(model, split.images, device=device, batch_size=batch_size).argmax(1)
    true = split.labels.cpu()
    confusion = torch.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    per_class_n = confusion.sum(1)
    per_class = [(confusion[i, i] / per_class_n[i]).item() if per_class_n[i] > 0 else None for i in range(k)]
    return {
        "top1": (pred == true).float().mean().item(),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "num_images": len(split),
        "source": split.source,
    }


# ---------------------------------------------------------------------------- cached evaluators


def data_fingerprint(split: ImageSplit) -> str:
    """A short content hash of a split's pixels and labels (independent of where the files live)."""
    h = hashlib.sha1()
    h.update(json.dumps([list(split.images.shape), split.classes]).encode())
    h.update(split.images.contiguous().cpu().numpy().tobytes())
    h.update(split.labels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def recipe_key(recipe: dict) -> str:
    """A short hash of a recipe and ``RECIPE_VERSION``: another recipe gives another cached evaluator."""
    text = json.dumps({"version": RECIPE_VERSION, **{k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()}},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def evaluator_dir(dataset: str, train: ImageSplit) -> Path:
    """``cache_dir()/evaluators/<dataset>-<data fingerprint>-<recipe key>``."""
    return cache_dir() / "evaluators" / f"{dataset}-{data_fingerprint(train)}-{recipe_key(default_recipe(dataset))}"


def build_evaluator(dataset: str, *, data_root: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                    force: bool = False, dist: Distributed | None = None) -> tuple[ResNetClassifier, dict]:
    """Train ``dataset``'s evaluator with ``default_recipe`` (unless cached) and measure it.

    Evaluators always train in float32: they are the yardstick of the classifier feature space, so
    they must not depend on the hardware's precision. With ``dist`` the ranks train it together
    (rank 0 writes the cache; every rank returns the model).

    Returns:
        ``(model, info)``; ``info`` is the cached ``evaluator.json``: the recipe, ``train_time_s``,
        ``test_accuracy`` on the real test split, per-class accuracy, data sources, and ``cached``
        (True when loaded instead of trained).

    Raises:
        DataError: unknown or missing dataset.
    """
    dist = dist or Distributed()
    recipe = default_recipe(dataset)
    train = load_split(dataset, "train", data_root)
    folder = evaluator_dir(dataset, train)
    if not force and (folder / "evaluator.json").is_file():
        cached = _load_cached(folder, device)
        if cached is not None:
            return cached[0], {**cached[1], "cached": True}
    test = load_split(dataset, "test", data_root)
    if dist.main:
        print(f"training the {dataset} evaluator on {train.source} ({len(train):,} images, {recipe['epochs']} epochs, "
              f"device {device}); cached at {folder}")
    model, info = train_classifier(train, epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                                   augment=recipe["augment"], flip=recipe["flip"], widths=recipe["widths"],
                                   device=device, dist=dist)
    acc = classifier_accuracy(model, test, device=device)
    info.update(dataset=dataset, recipe_version=RECIPE_VERSION, recipe=recipe, data_fingerprint=data_fingerprint(train),
                test_accuracy=acc["top1"], test_per_class=acc["per_class"], test_images=len(test),
                test_source=test.source, classes=test.classes, split="test")
    if not dist.main:
        dist.barrier()
        return model, {**info, "cached": False}
    # write into a temp folder, then rename: a cached evaluator is complete or absent
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    write_json(tmp / "evaluator.json", info)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    dist.barrier()
    return model, {**info, "cached": False}


def _load_cached(folder: Path, device: torch.device | str) -> tuple[ResNetClassifier, dict] | None:
    """A cached evaluator, or ``None`` after a warning when a file of it is damaged (it is trained again)."""
    redo = f"training the evaluator again (it replaces {folder})"
    info = read_cache(folder / "evaluator.json", lambda p: json.loads(p.read_text()), redo=redo)
    if info is None:
        return None
    try:
        return load_model(folder, device=device, remedy=redo), info
    except DamagedFileError as exc:
        warn(str(exc))
        return None


def get_evaluator(dataset: str, *, data_root: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu") -> ResNetClassifier:
    """The evaluator classifier of ``dataset`` in eval mode on ``device``; trained on first use.

    Cached under ``vaelab.data.cache_dir()/evaluators/`` keyed by dataset, a content hash of the
    real train split and a hash of the recipe, so other data or another recipe gives a new one.

    Raises:
        DataError: unknown or missing dataset.
    """
    return build_evaluator(dataset, data_root=data_root, device=device)[0]


def describe_evaluator(info: dict) -> str:
    """One line for people: test accuracy, data, recipe and training time of an evaluator."""
    how = "loaded from the cache" if info.get("cached") else "trained"
    return (f"{info['dataset']} evaluator ({how}): test accuracy {100 * info['test_accuracy']:.2f}% on "
            f"{info['test_images']:,} {info['test_source']} test images; {info['epochs']} epochs on "
            f"{info['train_images']:,} train images in {info['train_time_s']:.0f} s on {info['device']} "
            f"(widths {info['widths']}, batch {info['batch_size']}, peak lr {info['lr']})")
