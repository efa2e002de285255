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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from vaelab.errors import DataError
from vaelab.io import atomic_path

_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_PICKLES = {
    "train": [f"data_batch_{i}" for i in range(1, 6)],
    "test": ["test_batch"],
}
SPLITS = ("train", "test")


@dataclass
class ImageSplit:
    """One split of an image dataset, fully decoded.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``, pixel values 0..255.
        labels: ``int64`` tensor ``(N,)`` of class indices into ``classes``.
        classes: class names, index ``i`` names label ``i``.
        source: a human-readable description of where the pixels came from, used to label
            every number measured on them (e.g. ``"CIFAR-10 (JPEG q75 copy)"``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageSplit":
        return ImageSplit(
            self.images.to(device), self.labels.to(device), self.classes, self.source, self.name
        )

    def subset(self, index: torch.Tensor | slice) -> "ImageSplit":
        return ImageSplit(
            self.images[index], self.labels[index], self.classes, self.source, self.name
        )


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


def _read_cifar_pickles(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[Path]]:
    from torchvision.datasets import CIFAR10

    class _CIFAR10(CIFAR10):
        # torchvision checks md5 sums of the official files; the format is what matters to us,
        # so only existence is checked (md5=None) and unreadable files are named below.
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    folder = root / "cifar-10-batches-py"
    files = [folder / f for f in _CIFAR_PICKLES[split]] + [folder / "batches.meta"]
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise DataError(f"CIFAR-10 pickle folder {folder} is missing {', '.join(missing)}")
    try:
        ds = _CIFAR10(root=str(root), train=split == "train", download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    except Exception as exc:
        raise DataError(f"{_first_bad_pickle(files)} is not a readable CIFAR-10 pickle batch ({exc})") from exc
    if images.shape[1:] != (3, 32, 32) or labels.shape[0] != images.shape[0]:
        raise DataError(f"{folder}: expected (N, 32, 32, 3) uint8 data with N labels, got {tuple(ds.data.shape)}")
    return images, labels, list(ds.classes), files


def _first_bad_pickle(files: list[Path]) -> Path:
    import pickle

    for f in files:
        try:
            with open(f, "rb") as fh:
                entry = pickle.load(fh, encoding="latin1")
            if not isinstance(entry, dict):
                return f
        except Exception:
            return f
    return files[0].parent


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
        return [folder / f for f in _CIFAR_PICKLES[split]] + [folder / "batches.meta"], desc
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
        from vaelab.data.tensors import read_tensor_file

        return read_tensor_file(root / f"{split}.safetensors")
    files, source = _source_files(name, root, split)
    key = _fingerprint(name, split, files)
    cache_file = cache_dir() / "datasets" / f"{name}-{split}-{key}.safetensors"
    if use_cache and cache_file.exists():
        try:
            with safe_open(str(cache_file), framework="pt") as fh:
                meta = fh.metadata()
                images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
            return ImageSplit(images, labels, json.loads(meta["classes"]), meta["source"], name)
        except Exception:
            cache_file.unlink(missing_ok=True)  # unreadable cache: decode again below
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


def split_validation(train: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Hold out a seeded random ``fraction`` of ``train`` as a validation split.

    Returns:
        ``(train_rest, val)``; ``val`` has ``max(1, round(fraction * N))`` images.

    Raises:
        DataError: ``fraction`` outside ``(0, 1)`` or a split too small to divide.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
    n = len(train)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"cannot hold out {n_val} of {n} training images for validation")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val])
