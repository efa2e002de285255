"""CAS: train on real / synthetic / real+synthetic, test on real (a tiny real MNIST slice)."""

import json

import pytest
import torch

from vaelab.cas import cas, concat
from vaelab.cli import main
from vaelab.data import ImageSplit, load_split, write_tensor_file
from vaelab.errors import ConfigError, DataError, VaelabError

TINY = dict(train_subset=480, test_subset=300, epochs=3, recipe={"widths": (8, 16, 32), "batch_size": 32}, device="cpu")


@pytest.fixture(scope="module")
def mnist_train(shared_datasets):
    return load_split("mnist", "train", shared_datasets)


def _synthetic(folder, split: ImageSplit):
    write_tensor_file(split, folder / "train.safetensors")
    return folder


def test_cas_table_real_row_beats_chance(tmp_path, mnist_train, shared_datasets):
    # a stand-in "synthetic" set: real MNIST images outside the real slice, relabelled at random
    g = torch.Generator().manual_seed(0)
    other = mnist_train.subset(slice(10000, 10160))
    noisy = ImageSplit(other.images, torch.randint(0, 10, (160,), generator=g), other.classes, "random labels")
    report = cas(_synthetic(tmp_path / "syn", noisy), "mnist", data_root=shared_datasets, out=tmp_path / "cas", **TINY)
    rows = report["rows"]
    assert list(rows) == ["real", "synthetic", "real+synthetic"]
    assert rows["real"]["top1"] > 0.5  # chance is 0.1
    assert rows["synthetic"]["top1"] < rows["real"]["top1"]  # random labels teach nothing
    assert rows["real+synthetic"]["train_images"] == 640
    # equal optimizer steps: 3 passes over the 480 real images in batches of 32 = 45 steps for every row
    assert [r["steps"] for r in rows.values()] == [45, 45, 45]
    assert [r["images_seen"] for r in rows.values()] == [45 * 32] * 3
    assert rows["synthetic"]["epochs"] == pytest.approx(45 / 5)  # the 160-image set is cycled 9 times
    for res in rows.values():
        confusion = torch.tensor(res["confusion"])
        assert confusion.shape == (10, 10) and confusion.sum() == 300
        assert abs(confusion.diagonal().sum().item() / 300 - res["top1"]) < 1e-6
        assert res["train_time_s"] > 0
        assert res["history"][-1]["step"] == 45 and res["history"][-1]["test_accuracy"] == pytest.approx(res["top1"])
        assert len(res["history"]) >= 5
    saved = json.loads((tmp_path / "cas" / "cas.json").read_text())
    assert saved["recipe"]["epochs"] == 3 and saved["recipe"]["seed"] == 0 and saved["test_images"] == 300
    assert saved["budget"]["kind"] == "steps" and saved["budget"]["steps"] == 45
    table = (tmp_path / "cas" / "cas.md").read_text()
    assert f"| real | 480 | 45 | 3.00 | {100 * rows['real']['top1']:.2f} % |" in table and "same number of optimizer steps" in table
    for png in ("cas_confusion.png", "cas_history.png"):
        assert (tmp_path / "cas" / png).stat().st_size > 0


def test_epochs_budget_and_no_augment(tmp_path, mnist_train, shared_datasets):
    """The old budget (each row its own passes) gives a small set few steps; --no-augment is recorded."""
    syn = mnist_train.subset(slice(10000, 10160))
    report = cas(_synthetic(tmp_path / "syn", syn), "mnist", data_root=shared_datasets, out=tmp_path / "cas",
                 rows=("real", "synthetic"), budget="epochs", augment=False,
                 **{**TINY, "recipe": {**TINY["recipe"], "flip": True}})
    assert [r["steps"] for r in report["rows"].values()] == [45, 15]
    assert report["recipe"]["augment"] is False and "augmentation off" in report["table"]
    assert report["recipe"]["flip"] is False  # a recipe's flips are part of its augmentation: none were applied


def test_concat_keeps_order_and_classes(mnist_train):
    a, b = mnist_train.subset(slice(0, 3)), mnist_train.subset(slice(3, 5))
    both = concat(a, b)
    assert torch.equal(both.labels, mnist_train.labels[:5]) and both.classes == a.classes


def test_class_mismatch(tmp_path, mnist_train, shared_datasets):
    part = mnist_train.subset(slice(0, 20))
    renamed = ImageSplit(part.images, part.labels, [f"digit {i}" for i in range(10)], "renamed")
    with pytest.raises(DataError, match="synthetic classes .* do not match the real classes"):
        cas(_synthetic(tmp_path / "syn", renamed), "mnist", data_root=shared_datasets, out=tmp_path / "cas", **TINY)
    assert not (tmp_path / "cas").exists()


def test_shape_mismatch(tmp_path, mnist_train, shared_datasets):
    part = mnist_train.subset(slice(0, 20))
    rgb = ImageSplit(part.images.expand(-1, 3, -1, -1).contiguous(), part.labels, part.classes, "rgb")
    with pytest.raises(DataError, match="synthetic images are 3x28x28 .* are 1x28x28"):
        cas(_synthetic(tmp_path / "syn", rgb), "mnist", data_root=shared_datasets, out=tmp_path / "cas", **TINY)
    assert not (tmp_path / "cas").exists()


def test_bad_arguments(tmp_path, mnist_train):
    folder = _synthetic(tmp_path / "syn", mnist_train.subset(slice(0, 20)))
    with pytest.raises(ConfigError, match="unknown CAS row"):
        cas(folder, "mnist", rows=("fake",))
    with pytest.raises(ConfigError, match="epochs must be a positive integer"):
        cas(folder, "mnist", epochs=0)
    with pytest.raises(DataError, match="holds no synthetic set"):
        cas(tmp_path, "mnist")
    (folder / "cas").mkdir()
    with pytest.raises(VaelabError, match="already exists"):
        cas(folder, "mnist")


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["cas", "--synthetic", str(tmp_path), "--dataset", "mnist"]) == 2
    assert "vaelab cas: error:" in capsys.readouterr().err
