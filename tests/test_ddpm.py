"""DDPM baseline: forward process, training signal, samplers, weights, training-loop integration."""

from __future__ import annotations

import json

import pytest
import torch

from fixtures import fake_run

from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.data import batches, load_split
from vaelab.errors import ConfigError
from vaelab.generation import sample_run
from vaelab.models import MODEL_TYPES, PRESETS, build_config, build_model, load_model, preset_family, save_model
from vaelab.models.ddpm import DDPM, DDPMConfig
from vaelab.models.diffusion import make_scheduler
from vaelab.run import Run
from vaelab.training import resume, train

TINY = dict(widths=(8, 16), layers_per_block=1, norm_num_groups=4)


def tiny(**overrides) -> DDPM:
    torch.manual_seed(0)
    return DDPM(DDPMConfig(**{"in_channels": 1, "image_size": 8, **TINY, **overrides}))


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


SHAPES = {"ddpm-28": (1, 28, 28), "ddpm-32": (3, 32, 32), "ddpm": (3, 12, 12)}


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if preset_family(n) == "ddpm"))
def test_presets_build_and_denoise_their_shape(name):
    shape = SHAPES.get(name)
    if shape is None:
        pytest.fail(f"add an input shape for new preset {name!r} to SHAPES")
    model = build_model(build_config(name, data_shape=shape, **TINY, num_train_timesteps=4)).eval()
    out = model.loss(torch.rand(2, *shape))
    assert out.eps_mse.shape == (2,) and torch.isfinite(out.loss)
    assert model.sample(2, sampler="ddim", steps=2).shape == (2, *shape)


def test_presets_are_registered_and_build():
    assert MODEL_TYPES["ddpm"] == (DDPMConfig, DDPM)
    for name in ("ddpm-28", "ddpm-32"):
        config = build_config(name, **TINY)
        assert config.model_type == "ddpm" and build_model(config).family == "ddpm"
    assert PRESETS["ddpm-28"][1]["image_size"] == 28 and PRESETS["ddpm-32"][1]["in_channels"] == 3
    attn = [type(b).__name__ for b in build_model(build_config("ddpm-28", **TINY)).unet.down_blocks]
    assert attn == ["DownBlock2D", "AttnDownBlock2D"]  # attention at the lowest resolution only


def test_forward_noising_matches_closed_form():
    """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), abar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, eq. 4)."""
    model = tiny()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    eps = torch.randn(6, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = model.noise_scheduler.add_noise(x0, eps, t)
    a = abar[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    torch.testing.assert_close(x_t.double(), expected, atol=1e-5, rtol=1e-5)
    # moments over many noise draws at one timestep
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x_t = model.noise_scheduler.add_noise(x0, torch.randn(x0.shape, generator=gen), torch.full((20000,), 300))
    assert abs(x_t.mean().item() - abar[300].sqrt().item() * 0.7) < 0.02
    assert abs(x_t.var().item() - (1 - abar[300]).item()) < 0.03


def test_loss_uses_the_forward_process_it_claims():
    """A UNet that inverts x_t = sqrt(abar) x0 + sqrt(1-abar) eps exactly has zero loss; one that predicts 0 has ~1."""
    model = tiny()
    x = torch.rand(16, 1, 8, 8)
    abar = model.noise_scheduler.alphas_cumprod

    class Oracle(torch.nn.Module):
        def forward(self, x_t, t, class_labels=None):
            a = abar[t].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x_t - a.sqrt() * (x * 2 - 1)) / (1 - a).sqrt()})()

    class Zero(torch.nn.Module):
        def forward(self, x_t, t, class_labels=None):
            return type("Out", (), {"sample": torch.zeros_like(x_t)})()

    model.unet = Oracle()
    assert model.loss(x, generator=torch.Generator().manual_seed(1)).loss.item() < 1e-6
    model.unet = Zero()
    out = model.loss(x, generator=torch.Generator().manual_seed(1))
    assert out.eps_mse.shape == (16,) and out.t.shape == (16,)
    assert 0.8 < out.loss.item() < 1.2  # E[eps^2] = 1


@pytest.fixture(scope="module")
def mnist_slice(shared_datasets):
    return load_split("mnist", "train", shared_datasets).subset(slice(0, 512))


