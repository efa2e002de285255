"""Conditional VAE: contract, save/load, class dependence after a few steps on real MNIST, CLI."""

import pytest
import torch

from vaelab.cli import main
from vaelab.data import batches, load_split
from vaelab.errors import ConfigError
from vaelab.losses import RECON_LIKELIHOODS
from vaelab.models import PRESETS, build_config, build_model, load_model, save_model
from vaelab.models.cvae import CVAE, CVAEConfig


def _tiny(**kw) -> CVAE:
    torch.manual_seed(0)
    return CVAE(CVAEConfig(in_channels=1, image_size=8, channels=(4, 8), latent_dim=3, fc_hidden=None, num_classes=4, **kw))


@pytest.mark.parametrize("name", [n for n, (t, _) in PRESETS.items() if t == "cvae"])
def test_presets_mirror_the_unconditional_ones(name):
    shape = (3, 32, 32) if name == "cvae-cifar" else (1, 28, 28)
    config = build_config(name, data_shape=shape, num_classes=10)
    model = build_model(config)
    assert model.conditional and model.family == "vae" and config.model_type == "cvae"
    twin = {"cvae-mnist": "mnist-small", "cvae-cifar": "cifar-seed", "cvae-conv": "conv"}[name]
    assert PRESETS[name][1] == PRESETS[twin][1]
    x = torch.rand(2, *shape)
    y = torch.tensor([0, 9])
    out = model.loss(x, y=y)
    assert out.recon.shape == (2,) and out.mu.shape == (2, config.latent_dim)
    assert model.sample(3, y=torch.tensor([1, 2, 3])).shape == (3, *shape)


def test_labels_are_required_and_checked():
    model = _tiny()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="needs class labels y"):
        model.loss(x)
    with pytest.raises(ConfigError, match=r"shape \(2,\)"):
        model.loss(x, y=torch.tensor([1]))
    with pytest.raises(ConfigError, match="0..3"):
        model.sample(2, y=torch.tensor([0, 4]))
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        CVAEConfig(num_classes=0)


def test_sample_without_labels_cycles_the_classes():
    model = _tiny().eval()
    g = torch.Generator().manual_seed(0)
    a = model.sample(8, generator=g)
    b = model.sample(8, y=torch.arange(8) % 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("likelihood", RECON_LIKELIHOODS)
def test_save_load_reproduces_outputs(tmp_path, likelihood):
    pixel_range = "[0,1]" if likelihood == "bernoulli" else "[-1,1]"
    model = _tiny(recon_likelihood=likelihood, pixel_range=pixel_range).eval()
    save_model(model, tmp_path)
    back = load_model(tmp_path)
    assert isinstance(back, CVAE) and back.config == model.config
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(back.decode(z, y=y), model.decode(z, y=y))
    assert model.decode(z, y=y).shape == (4, 1, 8, 8)
    x = model.decode(z, y=y)
    assert torch.isfinite(model.loss(x, y=y).loss)


def test_output_depends_on_the_class_after_training_on_mnist(shared_datasets):
    train_split = load_split("mnist", "train", shared_datasets).subset(slice(0, 5120))  # 80 steps of 64
    torch.manual_seed(0)
    model = build_model(build_config("cvae-mnist", data_shape=(1, 28, 28), num_classes=10))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for x, y in batches(train_split.images, train_split.labels, 64, order=torch.randperm(len(train_split), generator=gen)):
        opt.zero_grad()
        model.loss(x, y=y, generator=gen).loss.backward()
        opt.step()
    model.eval()
    # the same z decoded as each class: images differ, and each class's samples look most like that class
    z = torch.randn(50, 10, generator=gen)
    with torch.no_grad():
        samples = torch.stack([model.decode(z, y=torch.full((50,), c)).mean(0) for c in range(10)])  # (10, 1, 28, 28)
    real_means = torch.stack([train_split.images[train_split.labels == c].float().mean(0) / 255 for c in range(10)])
    assert (samples[0] - samples[1]).abs().mean() > 0.03
    distance = torch.cdist(samples.flatten(1), real_means.flatten(1))  # (generated class, real class)
    assert (distance.argmin(1) == torch.arange(10)).sum() >= 8


def test_train_cli_writes_per_class_pictures(tmp_path):
    from test_synthesis import _image_folder  # the 3-class RGB image folder fixture

    data = _image_folder(tmp_path / "data", per_class=12, side=16)
    run = tmp_path / "run"
    code = main(["train", "--dataset", "imagefolder", "--data-root", str(data), "--model", "cvae-conv", "--epochs", "1",
                 "--latent-dim", "2", "--batch-size", "8", "--device", "cpu", "--out", str(run)])
    assert code == 0
    for name in ("per_class_samples.png", "samples.png", "reconstructions.png", "interpolation.png", "summary.json"):
        assert (run / name).stat().st_size > 0
    assert load_model(next((run / "checkpoints").iterdir())).config.num_classes == 3
    assert main(["sample", "--run", str(run), "--class", "bee", "--n", "4", "--out", str(tmp_path / "bee.png")]) == 0
    assert (tmp_path / "bee.png").exists()
    assert main(["sample", "--run", str(run), "--class", "7", "--n", "4", "--out", str(tmp_path / "x.png")]) == 2


def test_class_option_needs_a_conditional_run(tmp_path, capsys):
    from test_synthesis import _tiny_run

    run = _tiny_run(tmp_path)
    assert main(["sample", "--run", str(run), "--class", "0", "--out", str(tmp_path / "s.png")]) == 2
    assert "--class needs a conditional model" in capsys.readouterr().err
