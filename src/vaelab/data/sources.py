"""Where datasets live on disk and how each split becomes one cached ``uint8`` tensor.

Supported names (``DATASETS``):

- ``mnist``, ``fashion-mnist``: torchvision's layout, ``ROOT/MNIST/raw/*-ubyte`` and
  ``ROOT/FashionMNIST/raw/*-ubyte`` (uncompressed IDX files), read with torchvision's IDX reader.
- ``cifar10``: torchvision's pickled ``ROOT/cifar-10-batches-py/`` when present, otherwise an
  ImageFolder copy at ``ROOT/cifar10-jpeg/{train,test}/<class>/*`` (e.g. a JPEG re-encoding; its
  numbers are labelled with that source, see ``ImageSplit.source``).
- ``imagefolder``: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` read with torchvision's
  ``ImageFolder``; every image must have the size of the first one.
- ``tensors``: ``ROOT/{train,test}.safetensors`` holding ``images`` uint8 ``(N, C, H, W)`` and
  ``labels`` int64 ``(N,)``, class names and source in the metadata (see ``vaelab.data.tensors``;
  ``vaelab synth`` writes one). Read directly, not cached.

The data root is resolved in this order: the explicit ``data_root`` argument (``--data-root``),
the ``VAELAB_DATA`` environment variable, ``../shared/datasets`` if it exists, and finally
``./data`` with torchvision's ``download=True`` (needs internet).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vaelab.data.split import ImageSplit, RunData, binarize_split, split_validation
from vaelab.data.tensors import read_tensor_file
from vaelab.errors import DataError
from vaelab.io import atomic_path, read_cache

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_PICKLES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
SPLITS = ("train", "test")
# 28x28 gray digits and garments: near-binary pixels, no mirror symmetry (defaults differ from RGB photos)
DIGIT_LIKE = ("mnist", "fashion-mnist")


@dataclass(frozen=True)
class _Dataset:
    folder: str | None  # sub-folder of the data root that signals "present", None for imagefolder
    description: str
    download: Callable[[Path], None] | None


def _torchvision_download(cls_name: str) -> Callable[[Path], None]:
    def download(root: Path) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        for train in (True, False):
            cls(root=str(root), train=train, download=True)

    return download


DATASETS: dict[str, _Dataset] = {
    "mnist": _Dataset("MNIST", "MNIST", _torchvision_download("MNIST")),
    "fashion-mnist": _Dataset("FashionMNIST", "Fashion-MNIST", _torchvision_download("FashionMNIST")),
    "cifar10": _Dataset("cifar-10-batches-py", "CIFAR-10", _torchvision_download("CIFAR10")),
    "imagefolder": _Dataset(None, "ImageFolder", None),
    "tensors": _Dataset(None, "tensor file", None),
}


def check_dataset_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def cache_dir() -> Path:
    """``$VAELAB_CACHE``, else ``$XDG_CACHE_HOME/vaelab``, else ``~/.cache/vaelab``."""
    if os.environ.get("VAELAB_CACHE"):
        return Path(os.environ["VAELAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaelab"


def _present(name: str, root: Path) -> bool:
    if name in ("mnist", "fashion-mnist"):
        raw = root / DATASETS[name].folder / "raw"
        return all((raw / f).exists() for files in _MNIST_FILES.values() for f in files)
    if name == "cifar10":
        return (root / "cifar-10-batches-py").is_dir() or (root / "cifar10-jpeg" / "train").is_dir()
    if name == "tensors":
        return (root / "train.safetensors").is_file() or (root / "test.safetensors").is_file()
    return (root / "train").is_dir()


def describe_roots(data_root: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """The candidate data roots in resolution order, each with why it is a candidate."""
    if data_root is not None:
        return [(Path(data_root), "--data-root")]
    roots = []
    if os.environ.get("VAELAB_DATA"):
        roots.append((Path(os.environ["VAELAB_DATA"]), "$VAELAB_DATA"))
    shared = Path("../shared/datasets")
    if shared.is_dir():
        roots.append((shared, "../shared/datasets"))
    roots.append((Path("data"), "./data (torchvision download=True)"))
    return roots


def resolve_root(name: str, data_root: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Find the folder that holds dataset ``name``.

    Args:
        name: a key of ``DATASETS``.
        data_root: an explicit root (``--data-root``); when given, only this root is used.
        download: allow torchvision's ``download=True`` into ``./data`` as the last resort.

    Returns:
        The data root (for ``imagefolder``: the folder holding ``train/`` and ``test/``).

    Raises:
        DataError: unknown name, or the data is in none of the candidate roots; the message lists
            every path tried and how to provide the data.
    """
    check_dataset_name(name)
    spec = DATASETS[name]
    if name == "imagefolder" and data_root is None:
        raise DataError("dataset 'imagefolder' needs --data-root PATH, a folder with train/<class>/* and test/<class>/*")
    if name == "tensors" and data_root is None:
        raise DataError("dataset 'tensors' needs --data-root PATH, a folder with train.safetensors and/or test.safetensors")
    tried = []
    for root, why in describe_roots(data_root):
        if _present(name, root):
            return root
        tried.append(f"  {root.resolve()}  ({why})")
    if download and data_root is None and spec.download is not None:
        root = Path("data")
        try:
            spec.download(root)
        except Exception as exc:  # no internet, HTTP errors, ...: report below with the paths tried
            tried[-1] += f": download failed ({type(exc).__name__}: {exc})"
        else:
            if _present(name, root):
                return root
    expected = {
        "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        "fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
        "cifar10": "cifar-10-batches-py/ (torchvision pickles) or cifar10-jpeg/{train,test}/<class>/*",
        "imagefolder": "train/<class>/* and test/<class>/*",
        "tensors": "train.safetensors or test.safetensors",
    }[name]
    raise DataError(
        f"dataset {name!r} not found. Looked for {expected} in:\n"
        + "\n".join(tried)
        + "\nProvide it with --data-root PATH or the VAELAB_DATA environment variable."
    )