def test_a_few_training_steps_on_real_mnist_lower_the_loss(mnist_slice):
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(**TINY))  # 1x28x28, T = 1000
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x_eval = batches(mnist_slice.images[:256], mnist_slice.labels[:256], 256).__next__()[0]

    def eval_loss() -> float:
        with torch.no_grad():
            return model.loss(x_eval, generator=torch.Generator().manual_seed(123)).loss.item()

    before = eval_loss()
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for x, _y in batches(mnist_slice.images, mnist_slice.labels, 64, order=torch.randperm(len(mnist_slice), generator=gen)):
            out = model.loss(x, generator=gen)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            model.update_ema()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
    assert int(model.ema_updates) == 16
    # the EMA has moved away from the initial weights, towards the trained ones
    p0, p_ema, p = (next(m.parameters()) for m in (tiny(image_size=28).unet, model.ema_unet, model.unet))
    assert not torch.equal(p_ema, p) and not torch.equal(p_ema, p0)


@pytest.mark.parametrize("sampler, steps", [("ddim", 1), ("ddim", 7), ("ddim", 50), ("dpmsolver++", 7), ("dpmsolver++", 20),
                                            ("sde-dpmsolver++", 7)])
def test_short_samplers_call_the_unet_exactly_s_times(sampler, steps):
    model = tiny().eval()
    calls = count_calls(model.ema_unet)
    images = model.sample(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    assert calls[0] == steps
    assert images.shape == (3, 1, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_ddpm_sampler_runs_all_t_steps_and_chunks_batches():
    model = tiny(num_train_timesteps=20).eval()
    calls = count_calls(model.ema_unet)
    assert model.sample(5, batch_size=2).shape == (5, 1, 8, 8)
    assert calls[0] == 3 * 20  # three chunks of the full 20-step chain
    images, states = model.denoise(1, snapshots=11, generator=torch.Generator().manual_seed(0))
    assert [t for t, _, _ in states][0] == 19 and states[-1][0] == 0 and len(states) == 11


@pytest.mark.parametrize("sampler, stochastic", [("ddpm", True), ("ddim", False), ("dpmsolver++", False),
                                                  ("sde-dpmsolver++", True)])
def test_only_the_stochastic_steps_draw_fresh_noise(sampler, stochastic):
    """The same state x_t and noise estimate stepped with two different generators: the ancestral DDPM step
    adds fresh noise (sigma_t > 0, Ho et al. 2020 alg. 2) and so does the SDE solver, DDIM with eta = 0 and
    DPM-Solver++ (the ODE) are deterministic."""
    model = tiny(num_train_timesteps=50).eval()
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), torch.randn(2, 1, 8, 8, generator=g)
    outs = []
    for seed in (1, 2):
        scheduler = model.make_scheduler(sampler, 10)
        t = scheduler.timesteps[0]
        outs.append(scheduler.step(eps, t, x_t, generator=torch.Generator().manual_seed(seed)).prev_sample)
    assert torch.equal(outs[0], outs[1]) != stochastic


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"])
def test_every_pixel_sampler_clips_the_predicted_x0(sampler):
    """Pixel samplers clip the predicted x_0 to [-1, 1] at every step; latent samplers do not. DDPM's posterior
    mean and DPM-Solver++'s update (diffusers' thresholding with sample_max_value 1) depend on the noise
    estimate only through x_0: a step from an estimate whose x_0 lies far outside equals the step from the
    estimate whose x_0 is the clipped one. DDIM clips x_0 and keeps the model's estimate for its direction
    term, as diffusers' DDIMPipeline does: its pred_original_sample is the clipped one."""
    model = tiny(num_train_timesteps=50).eval()
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(2, 1, 8, 8, generator=g), 3 * torch.randn(2, 1, 8, 8, generator=g)

    def step(e, clip):
        scheduler = make_scheduler(sampler, 10, num_train_timesteps=50, beta_start=1e-4, beta_end=0.02, clip_sample=clip)
        return scheduler, scheduler.step(e, scheduler.timesteps[0], x_t, generator=torch.Generator().manual_seed(1))

    scheduler, _ = step(eps, True)
    a = scheduler.alphas_cumprod[scheduler.timesteps[0]]
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    assert x0.abs().max() > 2
    eps_clipped = (x_t - a.sqrt() * x0.clamp(-1, 1)) / (1 - a).sqrt()
    for clip in (True, False):
        if sampler == "ddim":
            torch.testing.assert_close(step(eps, clip)[1].pred_original_sample, x0.clamp(-1, 1) if clip else x0)
        else:
            same = torch.allclose(step(eps, clip)[1].prev_sample, step(eps_clipped, clip)[1].prev_sample, atol=1e-5)
            assert same == clip


@pytest.mark.parametrize("sampler, steps", [("ddim", 10), ("dpmsolver++", 10), ("dpmsolver++", 20)])
def test_deterministic_samplers_recover_a_point_mass_with_the_exact_noise_predictor(sampler, steps):
    """Data = one image c: the exact noise predictor is eps(x_t, t) = (x_t - sqrt(abar_t) c) / sqrt(1 - abar_t),
    and a deterministic sampler following it from pure noise must land on c (a solver error shows here)."""
    from types import SimpleNamespace

    model = tiny(num_train_timesteps=1000).eval()
    c = torch.linspace(-0.8, 0.8, 64).reshape(1, 1, 8, 8)
    abar = model.noise_scheduler.alphas_cumprod

    class Exact(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            a = abar[int(t)]
            return SimpleNamespace(sample=(x - a.sqrt() * c) / (1 - a).sqrt())

    model.ema_unet = Exact()
    images = model.sample(4, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, ((c + 1) / 2).expand(4, -1, -1, -1), atol=2e-3, rtol=0)


def test_sampling_is_reproducible_from_the_seed():
    model = tiny(num_train_timesteps=20).eval()
    for sampler in ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"):
        a, b, c = (model.sample(2, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4))
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="ddim", steps=0), r"ddim steps must be an integer in \[1, 1000\]"),
        (dict(sampler="ddim", steps=1001), r"in \[1, 1000\]"),
        (dict(sampler="ddpm", steps=-3), r"ddpm steps"),
        (dict(sampler="euler"), r"unknown sampler 'euler'; valid: ddpm, ddim, dpmsolver\+\+, sde-dpmsolver\+\+"),
    ],
)
def test_bad_sampling_input_is_a_clear_error(kwargs, match):
    model = tiny()
    calls = count_calls(model.ema_unet)
    with pytest.raises(ConfigError, match=match):
        model.sample(2, **kwargs)
    assert calls[0] == 0  # rejected before any work


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(widths=(8, 8, 16, 16), image_size=28), "divisible by 8"),
        (dict(widths=(6, 16)), "norm_num_groups"),
        (dict(class_conditional=True), "num_classes"),
        (dict(beta_start=0.03), "beta_start < beta_end"),
        (dict(ema_decay=1.0), "ema_decay"),
    ],
)
def test_bad_config_is_a_clear_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        DDPMConfig(**{**TINY, **fields})


