"""Writers for tiny datasets in the exact on-disk formats vaelab reads."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (LeCun's MNIST format): magic 0x0000 0x08 ndim, big-endian int32 dims, uint8 data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[split] = (images, labels)
    return out


def write_cifar_pickles(root: Path, per_batch: int = 4, seed: int = 0) -> dict:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta (python pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": [b"x.png"] * per_batch}, fh)
        out["test" if name == "test_batch" else "train"].append((data, labels))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, fh)
    return out


def save_png(img, path) -> None:
    """A ``uint8`` ``(C, H, W)`` tensor (C = 1 or 3) as a PNG file, written with PIL."""
    from PIL import Image

    arr = img.permute(1, 2, 0).numpy()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)


def load_image(path):
    """An image file as a ``uint8`` ``(C, H, W)`` tensor (RGB), read with PIL."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def write_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3, size: int = 8, channels: int = 3, seed: int = 0) -> dict:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        items = []
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, channels) if channels == 3 else (size, size), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / name / f"{i:03d}.png")
                items.append((arr, c))
        out[split] = items
    return out


def fake_run(folder: Path, dataset: str, model_name: str, **model_fields):
    """A run folder with an untrained model of preset ``model_name`` saved as its epoch-1 checkpoint."""
    import torch

    from vaelab.config import TrainConfig
    from vaelab.models import build_config, build_model
    from vaelab.run import Run

    torch.manual_seed(0)
    model = build_model(build_config(model_name, **model_fields))
    config = TrainConfig(dataset=dataset, model=model_name, out=str(folder)).resolved()
    run = Run.create(config)
    run.save_checkpoint(1, model, {"epoch": 1})
    return folder
