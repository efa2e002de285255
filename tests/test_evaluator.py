"""Evaluator classifiers: the model contract, save/load, accuracy bookkeeping, and real-MNIST training."""

import pytest
import torch

from vaelab.data import ImageSplit, load_split
from vaelab.errors import ConfigError, DataError
from vaelab.evaluator import RECIPES, classifier_accuracy, default_recipe, train_classifier
from vaelab.models import MODEL_TYPES, load_model, save_model
from vaelab.models.classifier import ClassifierConfig, ResNetClassifier


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16), (1, 28, 28)])
def test_classifier_shapes(shape):
    c, s, _ = shape
    model = ResNetClassifier(ClassifierConfig(c, s, 5, (4, 8))).eval()
    x = torch.rand(3, c, s, s)
    assert model(x).shape == (3, 5)
    assert model.features(x).shape == (3, model.num_features) == (3, 8)


def test_classifier_rejects_wrong_shape():
    model = ResNetClassifier(ClassifierConfig(1, 8, 3, (4, 8)))
    with pytest.raises(ConfigError, match=r"\(B, 1, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="too small"):
        ClassifierConfig(1, 4, 3, (4, 8, 16))


def test_classifier_save_load_roundtrip(tmp_path):
    assert MODEL_TYPES["classifier"] == (ClassifierConfig, ResNetClassifier)
    model = ResNetClassifier(ClassifierConfig(3, 8, 4, (4, 8))).eval()
    save_model(model, tmp_path)
    again = load_model(tmp_path)
    x = torch.rand(5, 3, 8, 8)
    torch.testing.assert_close(again(x), model(x))


def _toy_split(n: int, seed: int) -> ImageSplit:
    # class 0: dark images, class 1: bright images -> learnable in a few steps
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8) + (labels * 150).to(torch.uint8)[:, None, None, None]
    return ImageSplit(images, labels.long(), ["dark", "bright"], "toy", "toy")


def test_accuracy_bookkeeping():
    split = _toy_split(40, 0)
    model = ResNetClassifier(ClassifierConfig(1, 8, 2, (4, 8))).eval()
    acc = classifier_accuracy(model, split)
    conf = torch.tensor(acc["confusion"])
    assert conf.sum() == 40 and conf.shape == (2, 2)
    assert acc["top1"] == pytest.approx(conf.diagonal().sum().item() / 40)
    assert acc["per_class"][1] == pytest.approx(conf[1, 1].item() / conf[1].sum().item())


def test_train_classifier_toy_and_bad_input():
    train, test = _toy_split(256, 0), _toy_split(64, 1)
    model, info = train_classifier(train, epochs=3, batch_size=32, augment=False, widths=(4, 8), test=test, progress=False)
    assert info["test_accuracy"] >= 0.95 and info["train_time_s"] > 0 and info["epochs"] == 3
    with pytest.raises(ConfigError, match="epochs"):
        train_classifier(train, epochs=0, augment=False)
    bad = ImageSplit(train.images, train.labels + 5, train.classes, "toy")
    with pytest.raises(DataError, match="labels"):
        train_classifier(bad, epochs=1, augment=False)


def test_default_recipe():
    assert set(RECIPES) <= {"mnist", "fashion-mnist", "cifar10"}
    assert default_recipe("mnist")["epochs"] >= 1
    with pytest.raises(DataError, match="valid names"):
        default_recipe("imagenet")


@pytest.mark.slow
def test_evaluator_on_real_mnist_slice(shared_datasets):
    train = load_split("mnist", "train", shared_datasets).subset(slice(0, 3000))
    test = load_split("mnist", "test", shared_datasets).subset(slice(0, 1000))
    _, info = train_classifier(train, epochs=2, batch_size=100, augment=True, widths=(16, 32, 64), test=test, progress=False)
    assert info["test_accuracy"] > 0.95, info
