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


# ---------------------------------------------------------------------------- fitted decoder sigma (sigma-VAE)


@pytest.mark.parametrize("likelihood", ["gaussian_learned", "gaussian_calibrated"])
def test_fitted_sigma_nll_is_the_normal_log_likelihood(likelihood):
    """Logits carry the means, then log sigma (one value broadcast): the NLL is the normal density's."""
    mean_logits, x = torch.randn(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    logits = torch.cat([mean_logits, torch.full_like(mean_logits, math.log(0.2))], 1)
    nll, mean = recon_nll(logits, x, likelihood)
    torch.testing.assert_close(mean, torch.sigmoid(mean_logits))
    torch.testing.assert_close(nll, -Normal(mean, 0.2).log_prob(x).flatten(1).sum(1), atol=1e-3, rtol=1e-5)
    with pytest.raises(ConfigError, match="2\\*C = 6 logit channels"):
        recon_nll(mean_logits, x, likelihood)


def test_optimal_sigma_is_the_maximum_likelihood_sigma_and_leaves_the_mean_gradient_alone():
    """sigma^2 = MSE maximises the Gaussian likelihood (Rybkin et al. 2021, sec. 3.2), so the NLL is
    stationary in sigma there, and detaching sigma does not change the gradient of the mean."""
    from vaelab.losses import gaussian_nll, optimal_log_sigma

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 5, 5, generator=g)
    mean = (x + 0.1 * torch.randn(4, 1, 5, 5, generator=g)).requires_grad_()
    log_sigma = optimal_log_sigma(x, mean.detach()).requires_grad_()
    assert log_sigma.item() == pytest.approx(0.5 * math.log((x - mean).pow(2).mean().item()), abs=1e-6)
    total = gaussian_nll(x, mean, log_sigma).sum()
    grad_sigma, grad_detached = torch.autograd.grad(total, [log_sigma, mean])
    assert abs(grad_sigma.item()) < 1e-3
    grad_through = torch.autograd.grad(gaussian_nll(x, mean, optimal_log_sigma(x, mean)).sum(), mean)[0]
    torch.testing.assert_close(grad_detached, grad_through, atol=1e-4, rtol=1e-4)
    for delta in (-0.1, 0.1):  # and it is a minimum
        assert gaussian_nll(x, mean, log_sigma.detach() + delta).sum() > total


def _fitted(likelihood: str):
    from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig

    torch.manual_seed(0)
    return ConvVAE(ConvVAEConfig(in_channels=1, image_size=8, channels=(4, 8), latent_dim=3, fc_hidden=None,
                                 recon_likelihood=likelihood))


def test_calibrated_decoder_fits_sigma_per_batch_and_evaluates_with_its_running_value():
    from vaelab.models.conv_vae import SIGMA_MOMENTUM

    model = _fitted("gaussian_calibrated")
    assert model.decoder_log_sigma().item() == pytest.approx(math.log(0.5**0.5))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = model.draw_noise(16, torch.Generator().manual_seed(2))
    model.train()
    out = model.loss(x, noise=noise)
    mse = out.mse.mean().item()  # the batch MSE: sigma^2 of this step
    d = 64
    # at sigma^2 = MSE the summed NLL is D/2 * (1 + log(2 pi MSE)) per image on average
    assert out.recon.mean().item() == pytest.approx(d / 2 * (1 + math.log(2 * math.pi * mse)), rel=1e-4)
    running = 0.5 * math.log((1 - SIGMA_MOMENTUM) * 0.5 + SIGMA_MOMENTUM * mse)
    assert model.decoder_log_sigma().item() == pytest.approx(running, rel=1e-5)
    model.eval()  # evaluation: the running sigma, a fixed density
    logits = model.decode_logits(model.reparameterize(*model.encode(x), noise["eps"]))
    assert torch.equal(logits[:, 1:], torch.full_like(logits[:, 1:], model.decoder_log_sigma().item()))
    nll, _ = recon_nll(logits, x, "gaussian_calibrated")
    torch.testing.assert_close(model.loss(x, noise=noise).recon, nll)


def test_learned_sigma_is_a_parameter_with_zero_gradient_at_the_optimum():
    from vaelab.losses import soft_clip_log_sigma

    model = _fitted("gaussian_learned").eval()
    assert model.decoder_log_sigma().item() == pytest.approx(math.log(0.5**0.5), abs=1e-6)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = model.draw_noise(16, torch.Generator().manual_seed(2))
    mse = model.loss(x, noise=noise).mse.mean().item()
    with torch.no_grad():  # set sigma^2 = MSE (inverting the soft clip numerically)
        target = torch.tensor(0.5 * math.log(mse))
        model.log_sigma_raw.copy_(target)
        for _ in range(50):
            model.log_sigma_raw += target - soft_clip_log_sigma(model.log_sigma_raw)
    model.loss(x, noise=noise).loss.backward()
    assert abs(model.log_sigma_raw.grad.item()) < 1e-2
    model.zero_grad()
    with torch.no_grad():
        model.log_sigma_raw += 0.5  # sigma too large: gradient descent shrinks it
    model.loss(x, noise=noise).loss.backward()
    assert model.log_sigma_raw.grad.item() > 1.0


def test_importance_weights_read_the_fitted_sigma_from_the_logits():
    """The IWAE metric (vaelab.metrics.likelihood) calls recon_nll on decode_logits: with k = 1 and the same
    noise, -log w = recon + log q(z|x) - log p(z), whatever sigma the decoder has fitted."""
    from vaelab.metrics.likelihood import importance_weights

    model = _fitted("gaussian_calibrated")
    with torch.no_grad():
        model.log_sigma.fill_(math.log(0.1))
    model.eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    log_w = importance_weights(model, x, 1, generator=torch.Generator().manual_seed(5))
    eps = torch.randn((3, 1, 3), generator=torch.Generator().manual_seed(5))[:, 0]
    out = model.loss(x, noise={"eps": eps})
    z = model.reparameterize(out.mu, out.logvar, eps)
    log_q = Normal(out.mu, (0.5 * out.logvar).exp()).log_prob(z).sum(1)
    log_p = Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(-log_w[:, 0].float(), out.recon + log_q - log_p, atol=1e-3, rtol=1e-4)
