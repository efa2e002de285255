"""The ``tensors`` dataset type: a safetensors file per split, read through ``load_split``."""

import pytest
import torch
from safetensors.torch import save_file

from vaelab.data import ImageSplit, load_split, read_tensor_file, write_tensor_file
from vaelab.errors import DataError


def _split(n=12, shape=(3, 8, 8), classes=("cat", "dog", "emu")):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % len(classes)
    return ImageSplit(images, labels, list(classes), "planted fixture", "fixture")


def test_round_trip_through_load_split(tmp_path):
    split = _split()
    write_tensor_file(split, tmp_path / "train.safetensors")
    back = load_split("tensors", "train", data_root=tmp_path)
    assert torch.equal(back.images, split.images) and back.images.dtype == torch.uint8
    assert torch.equal(back.labels, split.labels) and back.labels.dtype == torch.int64
    assert back.classes == split.classes and back.source == "planted fixture" and back.name == "tensors"
    with pytest.raises(DataError, match="test.safetensors does not exist"):
        load_split("tensors", "test", data_root=tmp_path)


def test_needs_a_data_root():
    with pytest.raises(DataError, match="needs --data-root"):
        load_split("tensors", "train")


@pytest.mark.parametrize(
    "tensors, metadata, message",
    [
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8)}, {"classes": '["a"]'}, "lacks tensor"),
        ({"images": torch.zeros(4, 1, 8, 8), "labels": torch.zeros(4, dtype=torch.int64)}, {"classes": '["a"]'}, "must be uint8"),
        ({"images": torch.zeros(4, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)}, {"classes": '["a"]'}, "must be uint8"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(3, dtype=torch.int64)}, {"classes": '["a"]'}, "labels must be int64"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.full((4,), 2)}, {"classes": '["a", "b"]'}, "labels span 2..2"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)}, {}, "no 'classes' metadata"),
        ({"images": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)}, {"classes": "a,b"}, "not JSON"),
    ],
)
def test_bad_files_are_named(tmp_path, tensors, metadata, message):
    path = tmp_path / "train.safetensors"
    save_file(tensors, str(path), metadata=metadata or None)
    with pytest.raises(DataError, match=message) as info:
        read_tensor_file(path)
    assert str(path) in str(info.value)


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "train.safetensors"
    path.write_bytes(b"this is not a tensor file")
    with pytest.raises(DataError, match="not a readable safetensors file"):
        read_tensor_file(path)


def test_write_refuses_bad_split_and_leaves_no_file(tmp_path):
    split = _split()
    bad = ImageSplit(split.images.float(), split.labels, split.classes, "x")
    with pytest.raises(DataError, match="must be uint8"):
        write_tensor_file(bad, tmp_path / "train.safetensors")
    assert list(tmp_path.iterdir()) == []
