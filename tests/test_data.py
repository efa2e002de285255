import os

import numpy as np
import pytest
import torch
from fixtures import write_cifar_pickles, write_idx, write_image_folder, write_mnist

from vaelab.data import augment, batches, load_split, resolve_root, split_validation, to_pixels, to_uint8
from vaelab.errors import DataError


def test_idx_fixture_parses_to_tensors(tmp_path):
    truth = write_mnist(tmp_path)
    for split in ("train", "test"):
        s = load_split("mnist", split, tmp_path)
        images, labels = truth[split]
        assert s.images.dtype == torch.uint8 and s.images.shape == (len(images), 1, 28, 28)
        assert torch.equal(s.images[:, 0], torch.from_numpy(images))
        assert s.labels.dtype == torch.int64 and s.labels.tolist() == labels.tolist()
        assert s.classes[0] == "0 - zero" and s.source == "MNIST"


def test_fashion_mnist_uses_its_own_folder(tmp_path):
    write_mnist(tmp_path, folder="FashionMNIST")
    s = load_split("fashion-mnist", "train", tmp_path)
    assert s.classes[0] == "T-shirt/top" and s.shape == (1, 28, 28)


def test_cifar_pickle_fixture_parses_to_tensors(tmp_path):
    truth = write_cifar_pickles(tmp_path)
    train = load_split("cifar10", "train", tmp_path)
    data = np.concatenate([d for d, _ in truth["train"]])
    labels = sum((lbl for _, lbl in truth["train"]), [])
    assert train.images.shape == (len(data), 3, 32, 32)
    # the pickle stores each row as 1024 R, then G, then B values of a 32x32 image
    assert torch.equal(train.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == labels
    assert train.classes[3] == "cat"
    assert train.source == "CIFAR-10 pickles (not the official files: md5 differs)"  # a fixture, honestly labelled


class _RunsCode:
    """Unpickling this calls os.system: what a crafted 'CIFAR-10 batch' could do to a plain pickle.load."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_pickles_are_read_without_executing_code(tmp_path, monkeypatch):
    import pickle

    write_cifar_pickles(tmp_path)
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(pickle.dumps({"data": _RunsCode(), "labels": [0]}))
    with pytest.raises(DataError, match="data_batch_2 is not a readable CIFAR-10 pickle batch.*refusing to load global"):
        load_split("cifar10", "train", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_image_folder_fixture_parses_to_tensors(tmp_path):
    truth = write_image_folder(tmp_path)
    s = load_split("imagefolder", "test", tmp_path)
    assert s.classes == ["cat", "dog"] and s.shape == (3, 8, 8)
    for i, (arr, label) in enumerate(truth["test"]):
        assert torch.equal(s.images[i], torch.from_numpy(arr).permute(2, 0, 1))
        assert s.labels[i].item() == label


def test_gray_image_folder_has_one_channel(tmp_path):
    write_image_folder(tmp_path, channels=1)
    assert load_split("imagefolder", "train", tmp_path).shape == (1, 8, 8)


def test_cifar_jpeg_copy_is_labelled(tmp_path):
    write_image_folder(tmp_path / "cifar10-jpeg", size=32)
    s = load_split("cifar10", "train", tmp_path)
    assert s.source == "CIFAR-10 (JPEG q75 copy)" and s.shape == (3, 32, 32)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    write_mnist(tmp_path / "data")
    first = load_split("mnist", "test", tmp_path / "data")
    cached = list((tmp_path / "cache" / "datasets").glob("mnist-test-*.safetensors"))
    assert len(cached) == 1
    assert torch.equal(load_split("mnist", "test", tmp_path / "data").images, first.images)
    # rewriting the source file changes size/mtime -> new cache key, new content
    raw = tmp_path / "data" / "MNIST" / "raw"
    write_idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(raw / "t10k-labels-idx1-ubyte", np.ones(3, np.uint8))
    assert load_split("mnist", "test", tmp_path / "data").labels.tolist() == [1, 1, 1]


def test_data_root_order(tmp_path, monkeypatch):
    explicit, env = tmp_path / "explicit", tmp_path / "env"
    write_mnist(explicit)
    write_mnist(env)
    work = tmp_path / "work" / "repo"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("VAELAB_DATA", str(env))
    assert resolve_root("mnist", explicit) == explicit  # 1. --data-root
    assert resolve_root("mnist") == env  # 2. $VAELAB_DATA
    shared = tmp_path / "work" / "shared" / "datasets"
    write_mnist(shared)
    monkeypatch.delenv("VAELAB_DATA")
    assert resolve_root("mnist").resolve() == shared.resolve()  # 3. ../shared/datasets
    (tmp_path / "work" / "shared" / "datasets" / "MNIST").rename(tmp_path / "moved")
    write_mnist(work / "data")
    assert resolve_root("mnist", download=False).resolve() == (work / "data").resolve()  # 4. ./data


def test_missing_data_lists_every_path_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as err:
        resolve_root("fashion-mnist", download=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "data" in msg and "--data-root" in msg
    with pytest.raises(DataError, match="explicit"):
        resolve_root("mnist", tmp_path / "explicit")


def test_truncated_idx_is_named(tmp_path):
    write_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is corrupt or truncated"):
        load_split("mnist", "train", tmp_path)


def test_idx_with_bad_magic_is_named(tmp_path):
    write_mnist(tmp_path)
    f = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    f.write_bytes(b"\x07\x07\x07\x07" + f.read_bytes()[4:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_split("mnist", "test", tmp_path)


def test_corrupt_cifar_pickle_is_named(tmp_path):
    write_cifar_pickles(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR-10 pickle"):
        load_split("cifar10", "train", tmp_path)


def test_corrupt_image_is_named(tmp_path):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "001.png"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(DataError, match="001.png is not a readable image"):
        load_split("imagefolder", "train", tmp_path)


def test_image_folder_without_train_split(tmp_path):
    write_image_folder(tmp_path)
    (tmp_path / "train").rename(tmp_path / "training")
    with pytest.raises(DataError, match="train"):
        load_split("imagefolder", "train", tmp_path)


def test_image_folder_with_mixed_sizes(tmp_path):
    from PIL import Image

    write_image_folder(tmp_path)
    Image.new("RGB", (9, 9)).save(tmp_path / "train" / "cat" / "999.png")
    with pytest.raises(DataError, match="999.png has shape"):
        load_split("imagefolder", "train", tmp_path)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="mnist, fashion-mnist, cifar10, imagefolder"):
        load_split("svhn", "train")


def test_validation_split_is_seeded_and_disjoint(tmp_path):
    write_mnist(tmp_path, n_train=40)
    s = load_split("mnist", "train", tmp_path)
    s.images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 28, 28).clone()
    tr, va = split_validation(s, 0.1, seed=3)
    tr2, va2 = split_validation(s, 0.1, seed=3)
    assert len(va) == 4 and len(tr) == 36 and torch.equal(va.images, va2.images)
    ids = set(tr.images[:, 0, 0, 0].tolist()) | set(va.images[:, 0, 0, 0].tolist())
    assert ids == set(range(40))


def test_batches_cover_the_split_once_and_scale():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    labels = torch.arange(10)
    seen = []
    for x, y in batches(images, labels, 4, order=torch.randperm(10, generator=torch.Generator().manual_seed(0)),
                        pixel_range="[-1,1]"):
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        assert torch.equal(to_uint8(x, "[-1,1]")[:, 0, 0, 0].long(), y)
        seen += y.tolist()
    assert sorted(seen) == list(range(10))
    assert len(list(batches(images, labels, 4, drop_last=True))) == 2


def test_sharded_batches_deal_each_global_batch_out_to_the_ranks():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1)
    labels = torch.arange(11)
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    single = [y.tolist() for _, y in batches(images, labels, 4, order=order)]
    ranks = [[y.tolist() for _, y in batches(images, labels, 2, order=order, rank=r, world_size=2)] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 3  # equal step counts; the last global batch (3 images) splits 2 + 1
    for step, global_batch in enumerate(single):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(global_batch)  # the union is the single-process batch
    flips = [x for x, _ in batches(images.expand(11, 1, 1, 4).contiguous(), labels, 11, flip=True,
                                   generator=torch.Generator().manual_seed(0))][0]
    assert flips.shape == (11, 1, 1, 4)  # flips only: no crop, no padding


def test_augment_crop_and_flip_are_batched_shifts():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    assert torch.equal(augment(x, pad=0, flip=False), x)
    g = torch.Generator().manual_seed(0)
    out = augment(x, pad=2, flip=True, generator=g)
    assert out.shape == x.shape
    for i in range(2):  # every output is a shifted (and maybe mirrored) window of the padded input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)


def test_pixel_round_trip():
    u8 = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    for pr in ("[0,1]", "[-1,1]"):
        assert torch.equal(to_uint8(to_pixels(u8, pr), pr), u8)


def test_real_mnist_matches_its_documented_statistics(shared_datasets):
    s = load_split("mnist", "train", shared_datasets)
    assert s.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    x = s.images.float() / 255
    assert abs(x.mean().item() - 0.1307) < 1e-3 and abs(x.std().item() - 0.3081) < 1e-3


def test_subsets_are_a_seeded_random_draw_not_the_first_images():
    """Image folders are stored class by class: the first N images of the CIFAR-10 JPEG copy are one or
    two classes. A subset must be a random draw (seeded, the same for every run), in the split's order."""
    from vaelab.data import ImageSplit

    labels = torch.arange(10).repeat_interleave(100)  # sorted by class, like an ImageFolder
    split = ImageSplit(torch.zeros(1000, 1, 4, 4, dtype=torch.uint8), labels, [str(c) for c in range(10)], "fixture", "train")
    first, drawn = split.subset(slice(0, 200)), split.sample(200)
    assert first.labels.unique().numel() == 2 and drawn.labels.unique().numel() == 10
    assert torch.equal(drawn.labels, split.sample(200).labels)  # seeded
    assert bool((drawn.labels[1:] >= drawn.labels[:-1]).all())  # kept in the split's order
    assert split.sample(5000) is split