def test_vae_only_options_on_a_ddpm_run_are_rejected():
    for field, value in [("latent_dim", 16), ("beta", 4.0), ("recon_likelihood", "gaussian"), ("kl_anneal_epochs", 2)]:
        with pytest.raises(ConfigError, match=f"{field}=.* applies to VAEs only"):
            TrainConfig(dataset="mnist", model="ddpm-28", **{field: value}).resolved()
    resolved = TrainConfig(dataset="mnist", model="ddpm-28").resolved()
    assert resolved.recon_likelihood is None and "recon_likelihood" not in resolved.model_overrides()


def test_class_conditional_model_takes_labels():
    model = tiny(class_conditional=True, num_classes=3, num_train_timesteps=10).eval()
    assert model.conditional and not tiny().conditional
    with pytest.raises(ConfigError, match="needs labels y"):
        model.loss(torch.rand(2, 1, 8, 8))
    assert model.loss(torch.rand(2, 1, 8, 8), y=torch.tensor([0, 2])).loss.ndim == 0
    with pytest.raises(ConfigError, match=r"class labels must lie in 0..2, got 0..3"):
        model.sample(2, y=torch.tensor([0, 3]))
    y = torch.tensor([0, 1, 2, 2])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.sample(4, y=y, sampler="ddim", steps=5, generator=gen())
    b = model.sample(4, y=torch.tensor([1, 1, 1, 1]), sampler="ddim", steps=5, generator=gen())
    assert a.shape == (4, 1, 8, 8) and not torch.equal(a, b)


