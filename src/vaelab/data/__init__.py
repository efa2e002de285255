"""Datasets as uint8 tensors, found on disk, cached once, batched on the training device.

Flow: ``load_split`` (disk -> cached ``uint8`` tensor) -> ``load_run_data`` (subsets, validation
hold-out) -> ``ImageSplit.to(device)`` -> ``batches`` (random slices, batched augmentation,
``to_pixels`` scaling).

Modules: ``sources`` (where data lives, decoding, the cache), ``split`` (``ImageSplit``, validation
and binarisation), ``tensors`` (the safetensors dataset format), ``batches`` (on-device batching and
augmentation), ``pixels`` (every pixel-range conversion), ``shapes`` (a generated dSprites-like dataset
with known factors, written as a tensors dataset).
"""

from vaelab.data.batches import augment, batches, global_batches
from vaelab.data.pixels import PIXEL_RANGES, from_symmetric, from_unit_interval, to_pixels, to_symmetric, to_uint8, to_unit_interval
from vaelab.data.sources import DATASETS, DIGIT_LIKE, cache_dir, check_dataset_name, describe_roots, load_run_data, load_split, resolve_root
from vaelab.data.split import ImageSplit, RunData, binarize_split, split_validation
from vaelab.data.tensors import read_tensor_file, write_tensor_file

__all__ = [
    "DATASETS",
    "DIGIT_LIKE",
    "PIXEL_RANGES",
    "ImageSplit",
    "RunData",
    "augment",
    "batches",
    "global_batches",
    "binarize_split",
    "cache_dir",
    "check_dataset_name",
    "describe_roots",
    "from_symmetric",
    "from_unit_interval",
    "load_run_data",
    "load_split",
    "read_tensor_file",
    "resolve_root",
    "split_validation",
    "to_pixels",
    "to_symmetric",
    "to_uint8",
    "to_unit_interval",
    "write_tensor_file",
]