# --------------------------------------------------------------------------- decoding


def _read_mnist(root: Path, name: str, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Path]]:
    from torchvision.datasets import FashionMNIST, MNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    raw = root / DATASETS[name].folder / "raw"
    img_path, lbl_path = (raw / f for f in _MNIST_FILES[split])
    images = _read_idx(read_image_file, img_path, "an IDX3 uint8 image file (magic 2051)")
    labels = _read_idx(read_label_file, lbl_path, "an IDX1 uint8 label file (magic 2049)")
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {tuple(images.shape)} images but {lbl_path} holds {tuple(labels.shape)} labels; "
            "expected (N, H, W) images and (N,) labels with the same N"
        )
    classes = list((MNIST if name == "mnist" else FashionMNIST).classes)
    return images.unsqueeze(1).contiguous(), labels.long(), classes, [img_path, lbl_path]


def _read_idx(reader: Callable, path: Path, what: str) -> torch.Tensor:
    try:
        return reader(str(path))
    except Exception as exc:  # torchvision asserts on truncation and bad magic numbers
        detail = str(exc) or type(exc).__name__
        raise DataError(f"{path} is corrupt or truncated; expected {what} ({detail})") from exc


# The only globals a CIFAR-10 batch file needs: numpy arrays. Anything else (os.system, ...) is refused,
# so a crafted file cannot run code when it is unpickled (pickle.load would execute it).
_SAFE_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (a CIFAR-10 batch holds only "
                                         "dicts, lists, strings and numpy arrays)")
        import importlib
        import warnings

        with warnings.catch_warnings():  # numpy 2 renamed numpy.core; the old name still resolves
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(importlib.import_module(module), name)


