"""Datasets as uint8 tensors, found on disk, cached once, batched on the training device.

Flow: ``load_split`` (disk -> cached ``uint8`` tensor) -> ``split_validation`` ->
``ImageSplit.to(device)`` -> ``batches`` (random slices, batched augmentation, scaling).
"""

from vaelab.data.batches import augment, batches, to_pixels, to_uint8
from vaelab.data.sources import (
    DATASETS,
    ImageSplit,
    cache_dir,
    describe_roots,
    load_split,
    resolve_root,
    split_validation,
)
from vaelab.data.tensors import read_tensor_file, write_tensor_file

__all__ = [
    "DATASETS",
    "ImageSplit",
    "augment",
    "batches",
    "cache_dir",
    "describe_roots",
    "load_split",
    "read_tensor_file",
    "resolve_root",
    "split_validation",
    "to_pixels",
    "to_uint8",
    "write_tensor_file",
]
