"""Defaults of image-folder runs derived from the images: likelihood, augmentation, network size, epoch budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vaelab.config import MAX_EPOCHS, MIN_EPOCHS, TARGET_STEPS, DataStats, TrainConfig
from vaelab.data import ImageSplit, load_split
from vaelab.families.vae import CONTINUOUS_LIKELIHOOD
from vaelab.run import Run
from vaelab.training import train


def _split(images: torch.Tensor) -> ImageSplit:
    return ImageSplit(images, torch.zeros(len(images), dtype=torch.int64), ["a"], "test images", "imagefolder")


def _binary_gray(n: int = 1300, side: int = 16) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    return _split((torch.rand(n, 1, side, side, generator=g) < 0.2).to(torch.uint8) * 255)


def _photos(n: int = 500, side: int = 32) -> ImageSplit:
    g = torch.Generator().manual_seed(0)
    return _split(torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8))


def test_data_stats():
    images = torch.tensor([0, 25, 26, 128, 229, 230, 255, 255], dtype=torch.uint8).view(2, 1, 2, 2)
    stats = DataStats.of(_split(images))
    assert (stats.channels, stats.height, stats.width, stats.num_images) == (1, 2, 2, 2)
    assert stats.near_binary == pytest.approx(5 / 8)
    assert "2 train images of 1x2x2, 62% of pixels" in stats.describe()


def test_near_binary_gray_folder_gets_bernoulli_small_network_no_flips_and_a_step_budget():
    c = TrainConfig(dataset="imagefolder", data_root="x").resolved(data=_binary_gray())
    assert c.model == "conv" and c.recon_likelihood == "bernoulli" and c.augment is False
    assert c.model_args == {"channels": [32, 64], "fc_hidden": 256} and c.latent_dim == 16
    steps = -(-1300 // 128)
    assert c.epochs == min(MAX_EPOCHS, -(-TARGET_STEPS // steps)) == 182
    assert set(c.data_defaults) == {"data", "model", "recon_likelihood", "model_args.channels", "model_args.fc_hidden",
                                    "latent_dim", "augment", "epochs"}
    assert c.data_defaults["recon_likelihood"].startswith("bernoulli: 100% of the pixels")
    assert "mirror-symmetric" in c.data_defaults["augment"]


def test_continuous_rgb_folder_gets_the_continuous_likelihood_and_keeps_the_preset_code_size():
    c = TrainConfig(dataset="imagefolder", data_root="x").resolved(data=_photos())
    assert c.recon_likelihood == CONTINUOUS_LIKELIHOOD and c.augment is False
    assert c.model_args["channels"] == [32, 64, 128] and c.latent_dim is None  # 3x32x32 > 1,024: the preset's 64
    assert c.epochs == MAX_EPOCHS  # 4 steps per epoch
    big = TrainConfig(dataset="imagefolder", data_root="x").resolved(data=_photos(n=50000, side=8))
    assert big.epochs == MIN_EPOCHS and big.model_args["channels"] == [32]


def test_what_the_user_set_is_kept_and_named_datasets_are_not_inspected():
    mine = TrainConfig(dataset="imagefolder", data_root="x", recon_likelihood="gaussian", augment=True, epochs=3,
                       latent_dim=8, model_args={"channels": [8, 16]})
    c = mine.resolved(data=_binary_gray())
    assert (c.recon_likelihood, c.augment, c.epochs, c.latent_dim) == ("gaussian", True, 3, 8)
    assert c.model_args == {"channels": [8, 16], "fc_hidden": 256}
    assert set(c.data_defaults) == {"data", "model", "model_args.fc_hidden"}
    mnist = TrainConfig(dataset="mnist").resolved(data=_binary_gray())
    assert (mnist.recon_likelihood, mnist.augment, mnist.epochs, mnist.data_defaults) == ("bernoulli", False, 10, {})
    cifar = TrainConfig(dataset="cifar10").resolved(data=_photos())
    assert (cifar.recon_likelihood, cifar.augment, cifar.epochs) == (CONTINUOUS_LIKELIHOOD, True, 10)
    # a config.yaml written by a run re-resolves to itself: nothing left to derive
    again = TrainConfig(**c.to_dict()).resolved(data=_binary_gray())
    assert again.data_defaults == {} and again.to_dict() == {**c.to_dict(), "data_defaults": {}}


def test_a_diffusion_model_on_a_folder_gets_the_generic_defaults_only():
    c = TrainConfig(dataset="imagefolder", data_root="x", model="ddpm").resolved(data=_binary_gray())
    assert c.recon_likelihood is None and c.latent_dim is None and c.model_args == {}
    assert c.augment is False and c.epochs == 182 and set(c.data_defaults) == {"data", "augment", "epochs"}


# ---------------------------------------------------------------------------- the small gray digit folder


@pytest.fixture(scope="module")
def digits16(tmp_path_factory, shared_datasets):
    """A small digit folder: 1,370 MNIST train (1,302 after the validation hold-out) and 300 test digits resized
    to 16x16 (bilinear), as an image folder of PNGs."""
    root = tmp_path_factory.mktemp("digits16")
    for split, n in (("train", 1370), ("test", 300)):
        s = load_split("mnist", split, shared_datasets)
        for i in range(n):
            folder = root / split / str(int(s.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(s.images[i, 0].numpy()).resize((16, 16), Image.BILINEAR).save(folder / f"{i:05d}.png")
    return root


def test_small_gray_digit_folder_gives_recognisable_reconstructions_with_defaults(digits16, tmp_path, capsys):
    """Defaults only, but 20 of the 182 default epochs (to stay fast): the reconstructions must be the digits,
    not grey blobs. Measured once at the full default budget (182 epochs, 2,002 steps, 45 s on one CPU core):
    test MSE 0.0169 per pixel (one z sample; 0.0130 at z = mu); see docs/samplers.md."""
    out = train(TrainConfig(dataset="imagefolder", data_root=str(digits16), epochs=20, device="cpu", tensorboard=False,
                            out=str(tmp_path / "run")))
    printed = capsys.readouterr().out
    assert "defaults derived from the data" in printed and "recon_likelihood: bernoulli" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recon_likelihood"] == "bernoulli" and saved["augment"] is False and saved["latent_dim"] == 16
    assert saved["model_args"] == {"channels": [32, 64], "fc_hidden": 256} and "epochs" not in saved["data_defaults"]
    assert TrainConfig(dataset="imagefolder", data_root=str(digits16)).resolved(data=Run(out).data().train).epochs == 182

    run = Run(out)
    model, data = run.load_model(), run.data()
    train_x = data.train.images.float().div(255).flatten(1)
    x = data.test.images.float().div(255)
    with torch.no_grad():
        recon = model.reconstruct(x)
    mse = (recon - x).pow(2).mean().item()
    blob = (x - train_x.mean(0).view(1, 1, 16, 16)).pow(2).mean().item()  # the per-pixel mean image: a grey blob

    def nearest_neighbour_accuracy(images: torch.Tensor) -> float:
        """Share of images whose nearest train image (L2) has the test image's label: is the digit recognisable?"""
        nearest = torch.cdist(images.flatten(1), train_x).argmin(1)
        return (data.train.labels[nearest] == data.test.labels).float().mean().item()

    print(f"recon MSE {mse:.4f} (blob {blob:.4f}); 1-NN accuracy of reconstructions "
          f"{nearest_neighbour_accuracy(recon):.3f} (real {nearest_neighbour_accuracy(x):.3f})")
    # measured: MSE 0.019-0.022 vs blob 0.041; 1-NN accuracy 0.59-0.69 vs 0.07 for the blob (0.88 for real digits);
    # the old defaults (fixed sigma, flips) collapse to KL 0.5 nats and MSE 0.039
    assert mse < 0.7 * blob
    assert nearest_neighbour_accuracy(recon) > 0.4
    assert nearest_neighbour_accuracy(train_x.mean(0).view(1, 1, 16, 16).expand_as(x)) < 0.2
    assert np.isfinite(mse)


def test_augment_flag_on_the_command_line():
    from vaelab.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["train", "--augment"]).augment is True and parse(["train", "--no-augment"]).augment is False
    assert parse(["train"]).augment is None  # unset: the dataset's (or the data's) default