def _load_pickle(path: Path) -> dict:
    """One CIFAR-10 batch file, unpickled without executing code (see ``_ArrayOnlyUnpickler``).

    Raises:
        DataError: unreadable, not a dict, or asking for anything but numpy arrays.
    """
    try:
        with open(path, "rb") as fh:
            entry = _ArrayOnlyUnpickler(fh, encoding="latin1").load()
    except Exception as exc:
        raise DataError(f"{path} is not a readable CIFAR-10 pickle batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a readable CIFAR-10 pickle batch (holds a {type(entry).__name__}, expected a dict)")
    return entry


def _cifar_md5_ok(files: list[Path]) -> bool:
    """Whether every batch file has the md5 of the official CIFAR-10 release (torchvision's list)."""
    from torchvision.datasets import CIFAR10

    known = dict(CIFAR10.train_list + CIFAR10.test_list)
    known[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return all(hashlib.md5(f.read_bytes()).hexdigest() == known.get(f.name) for f in files)


def _read_cifar_pickles(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Path]]:
    """torchvision's ``cifar-10-batches-py`` layout, read without executing pickle code."""
    import numpy as np

    folder = root / "cifar-10-batches-py"
    files = [folder / f for f in _CIFAR_PICKLES[split]] + [folder / "batches.meta"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"CIFAR-10 pickle folder {folder} is missing {', '.join(missing)}")
    data, labels = [], []
    for f in files[:-1]:
        entry = _load_pickle(f)
        try:
            arr = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            lab = list(entry.get("labels", entry.get("fine_labels")))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{f}: expected 'data' uint8 (N, 3072) and 'labels' (N,), got keys {sorted(entry)} ({exc})") from exc
        if len(lab) != len(arr):
            raise DataError(f"{f}: {len(arr)} images but {len(lab)} labels")
        data.append(arr)
        labels += lab
    meta = _load_pickle(files[-1])
    if "label_names" not in meta:
        raise DataError(f"{files[-1]}: no 'label_names' entry (keys {sorted(meta)})")
    images = torch.from_numpy(np.concatenate(data)).contiguous()
    return images, torch.as_tensor(labels, dtype=torch.int64), [str(c) for c in meta["label_names"]], files


def _read_image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Path]]:
    import numpy as np
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist; expected {folder}/<class>/<image files>")
    try:
        ds = ImageFolder(str(folder), loader=lambda p: p)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"image folder {folder}: {exc}") from exc
    paths = [Path(p) for p, _ in ds.samples]

    def decode(path: Path, mode: str | None) -> np.ndarray:
        # decoded once per dataset version (then cached), so PIL's per-image cost is paid once
        try:
            with Image.open(path) as img:
                if mode is None:
                    mode = "L" if img.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
                arr = np.array(img.convert(mode))
        except Exception as exc:
            raise DataError(f"{path} is not a readable image ({exc})") from exc
        return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)

    first = decode(paths[0], None)
    mode = "L" if first.shape[0] == 1 else "RGB"
    images = torch.empty((len(paths), *first.shape), dtype=torch.uint8)
    for i, path in enumerate(tqdm(paths, desc=f"decoding {folder}", unit="img", leave=False)):
        img = decode(path, mode)
        if img.shape != first.shape:
            raise DataError(
                f"{path} has shape {tuple(img.shape)} but {paths[0]} has {tuple(first.shape)}; "
                "all images of an image folder must have one size (C, H, W)"
            )
        images[i] = torch.from_numpy(img)
    labels = torch.as_tensor([t for _, t in ds.samples], dtype=torch.int64)
    return images, labels, list(ds.classes), paths


