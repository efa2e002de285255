"""Aggregated-posterior samplers (vaelab.latent_priors) and the VAE family's --sampler: fits, caches, seeding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fixtures import write_image_folder

from vaelab import latent_priors
from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.families import family_of
from vaelab.latent_priors import LatentCodes, LatentMixture, fit_gmm, parse_spec, train_second_stage
from vaelab.run import Run
from vaelab.training import train


def _two_blobs(n: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes of two well-separated 2-D Gaussians, 30 % at (-4, 0) with std 0.5 and 70 % at (3, 2) with
    std (1, 0.3): far from N(0, I), as a VAE's aggregated posterior can be. Returns (z, component)."""
    g = torch.Generator().manual_seed(seed)
    comp = (torch.rand(n, generator=g) < 0.7).long()
    means = torch.tensor([[-4.0, 0.0], [3.0, 2.0]])
    stds = torch.tensor([[0.5, 0.5], [1.0, 0.3]])
    return means[comp] + stds[comp] * torch.randn(n, 2, generator=g), comp


def _true_log_prob(z: torch.Tensor) -> torch.Tensor:
    means = torch.tensor([[-4.0, 0.0], [3.0, 2.0]])
    stds = torch.tensor([[0.5, 0.5], [1.0, 0.3]])
    comp = torch.distributions.Independent(torch.distributions.Normal(means, stds), 1)
    return torch.logsumexp(comp.log_prob(z[:, None]) + torch.log(torch.tensor([0.3, 0.7])), 1)


# ---------------------------------------------------------------------------- options


def test_sampler_specs_and_their_errors():
    assert parse_spec("gmm") == ("gmm", {"components": 10, "max_iter": 200})
    name, opts = parse_spec("two-stage:epochs=7,hidden=32")
    assert name == "two-stage" and opts["epochs"] == 7 and opts["hidden"] == 32 and opts["lr"] == 1e-3
    assert latent_priors.canonical_spec(name, opts) == "two-stage:epochs=7,hidden=32"
    assert latent_priors.canonical_spec("gmm", parse_spec("gmm:components=10")[1]) == "gmm"
    with pytest.raises(ConfigError, match="unknown latent sampler 'vamp'; valid: gmm, two-stage"):
        parse_spec("vamp")
    with pytest.raises(ConfigError, match="gmm takes components=N, max_iter=N"):
        parse_spec("gmm:k=3")
    for bad in ("gmm:components=0", "gmm:components=2.5", "two-stage:lr=-1", "two-stage:lr=nan"):
        with pytest.raises(ConfigError, match="must be a positive"):
            parse_spec(bad)


# ---------------------------------------------------------------------------- Gaussian mixtures


