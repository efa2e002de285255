"""The ``tensors`` dataset type: one split of an image dataset as a single safetensors file.

File layout (``SPLIT.safetensors``, e.g. ``train.safetensors``):

- tensor ``images``: ``uint8`` ``(N, C, H, W)``, pixel values 0..255;
- tensor ``labels``: ``int64`` ``(N,)``, class indices into ``classes``;
- metadata ``classes``: JSON list of the class names (index ``i`` names label ``i``);
- metadata ``source``: what the pixels are (used to label every number measured on them);
- optional, for datasets with known generative factors (``vaelab.data.shapes``): tensor ``factors``
  ``int64`` ``(N, K)`` (image ``n``'s index into each factor's values), metadata ``factor_names``
  (JSON list of the ``K`` names) and ``factor_values`` (JSON object: name -> list of values).

``load_split("tensors", split, data_root=FOLDER)`` reads ``FOLDER/SPLIT.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vaelab.data.split import ImageSplit
from vaelab.errors import DataError
from vaelab.io import atomic_path


def write_tensor_file(split: ImageSplit, path: str | os.PathLike, *, factor_values: dict[str, list] | None = None) -> Path:
    """Write ``split`` (images, labels, classes, source, and its factors if it has them) as one
    safetensors file, atomically.

    Args:
        factor_values: for a split with factors, what each factor index stands for (name -> values),
            stored as metadata for people; not read back.

    Raises:
        DataError: images are not ``uint8`` ``(N, C, H, W)``, labels not ``int64`` ``(N,)``, or factors
            not ``int64`` ``(N, K)`` with ``K`` names.
    """
    _check(split.images, split.labels, split.classes, Path(path))
    _check_factors(split.factors, split.factor_names, len(split), Path(path))
    path = Path(path)
    tensors = {"images": split.images.detach().cpu().contiguous(), "labels": split.labels.detach().cpu().contiguous()}
    metadata = {"classes": json.dumps(list(split.classes)), "source": split.source}
    if split.factors is not None:
        tensors["factors"] = split.factors.detach().cpu().contiguous()
        metadata["factor_names"] = json.dumps(list(split.factor_names))
        metadata["factor_values"] = json.dumps(factor_values or {})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_tensor_file(path: str | os.PathLike) -> ImageSplit:
    """Read a file written by ``write_tensor_file`` into an ``ImageSplit`` on CPU (``name="tensors"``).

    Raises:
        DataError: the file is missing, unreadable, lacks ``images``/``labels``/``classes``, or holds
            tensors of the wrong dtype or shape, or labels outside ``0..len(classes)-1``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tensor dataset file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            missing = {"images", "labels"} - keys
            if missing:
                raise DataError(f"{path} lacks tensor(s) {', '.join(sorted(missing))}; expected images uint8 (N,C,H,W) and labels int64 (N,)")
            meta = fh.metadata() or {}
            images, labels = fh.get_tensor("images"), fh.get_tensor("labels")
            factors = fh.get_tensor("factors") if "factors" in keys else None
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable safetensors file ({exc})") from exc
    if "classes" not in meta:
        raise DataError(f"{path} has no 'classes' metadata (a JSON list of class names)")
    try:
        classes = json.loads(meta["classes"])
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: metadata 'classes' is not JSON ({exc})") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: metadata 'classes' must be a JSON list of strings, got {meta['classes'][:80]!r}")
    _check(images, labels, classes, path)
    names: tuple[str, ...] = ()
    if factors is not None:
        try:
            names = tuple(json.loads(meta.get("factor_names", "null")) or ())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: metadata 'factor_names' is not JSON ({exc})") from exc
        _check_factors(factors, names, len(images), path)
    return ImageSplit(images, labels, classes, meta.get("source", f"tensor file {path.resolve()}"), "tensors",
                      factors=factors, factor_names=names)


def _check_factors(factors: torch.Tensor | None, names, n: int, path: Path) -> None:
    if factors is None:
        return
    if factors.dtype != torch.int64 or factors.ndim != 2 or factors.shape[0] != n:
        raise DataError(f"{path}: factors must be int64 (N, K) with N={n}, got {factors.dtype} {tuple(factors.shape)}")
    if len(names) != factors.shape[1] or not all(isinstance(k, str) for k in names):
        raise DataError(f"{path}: factors have {factors.shape[1]} columns but 'factor_names' lists {len(names)} names "
                        "(expected one name per column)")
    if factors.numel() and int(factors.min()) < 0:
        raise DataError(f"{path}: factors must be indices >= 0, got {int(factors.min())}")


def _check(images: torch.Tensor, labels: torch.Tensor, classes: list[str], path: Path) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise DataError(f"{path}: images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise DataError(f"{path}: labels must be int64 (N,) with N={images.shape[0]}, got {labels.dtype} {tuple(labels.shape)}")
    if len(images) == 0:
        raise DataError(f"{path} holds no images")
    if not classes:
        raise DataError(f"{path}: the class list is empty")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= len(classes):
        raise DataError(f"{path}: labels span {lo}..{hi} but there are {len(classes)} classes (expected 0..{len(classes) - 1})")
