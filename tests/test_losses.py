import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vaelab.errors import ConfigError
from vaelab.losses import beta_at, kl_normal, recon_nll


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, generator=g)
    logvar = torch.randn(3, 5, generator=g) * 0.5
    closed = kl_normal(mu, logvar).sum(1)
    q = Normal(mu, (0.5 * logvar).exp())
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(closed, mc, atol=0.02)
    assert torch.allclose(closed, kl_divergence(q, Normal(0.0, 1.0)).sum(1), atol=1e-5)


def test_kl_is_zero_at_the_prior():
    assert torch.equal(kl_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))


def test_bernoulli_nll_is_the_bernoulli_log_likelihood():
    logits = torch.randn(2, 1, 4, 4)
    x = torch.rand(2, 1, 4, 4).round()
    nll, mean = recon_nll(logits, x, "bernoulli")
    assert torch.allclose(nll, -Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1), atol=1e-5)
    assert torch.allclose(mean, torch.sigmoid(logits))


@pytest.mark.parametrize("pixel_range", ["[0,1]", "[-1,1]"])
def test_gaussian_nll_is_the_normal_log_likelihood(pixel_range):
    logits = torch.randn(2, 3, 4, 4)
    x = torch.rand(2, 3, 4, 4)
    nll, mean = recon_nll(logits, x, "gaussian", sigma=0.3, pixel_range=pixel_range)
    assert torch.allclose(nll, -Normal(mean, 0.3).log_prob(x).flatten(1).sum(1), atol=1e-3)


def test_sse_sigma_makes_recon_sse_plus_constant():
    logits, x = torch.randn(1, 1, 3, 3), torch.rand(1, 1, 3, 3)
    nll, mean = recon_nll(logits, x, "gaussian", sigma=0.5**0.5)
    sse = (x - mean).pow(2).sum()
    assert torch.allclose(nll, sse + 9 * 0.5 * math.log(math.pi), atol=1e-5)


def test_bernoulli_needs_unit_interval():
    with pytest.raises(ConfigError):
        recon_nll(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "bernoulli", pixel_range="[-1,1]")


def test_constant_schedule():
    assert beta_at(0, beta=4.0) == beta_at(10_000, beta=4.0) == 4.0


def test_linear_annealing():
    vals = [beta_at(s, beta=2.0, schedule="linear", anneal_steps=10) for s in (0, 5, 10, 50)]
    assert vals == [0.0, 1.0, 2.0, 2.0]


def test_cyclical_schedule_fu_et_al():
    kw = dict(beta=1.0, schedule="cyclical", total_steps=40, cycles=4, ratio=0.5)
    # period 10: rises over 5 steps, holds for 5, restarts at 0
    assert [beta_at(s, **kw) for s in (0, 1, 5, 9, 10, 12, 39)] == [0.0, 0.2, 1.0, 1.0, 0.0, 0.4, 1.0]


def test_bad_schedules():
    with pytest.raises(ConfigError, match="valid: constant, linear, cyclical"):
        beta_at(0, beta=1.0, schedule="sigmoid")
    with pytest.raises(ConfigError):
        beta_at(0, beta=1.0, schedule="linear", anneal_steps=0)


def test_vae_neg_elbo_matches_torch_distributions():
    """The family's -ELBO of a near-deterministic posterior (sigma ~ 1e-6, so z = mu) equals
    -log Bernoulli(x | decoder(mu)) + KL(N(mu, sigma^2) || N(0, I)) computed with torch.distributions."""
    from vaelab.data import ImageSplit
    from vaelab.families import vae
    from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

    torch.manual_seed(0)
    model = ConvVAE(ConvVAEConfig(in_channels=1, image_size=8, channels=(4, 8), latent_dim=3, fc_hidden=None)).eval()
    with torch.no_grad():
        model.fc_logvar.weight.zero_()
        model.fc_logvar.bias.fill_(-27.6)  # sigma = exp(-13.8) ~ 1e-6
    images = torch.randint(0, 2, (10, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8) * 255
    metrics = vae.evaluate(model, ImageSplit(images, torch.zeros(10, dtype=torch.int64), ["a"], "noise"))
    x = images.float() / 255
    with torch.no_grad():
        mu, logvar = model.encode(x)
        q = Normal(mu, (0.5 * logvar).exp())
        recon = -Bernoulli(logits=model.decode_logits(mu)).log_prob(x).flatten(1).sum(1)
        kl = kl_divergence(q, Normal(0.0, 1.0)).sum(1)
    assert metrics["recon"] == pytest.approx(recon.mean().item(), rel=1e-4)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert metrics["neg_elbo"] == pytest.approx((recon + kl).mean().item(), rel=1e-4)