def test_gmm_recovers_a_planted_mixture_and_samples_from_it():
    z, _ = _two_blobs(4000)
    tensors, info = fit_gmm(z, 2, seed=0)
    order = tensors["means"][:, 0].argsort()
    torch.testing.assert_close(tensors["weights"][order], torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(tensors["means"][order], torch.tensor([[-4.0, 0.0], [3.0, 2.0]], dtype=torch.float64),
                               atol=0.1, rtol=0)
    assert info["converged"] and info["components"] == 2
    # the fitted density describes the codes far better than the prior N(0, I) does
    assert info["mean_log_likelihood_nats"] > info["prior_mean_log_likelihood_nats"] + 5
    mix = LatentMixture.from_groups([tensors])
    s = mix.sample(20000, generator=torch.Generator().manual_seed(1))
    assert s.shape == (20000, 2) and s.dtype == torch.float32
    assert ((s[:, 0] < 0).float().mean() - 0.3).abs() < 0.02  # component weights
    torch.testing.assert_close(s.mean(0), z.mean(0), atol=0.1, rtol=0)
    assert (mix.log_prob(z[:500].float()) - _true_log_prob(z[:500])).abs().mean() < 0.05
    # seeded: the same generator state gives the same draws
    a = mix.sample(5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, mix.sample(5, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(a, mix.sample(5, generator=torch.Generator().manual_seed(4)))


def test_per_class_mixtures_draw_each_label_from_its_own_class():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    fits = [fit_gmm(c + 0.3 * torch.randn(200, 2, generator=g), 3, seed=0)[0] for c in centres]
    fits[2] = fit_gmm(centres[2] + 0.3 * torch.randn(2, 2, generator=g), 3, seed=0)[0]  # 2 codes: 2 components
    assert len(fits[2]["weights"]) == 2
    mix = LatentMixture.from_groups(fits)
    y = torch.arange(300) % 3
    s = mix.sample(300, generator=torch.Generator().manual_seed(0), y=y)
    assert (torch.cdist(s, centres).argmin(1) == y).all()
    with pytest.raises(ConfigError, match="pass class labels"):
        mix.sample(3)
    with pytest.raises(ConfigError, match="values in 0..2"):
        mix.sample(2, y=torch.tensor([0, 3]))


# ---------------------------------------------------------------------------- second-stage VAE


def test_second_stage_vae_learns_the_code_distribution():
    z, _ = _two_blobs(2000)
    codes = LatentCodes(z, torch.full_like(z, -20.0), torch.zeros(len(z), dtype=torch.int64))  # q(z|x) ~ a point
    opts = {**latent_priors.OPTIONS["two-stage"], "epochs": 40, "hidden": 64, "depth": 2, "batch_size": 128, "lr": 3e-3}
    model, report = train_second_stage(codes, num_classes=0, options=opts, seed=0)
    rows = report["epochs"]
    assert len(rows) == 40 and report["val_codes"] == 100 and report["train_codes"] == 1900
    assert rows[-1]["val_neg_elbo"] < rows[0]["val_neg_elbo"] - 1.0
    assert json.dumps(report, allow_nan=False)
    s = model.sample(4000, generator=torch.Generator().manual_seed(0))
    prior = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    # its samples are far more likely under the true code density than prior samples are
    assert _true_log_prob(s).mean() > _true_log_prob(prior).mean() + 5
    assert ((s[:, 0] < 0).float().mean() - 0.3).abs() < 0.1  # both modes, in about the right proportion
    torch.testing.assert_close(model.sample(3, generator=torch.Generator().manual_seed(1)),
                               model.sample(3, generator=torch.Generator().manual_seed(1)))


def test_conditional_second_stage_uses_the_label():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(1200) % 2
    z = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])[labels] + 0.3 * torch.randn(1200, 2, generator=g)
    codes = LatentCodes(z, torch.full_like(z, -20.0), labels)
    opts = {**latent_priors.OPTIONS["two-stage"], "epochs": 25, "hidden": 64, "depth": 2, "batch_size": 128, "lr": 3e-3}
    model, _ = train_second_stage(codes, num_classes=2, options=opts, seed=0)
    y = torch.arange(200) % 2
    s = model.sample(200, generator=torch.Generator().manual_seed(0), y=y)
    assert ((s[:, 0] > 0).long() == y).float().mean() > 0.95
    with pytest.raises(ConfigError, match="conditional"):
        model.sample(2)


# ---------------------------------------------------------------------------- through a run folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-epoch VAE and CVAE runs on a 3-class 8x8 gray image folder (20 train images per class)."""
    root = tmp_path_factory.mktemp("samplers")
    write_image_folder(root / "data", classes=("c0", "c1", "c2"), per_class=20, size=8, channels=1)
    out = {}
    for model in ("conv", "cvae-conv"):
        out[model] = train(TrainConfig(dataset="imagefolder", data_root=str(root / "data"), model=model, latent_dim=3,
                                       recon_likelihood="bernoulli", epochs=1, batch_size=16, device="cpu",
                                       tensorboard=False, model_args={"channels": [4, 8], "fc_hidden": 16},
                                       out=str(root / model)))
    return out


def _sampler(run_dir: Path, spec: str | None):
    run = Run(run_dir)
    model = run.load_model()
    return family_of(model).sampler(model, run, sampler=spec), model, run


@pytest.mark.parametrize("spec", ["gmm", "two-stage:epochs=5,hidden=16"])
def test_fitted_sampler_is_cached_seeded_and_refitted_for_new_weights(runs, spec, monkeypatch):
    run_dir = runs["conv"]
    draw, model, run = _sampler(run_dir, spec)
    stem = latent_priors.cache_name(latent_priors.canonical_spec(*parse_spec(spec)))
    assert not (run_dir / "samplers" / f"{stem}.json").exists()  # fitted at the first draw, not when built
    x = draw.draw(6, torch.Generator().manual_seed(0), None)
    report = json.loads((run_dir / "samplers" / f"{stem}.json").read_text())
    assert report["codes"] == len(run.data().train) == 57 and report["weights_sha256"]
    assert draw.options["sampler"] == spec and draw.network_evaluations == (1 if spec == "gmm" else 2)
    assert x.shape == (6, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    # a second use reads the cache: no refit, and the same seed gives the same images
    monkeypatch.setattr(latent_priors, "train_codes", lambda *a, **k: pytest.fail("refitted despite a valid cache"))
    again, _, _ = _sampler(run_dir, spec)
    torch.testing.assert_close(again.draw(6, torch.Generator().manual_seed(0), None), x)
    assert not torch.equal(again.draw(6, torch.Generator().manual_seed(1), None), x)
    monkeypatch.undo()
    # new weights (e.g. training resumed): the cache no longer matches and is fitted again
    with torch.no_grad():
        model.fc_mu.bias += 1.0
    calls = []
    real = latent_priors.train_codes
    monkeypatch.setattr(latent_priors, "train_codes", lambda *a, **k: calls.append(1) or real(*a, **k))
    family_of(model).sampler(model, run, sampler=spec).draw(2, None, None)
    assert calls == [1]
    assert json.loads((run_dir / "samplers" / f"{stem}.json").read_text())["weights_sha256"] != report["weights_sha256"]


def test_conditional_vae_samplers_are_per_class(runs):
    draw, model, run = _sampler(runs["cvae-conv"], "gmm:components=2")
    y = torch.tensor([0, 1, 2, 2])
    assert draw.draw(4, torch.Generator().manual_seed(0), y).shape == (4, 1, 8, 8)
    report = json.loads((runs["cvae-conv"] / "samplers" / "gmm-components2.json").read_text())
    assert report["per_class"] and [g["label"] for g in report["groups"]] == [0, 1, 2]
    assert all(g["components"] == 2 for g in report["groups"])
    # without labels the classes are drawn in turn, as the prior sampler does
    torch.testing.assert_close(draw.draw(3, torch.Generator().manual_seed(0), None),
                               draw.draw(3, torch.Generator().manual_seed(0), torch.arange(3)))
    two, _, _ = _sampler(runs["cvae-conv"], "two-stage:epochs=2,hidden=16")
    assert two.draw(3, torch.Generator().manual_seed(0), y[:3]).shape == (3, 1, 8, 8)


def test_sampler_errors_come_before_any_fitting(runs, monkeypatch):
    monkeypatch.setattr(latent_priors, "train_codes", lambda *a, **k: pytest.fail("fitted before validating"))
    run = Run(runs["conv"])
    model = run.load_model()
    family = family_of(model)
    with pytest.raises(ConfigError, match="unknown VAE sampler 'ddim'; valid: prior, gmm, two-stage"):
        family.sampler(model, run, sampler="ddim")
    with pytest.raises(ConfigError, match="takes no options"):
        family.sampler(model, run, sampler="prior:components=3")
    with pytest.raises(ConfigError, match="must be a positive integer"):
        family.sampler(model, run, sampler="gmm:components=-1")
    with pytest.raises(ConfigError, match="needs the run folder"):
        family.sampler(model, None, sampler="gmm")
    with pytest.raises(ConfigError, match="--steps applies to diffusion"):
        family.sampler(model, run, sampler="gmm", steps=10)


def test_sample_command_with_fitted_samplers(runs, tmp_path):
    for spec in ("gmm", "two-stage:epochs=3"):
        png = tmp_path / f"{spec.replace(':', '_')}.png"
        assert main(["sample", "--run", str(runs["conv"]), "--n", "9", "--out", str(png), "--device", "cpu",
                     "--sampler", spec]) == 0
        assert png.stat().st_size > 0
    assert main(["sample", "--run", str(runs["conv"]), "--n", "4", "--out", str(tmp_path / "x.png"),
                 "--sampler", "gmm:components=zero"]) == 2


def test_comparison_entries_of_a_vae_include_the_fitted_samplers(runs):
    run = Run(runs["conv"])
    model = run.load_model()
    entries = family_of(model).comparison_samplers(model, run)
    assert [e.options["sampler"] for e in entries] == ["prior", "gmm", "two-stage"]
    assert [e.options["sampler"] for e in family_of(model).comparison_samplers(model, None)] == ["prior"]
    assert all(math.isfinite(e.draw(2, torch.Generator().manual_seed(0), None).sum().item()) for e in entries)


def test_second_stage_trains_when_first_drawn_inside_a_no_grad_loop(runs):
    """Samplers are fitted lazily at their first draw, which generation runs under torch.no_grad()."""
    draw, _, _ = _sampler(runs["cvae-conv"], "two-stage:epochs=2,hidden=8")
    with torch.no_grad():
        assert draw.draw(3, torch.Generator().manual_seed(0), None).shape == (3, 1, 8, 8)


def test_a_collapsed_second_stage_still_samples_its_gaussian():
    """Codes that are already N(0, I) leave the second stage nothing to model (its KL goes to 0): its density
    is then N(mean, sigma^2 I) with sigma ~ 1, and sampling z ~ p(z | u) must give that spread, not one point."""
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    codes = LatentCodes(z, torch.full_like(z, -20.0), torch.zeros(len(z), dtype=torch.int64))
    opts = {**latent_priors.OPTIONS["two-stage"], "epochs": 15, "hidden": 32, "depth": 2, "batch_size": 128, "lr": 3e-3}
    model, _ = train_second_stage(codes, num_classes=0, options=opts, seed=0)
    s = model.sample(4000, generator=torch.Generator().manual_seed(0))
    assert ((s.std(0) - 1).abs() < 0.25).all() and (s.mean(0).abs() < 0.2).all()
