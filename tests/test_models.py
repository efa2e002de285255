import math

import pytest
import torch

from vaelab.errors import ConfigError, VaelabError
from vaelab.models import PRESETS, build_config, build_model, load_model, preset_family, save_model

SHAPES = {"mnist-small": (1, 28, 28), "cifar-seed": (3, 32, 32), "conv": (3, 16, 16),
          "cvae-mnist": (1, 28, 28), "cvae-cifar": (3, 32, 32), "cvae-conv": (3, 16, 16), "resnet-cifar": (3, 32, 32),
          "kl-f4": (3, 32, 32)}


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if preset_family(n) == "vae"))  # DDPMs: test_ddpm.py
def test_preset_shapes(name):
    fixed = PRESETS[name][1]  # a preset that fixes no input shape takes it from the data: a small RGB one here
    shape = SHAPES.get(name) or ((fixed["in_channels"], fixed["image_size"], fixed["image_size"])
                                 if "image_size" in fixed else (3, 16, 16))
    model = build_model(build_config(name, data_shape=shape)).eval()
    x = torch.rand(3, *shape)
    y = torch.tensor([0, 1, 2])  # class labels: used by conditional models, ignored by the others
    mu, logvar = model.encode(x, y=y)
    d = math.prod(model.latent_shape)  # latent_dim; a VQ-VAE's grid of latent_dim-vectors, flattened
    assert mu.shape == logvar.shape == (3, d)
    assert model.decode(mu, y=y).shape == (3, *shape)
    out = model.loss(x, beta=1.0, y=y)
    assert out.recon.shape == out.kl.shape == out.mse.shape == (3,)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, *shape) and s.min() >= 0 and s.max() <= 1


def test_cifar_seed_is_the_seed_architecture():
    m = build_model(build_config("cifar-seed", data_shape=(3, 32, 32)))
    convs = [l for l in m.encoder if isinstance(l, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (3, 64, (4, 4), (2, 2), (1, 1)), (64, 128, (4, 4), (2, 2), (1, 1)),
        (128, 256, (4, 4), (2, 2), (1, 1)), (256, 512, (4, 4), (2, 2), (1, 1)),
    ]
    assert sum(isinstance(l, torch.nn.BatchNorm2d) for l in m.encoder) == 4
    assert (m.fc_mu.in_features, m.fc_mu.out_features) == (2048, 256)
    assert (m.fc_logvar.in_features, m.fc_logvar.out_features) == (2048, 256)
    assert m.feature_shape == (512, 2, 2)
    assert [l.out_channels for l in m.decoder if isinstance(l, torch.nn.ConvTranspose2d)] == [256, 128, 64, 3]
    assert isinstance(m.decoder[-1], torch.nn.ConvTranspose2d)  # sigmoid is applied by decode()


def test_widths_and_latent_dim_are_configurable():
    m = build_model(build_config("mnist-small", data_shape=(1, 28, 28), latent_dim=3, channels=(8, 16)))
    assert m.encode(torch.rand(2, 1, 28, 28))[0].shape == (2, 3)
    assert m.decode(torch.zeros(2, 3)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_bad_latent_dim(bad):
    with pytest.raises(ConfigError, match="latent_dim"):
        build_config("mnist-small", latent_dim=bad)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ConfigError, match=r"expects 3x32x32 images but the dataset has 1x28x28"):
        build_config("cifar-seed", data_shape=(1, 28, 28))


def test_image_too_small_for_depth():
    with pytest.raises(ConfigError, match="too small"):
        build_config("conv", data_shape=(3, 8, 8))


def test_unknown_model_and_field():
    with pytest.raises(ConfigError, match="valid models: .*cifar-seed"):
        build_config("resnet")
    with pytest.raises(ConfigError, match="no field"):
        build_config("conv", widths=(1, 2))


def test_unconditional_model_ignores_labels():
    m = build_model(build_config("mnist-small")).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    y = torch.tensor([3, 7])
    torch.testing.assert_close(m.sample(2, generator=gen()), m.sample(2, y=y, generator=gen()))
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m.encode(x)[0], m.encode(x, y=y)[0])
    assert m.loss(x, y=y, generator=gen()).loss == m.loss(x, generator=gen()).loss


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    m = build_model(build_config("mnist-small", latent_dim=4, channels=(8, 8, 16), fc_hidden=32))
    m.train()
    m.loss(torch.rand(16, 1, 28, 28))  # move BatchNorm running stats away from their init
    m.eval()
    save_model(m, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(m.encode(x)[0], loaded.encode(x)[0])
    assert torch.equal(m.decode(torch.ones(2, 4)), loaded.decode(torch.ones(2, 4)))
    assert loaded.config == m.config


def test_load_model_names_missing_file(tmp_path):
    with pytest.raises(VaelabError, match="model.safetensors is missing"):
        (tmp_path / "config.json").write_text("{}")
        load_model(tmp_path)


def test_resnet_cifar_is_residual_and_mirrors_odd_sizes():
    from vaelab.models.resnet_vae import ResidualBlock, ResNetVAE

    m = build_model(build_config("resnet-cifar", data_shape=(3, 32, 32)))
    assert isinstance(m, ResNetVAE) and m.feature_shape == (128, 4, 4) and m.config.latent_dim == 128
    assert sum(isinstance(l, ResidualBlock) for l in m.encoder) == 6 == sum(isinstance(l, ResidualBlock) for l in m.decoder)
    assert [l.stride for l in m.encoder if isinstance(l, torch.nn.Conv2d)] == [(2, 2)] * 3  # stem + 2 downsamplings
    block = ResidualBlock(4).eval()
    with torch.no_grad():
        block.body[-1].weight.zero_()
        block.body[-1].bias.zero_()
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(block(x), x)  # the identity path
    # an odd side comes back exactly (28 -> 14 -> 7 -> 3 -> 7 -> 14 -> 28), for every likelihood's channels
    for lik, out_ch in (("bernoulli", 1), ("discretized_logistic", 2), ("gaussian_calibrated", 2)):
        m = build_model(build_config("resnet-cifar", in_channels=1, image_size=28, recon_likelihood=lik,
                                     pixel_range="[0,1]")).eval()
        assert m.decode_logits(torch.zeros(2, 128)).shape == (2, out_ch, 28, 28)
        assert m.loss(torch.rand(2, 1, 28, 28)).recon.shape == (2,)


@pytest.mark.parametrize("likelihood", ["gaussian_learned", "gaussian_calibrated"])
def test_fitted_sigma_survives_save_and_load(tmp_path, likelihood):
    torch.manual_seed(0)
    m = build_model(build_config("mnist-small", latent_dim=4, channels=(8, 8, 16), fc_hidden=32,
                                 recon_likelihood=likelihood))
    m.train()
    m.loss(torch.rand(16, 1, 28, 28)).loss.backward()  # calibrated: the running sigma moves
    with torch.no_grad():
        if likelihood == "gaussian_learned":
            m.log_sigma_raw.fill_(-1.7)
    m.eval()
    save_model(m, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.decoder_log_sigma().item() == m.decoder_log_sigma().item() != pytest.approx(0.5 * math.log(0.5))
    z = torch.randn(2, 4)
    assert torch.equal(m.decode_logits(z), loaded.decode_logits(z))