def test_save_load_keeps_ema_weights_and_reproduces_samples(tmp_path):
    model = tiny(num_train_timesteps=30)
    opt = torch.optim.SGD(model.unet.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        model.loss(torch.rand(4, 1, 8, 8)).loss.backward()
        opt.step()
        model.update_ema()
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert int(loaded.ema_updates) == 3
    for a, b in zip(model.ema_unet.parameters(), loaded.ema_unet.parameters()):
        torch.testing.assert_close(a, b)
    model.eval()
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(model.sample(2, generator=gen()), loaded.sample(2, generator=gen()))
    # the reloaded model continues the EMA schedule where it stopped
    loaded.update_ema()
    assert loaded._ema.optimization_step == 4


def tiny_run_config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(
        dataset="mnist", model="ddpm-28", train_subset=256, test_subset=64, epochs=1, batch_size=64,
        model_args={**TINY, "num_train_timesteps": 20}, out=str(tmp_path / "run"), **overrides,
    )


def test_train_writes_a_diffusion_run_folder(tmp_path, in_repo, capsys):
    run = train(tiny_run_config(tmp_path))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "samples.png", "denoising_steps.png", "training_curves.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "ddpm-28" and summary["num_timesteps"] == 20 and summary["test_eps_mse"] > 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_loss", "val_loss", "epoch_time_s", "images_per_s"} <= set(row) and "train_kl" not in row
    printed = capsys.readouterr()
    assert "train eps-MSE" in printed.out + printed.err
    import html

    from vaelab.reports import write_report

    page = write_report(run).read_text()  # the run's own (DDPM) captions, not VAE text
    assert html.escape(summary["captions"]["denoising_steps.png"]) in page and "One sample of the full T-step DDPM sampler" in page
    assert "decoder" not in page and "no caption for this file name" not in page
    # sample CLI: samplers, and bad steps / VAE options are clear errors with exit code 2
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "s.png"), "--sampler", "ddim", "--steps", "5"]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "t.png"), "--sampler", "ddim", "--steps", "21"]) == 2
    assert "ddim steps must be an integer in [1, 20]" in capsys.readouterr().err
    assert not (tmp_path / "t.png").exists()
    # resume continues the optimiser and the EMA schedule
    resume(run, epochs=2)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert int(Run(run).load_model().ema_updates) == rows[-1]["step"] == 8


def test_an_unconditional_ddpm_ignores_labels():
    model = tiny(num_train_timesteps=10).eval()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(model.sample(2, sampler="ddim", steps=3, generator=gen()),
                               model.sample(2, y=torch.tensor([0, 1]), sampler="ddim", steps=3, generator=gen()))


def test_sampler_options_on_a_vae_run_are_rejected(tmp_path):
    run = fake_run(tmp_path / "vae", "mnist", "mnist-small")
    with pytest.raises(ConfigError, match="unknown VAE sampler 'ddim'; valid: prior"):
        sample_run(run, 4, tmp_path / "s.png", sampler="ddim", device="cpu")
    with pytest.raises(ConfigError, match="--steps applies to diffusion samplers"):
        sample_run(run, 4, tmp_path / "s.png", steps=5, device="cpu")
    assert not (tmp_path / "s.png").exists()
    assert sample_run(run, 4, tmp_path / "s.png", device="cpu").is_file()
    assert main(["evaluate", "--run", str(run), "--sampler", "ddim", "--metrics", "confidence"]) == 2


def test_cpu_attention_is_the_same_arithmetic_as_sdpa(caplog):
    """The UNet's attention runs diffusers' classic processor on a CPU (faster there under bf16) and
    scaled_dot_product_attention elsewhere: the same outputs, and no warning from diffusers per call."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from vaelab.models.ddpm import DeviceAttnProcessor

    model = tiny().eval()
    layers = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert layers and all(isinstance(m.processor, DeviceAttnProcessor) for m in layers)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad(), caplog.at_level("WARNING"):
        ours = model.unet(x, t).sample
    assert not [r for r in caplog.records if r.name.startswith("diffusers")], caplog.text
    with torch.no_grad():
        for m in layers:
            m.set_processor(AttnProcessor2_0())
        sdpa = model.unet(x, t).sample
    torch.testing.assert_close(ours, sdpa, atol=1e-5, rtol=1e-5)