def _fingerprint(name: str, split: str, files: list[Path]) -> str:
    h = hashlib.sha1(json.dumps([name, split]).encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _source_files(name: str, root: Path, split: str) -> tuple[list[Path], str]:
    """The files a split is decoded from, and how they are described in results."""
    desc = DATASETS[name].description
    if name in ("mnist", "fashion-mnist"):
        raw = root / DATASETS[name].folder / "raw"
        return [raw / f for f in _MNIST_FILES[split]], desc
    if name == "cifar10" and (root / "cifar-10-batches-py").is_dir():
        folder = root / "cifar-10-batches-py"
        files = [folder / f for f in _CIFAR_PICKLES[split]] + [folder / "batches.meta"]
        if all(f.exists() for f in files) and not _cifar_md5_ok(files):
            desc = "CIFAR-10 pickles (not the official files: md5 differs)"
        return files, desc
    folder = (root / "cifar10-jpeg" if name == "cifar10" else root) / split
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; an image folder dataset needs {root}/{{train,test}}/<class>/*")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if name == "cifar10":
        desc = "CIFAR-10 (JPEG q75 copy)"
    else:
        desc = f"ImageFolder {root.resolve()}"
    return files, desc


def load_split(name: str, split: str, data_root: str | os.PathLike | None = None, *, use_cache: bool = True) -> ImageSplit:
    """Decode one split of a dataset into memory, through the on-disk cache.

    Args:
        name: a key of ``DATASETS``.
        split: ``"train"`` or ``"test"``.
        data_root: explicit data root (see ``resolve_root``).
        use_cache: read/write the decoded tensors under ``cache_dir()/datasets``. The cache key
            holds the dataset, the split, and every source file's path, size and mtime, so editing
            the data invalidates it.

    Returns:
        ``ImageSplit`` with ``uint8`` images ``(N, C, H, W)`` and ``int64`` labels ``(N,)``, on CPU.

    Raises:
        DataError: unknown dataset or split, data not found, or a corrupt/truncated file (named).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = resolve_root(name, data_root)
    if name == "tensors":
        return read_tensor_file(root / f"{split}.safetensors")
    files, source = _source_files(name, root, split)
    key = _fingerprint(name, split, files)
    cache_file = cache_dir() / "datasets" / f"{name}-{split}-{key}.safetensors"
    if use_cache and cache_file.exists():
        cached = read_cache(cache_file, lambda p: _read_cached_split(p, name), redo="decoding the dataset again")
        if cached is not None:
            return cached
    if name in ("mnist", "fashion-mnist"):
        images, labels, classes, _ = _read_mnist(root, name, split)
    elif name == "cifar10" and (root / "cifar-10-batches-py").is_dir():
        images, labels, classes, _ = _read_cifar_pickles(root, split)
    else:
        images, labels, classes, _ = _read_image_folder((root / "cifar10-jpeg" if name == "cifar10" else root) / split)
    if len(images) == 0:
        raise DataError(f"{name} {split} split under {root} holds no images")
    if use_cache:
        with atomic_path(cache_file) as tmp:
            save_file(
                {"images": images.contiguous(), "labels": labels.contiguous()},
                str(tmp),
                metadata={"classes": json.dumps(classes), "source": source},
            )
    return ImageSplit(images, labels, classes, source, name)


def _read_cached_split(path: Path, name: str) -> ImageSplit:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
    return ImageSplit(images, labels, json.loads(meta["classes"]), meta["source"], name)


def load_run_data(
    dataset: str,
    data_root: str | os.PathLike | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    binarize: bool = False,
) -> RunData:
    """Train/val/test splits of a run on CPU: ``train_subset`` / ``test_subset`` images drawn at random
    (seed 0, the same for every run, see ``ImageSplit.sample``),
    a seeded ``val_fraction`` of train held out, and with ``binarize`` the validation and test
    images binarised once with ``seed`` (see ``binarize_split``).

    Raises:
        DataError: missing or corrupt data, or train and test splits of different shapes or classes.
    """
    train = load_split(dataset, "train", data_root)
    test = load_split(dataset, "test", data_root)
    if train.shape != test.shape:
        raise DataError(f"{dataset}: train images are {train.shape} but test images are {test.shape}")
    if train.classes != test.classes:
        raise DataError(f"{dataset}: train classes {train.classes} differ from test classes {test.classes}")
    if train_subset:
        train = train.sample(train_subset)
    if test_subset:
        test = test.sample(test_subset)
    train, val = split_validation(train, val_fraction, seed)
    if binarize:
        val, test = binarize_split(val, seed), binarize_split(test, seed)
    return RunData(train, val, test)
