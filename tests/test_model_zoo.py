"""The model zoo (IWAE, beta-TC-VAE, InfoVAE, RAE, VampPrior, IAF posterior, Ladder VAE, VQ-VAE): every preset through the real training entry
point, then one analytic property per model."""

import json
import math

import pytest
import torch
from torch.distributions import Normal

from vaelab.cli import build_parser, main
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError
from vaelab.families import vae
from vaelab.losses import log_standard_normal
from vaelab.metrics.likelihood import importance_weights
from vaelab.models import PRESETS, ZOO, build_config, build_model, check_preset
from vaelab.models.btcvae import mws_terms
from vaelab.models.conv_vae import ConvVAE
from vaelab.models.infovae import mmd
from vaelab.models.ladder import precision_weighted
from vaelab.models.pixelcnn import PixelCNN, PixelCNNConfig, train_pixelcnn
from vaelab.models.vqvae import ema_update
from vaelab.families import Sampler
from vaelab.metrics.speed import time_generation
from vaelab.run import Run, run_data

TINY = dict(channels=[8, 16], fc_hidden=32)  # mnist-small's layout, narrower (and latent_dim 4)
# the zoo's own small settings: fewer pseudo-inputs and importance samples than the presets' defaults
OWN = {"iwae": {"k": 3}, "vamp": {"num_pseudo": 8}, "rae": {"decoder_reg": "gp"},
       "iaf": {"made_hidden": 16}, "ladder": {"top_dim": 2, "ladder_hidden": 16}, "vqvae": {"num_codes": 32}}


def tiny_config(tmp_path, model: str, data_root) -> str:
    """A YAML config of a tiny run of ``model`` on 256 real MNIST images (as a user writes one)."""
    own = {**TINY, **OWN.get(model.split("-")[0], {})}
    path = tmp_path / f"{model}.yaml"
    path.write_text(f"dataset: mnist\nmodel: {model}\nepochs: 1\ntrain_subset: 256\ntest_subset: 64\nbatch_size: 64\n"
                    f"latent_dim: 4\ntensorboard: false\ndata_root: {data_root}\nmodel_args: {json.dumps(own)}\n")
    return str(path)


def tiny_model(name: str, **fields):
    torch.manual_seed(0)
    return build_model(build_config(name, **{**TINY, "latent_dim": 4, **fields}))


# ------------------------------------------------------------------- every zoo preset through vaelab train


@pytest.mark.parametrize("name", [f"{t}-mnist" for t in ZOO])
def test_zoo_preset_trains_saves_resumes_and_samples(tmp_path, shared_datasets, capsys, name):
    run_dir = tmp_path / name
    train = ["train", "--config", tiny_config(tmp_path, name, shared_datasets), "--out", str(run_dir), "--device", "cpu"]
    assert main(train) == 0, capsys.readouterr().err  # the real entry point: `vaelab train`
    assert "test split of MNIST: " in capsys.readouterr().out
    run = Run(run_dir)
    model = run.load_model()
    assert model.config.model_type == name.split("-")[0] and model.config.latent_dim == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == name and summary["family"] == "vae"
    assert math.isfinite(summary["test_recon_nats"])
    for term in model.EXTRA_TERMS:  # the model's own terms reach the metrics rows and the summary
        assert math.isfinite(summary[f"test_{term}"]), term
    assert (summary["test_neg_elbo_nats"] is not None) == model.HAS_ELBO
    if "dataset_size" in model.config.to_dict():
        assert model.config.dataset_size == len(run.data().train)  # filled from the run's train split

    assert main(["train", "--resume", str(run_dir), "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["step"] == 2 * rows[0]["step"]
    assert all(math.isfinite(rows[-1][f"val_{t}"]) for t in model.EXTRA_TERMS)

    png = tmp_path / "samples.png"
    assert main(["sample", "--run", str(run_dir), "--n", "16", "--out", str(png)]) == 0  # the model's default sampler
    assert png.is_file()
    draw = vae.sampler(Run(run_dir).load_model(), Run(run_dir))
    assert draw.name == model.DEFAULT_SAMPLER
    images = draw.draw(16, torch.Generator().manual_seed(0), None)
    assert images.shape == (16, 1, 28, 28) and torch.isfinite(images).all()
    assert 0 <= images.min() and images.max() <= 1


def test_every_model_is_listed_by_train_help_and_the_unknown_model_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # help lines wrap at spaces and hyphens
    listed = text.split("modelpreset:")[1].split("--")[0].split("|")
    with pytest.raises(ConfigError) as err:
        check_preset("no-such-model")
    assert listed == list(PRESETS)
    assert str(err.value).split("valid models: ")[1].split(", ") == list(PRESETS)


def test_zoo_models_share_the_vae_networks():
    vae_model = tiny_model("mnist-small")
    shapes = {k: v.shape for k, v in vae_model.state_dict().items()}
    convs = {k for k in shapes if k.startswith("decoder.") or k in {f"encoder.{i}.{p}" for i in range(6)
                                                                      for p in ("weight", "bias")}}
    for t in ZOO:
        model = tiny_model(f"{t}-mnist")
        own = {k: v.shape for k, v in model.state_dict().items()}
        if hasattr(model, "code_indices"):  # a code grid: the conv stacks alone (no fully connected layers)
            assert {k: own[k] for k in convs} == {k: shapes[k] for k in convs}, t
        else:  # every VAE weight, same shape (VampPrior adds pseudo-inputs, IAF its flow, Ladder its top level)
            assert {k: own[k] for k in shapes} == shapes, t


# ------------------------------------------------------------------- IWAE


def test_iwae_with_one_sample_is_the_elbo_on_the_same_noise():
    iwae = tiny_model("iwae-mnist", k=1).eval()
    plain = tiny_model("mnist-small").eval()
    plain.load_state_dict(iwae.state_dict())
    x = torch.rand(6, 1, 28, 28)
    eps = torch.randn(6, 1, 4)
    out = iwae.loss(x, noise={"eps": eps})
    ref = plain.loss(x, noise={"eps": eps[:, 0]})
    torch.testing.assert_close(out.recon, ref.recon)
    torch.testing.assert_close(out.kl, ref.kl)
    mu, logvar = plain.encode(x)
    z = mu + (0.5 * logvar).exp() * eps[:, 0]
    mc_kl = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1) - Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(out.objective, ref.recon + mc_kl)  # -ELBO, one-sample KL, same z


def test_iwae_bound_is_at_least_the_mean_log_weight():
    model = tiny_model("iwae-mnist", k=16).eval()
    x = torch.rand(5, 1, 28, 28)
    eps = torch.randn(5, 16, 4)
    out = model.loss(x, noise={"eps": eps})
    recon, log_ratio, _ = model.log_weights(x, *model.encode(x), eps)
    neg_elbo = (recon - log_ratio).mean(1)  # the k-sample average of -log w
    assert (out.extra["neg_iwae"] <= neg_elbo + 1e-4).all()  # Jensen: log mean w >= mean log w
    assert (out.extra["neg_iwae"] < neg_elbo - 1e-3).any()
    # k equal weights: the bound is that one weight (the 1/k inside the log cancels the k terms)
    same = model.loss(x, noise={"eps": eps[:, :1].expand(5, 16, 4)})
    one = tiny_model("iwae-mnist", k=1).eval()
    one.load_state_dict(model.state_dict())
    torch.testing.assert_close(same.objective, one.loss(x, noise={"eps": eps[:, :1]}).objective, rtol=1e-5, atol=1e-3)


def test_iwae_k_must_be_positive():
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        build_config("iwae-mnist", k=0)


# ------------------------------------------------------------------- beta-TC-VAE


def test_btcvae_terms_sum_to_the_kl_estimate_on_the_same_minibatch():
    model = tiny_model("btcvae-mnist", dataset_size=1000).eval()
    x = torch.rand(32, 1, 28, 28)
    eps = torch.randn(32, 4)
    out = model.loss(x, noise={"eps": eps})
    mu, logvar = model.encode(x)
    std = (0.5 * logvar).exp()
    z = mu + std * eps
    one_sample_kl = Normal(mu, std).log_prob(z).sum(1) - Normal(0.0, 1.0).log_prob(z).sum(1)
    total = out.extra["mi"] + out.extra["tc"] + out.extra["dim_kl"]
    torch.testing.assert_close(total, one_sample_kl, rtol=1e-4, atol=1e-3)
    # MWS log q(z_i) by brute force: log (1 / (N M)) sum_j q(z_i | x_j)
    dens = Normal(mu[None], std[None]).log_prob(z[:, None]).sum(2).double().exp()  # (M, M)
    log_qz = torch.log(dens.sum(1) / (1000 * 32))
    terms = mws_terms(z, mu, logvar, log_standard_normal(z), 1000)
    torch.testing.assert_close(terms["log_qz"].double(), log_qz, rtol=1e-4, atol=1e-3)
    # alpha = beta = gamma = 1: the objective is the one-sample -ELBO
    torch.testing.assert_close(out.objective, out.recon + one_sample_kl, rtol=1e-4, atol=1e-3)


def test_btcvae_estimators_of_log_q_z_for_identical_posteriors():
    # every q(z|x_j) = N(0, I): q(z) = p(z). MSS's weights sum to 1 per row; MWS's to 1/N
    z = torch.randn(16, 3)
    zeros = torch.zeros(16, 3)
    log_pz = log_standard_normal(z)
    mss = mws_terms(z, zeros, zeros, log_pz, 500, "mss")
    mws = mws_terms(z, zeros, zeros, log_pz, 500, "mws")
    torch.testing.assert_close(mss["log_qz"], log_pz)
    torch.testing.assert_close(mss["mi"], torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(mss["tc"], torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(mws["log_qz"], log_pz - math.log(500))
    for t in (mss, mws):  # whatever the weights, the three terms sum to log q(z|x) - log p(z)
        torch.testing.assert_close(t["mi"] + t["tc"] + t["dim_kl"], t["log_qz_x"] - log_pz)
    with pytest.raises(ConfigError, match="unknown estimator"):
        build_config("btcvae-mnist", estimator="mcmc")


def test_btcvae_tc_weight_is_beta():
    model = tiny_model("btcvae-mnist").eval()
    x, noise = torch.rand(8, 1, 28, 28), {"eps": torch.randn(8, 4)}
    a, b = model.loss(x, beta=1.0, noise=noise), model.loss(x, beta=6.0, noise=noise)
    torch.testing.assert_close(b.objective - a.objective, 5.0 * a.extra["tc"])


# ------------------------------------------------------------------- InfoVAE / WAE-MMD


def test_mmd_of_a_set_with_itself_is_about_zero_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    scales = (0.1, 1.0, 10.0)
    same = mmd(a, b, scales).item()
    shifted = [mmd(a, b + s, scales).item() for s in (0.25, 0.5, 1.0, 2.0)]
    assert abs(same) < 0.01
    assert same < shifted[0] < shifted[1] < shifted[2] < shifted[3]
    assert shifted[0] > 0.01


def test_infovae_objective_adds_the_weighted_batch_mmd():
    model = tiny_model("infovae-mnist", mmd_weight=7.0).eval()
    x = torch.rand(10, 1, 28, 28)
    noise = model.draw_noise(10, torch.Generator().manual_seed(1), torch.device("cpu"))
    out = model.loss(x, beta=0.5, noise=noise)
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * noise["eps"]
    expected = mmd(z, noise["prior"], model.config.kernel_scales)
    torch.testing.assert_close(out.extra["mmd"], expected.expand(10))
    torch.testing.assert_close(out.objective, out.recon + 0.5 * out.kl + 7.0 * expected)
    assert torch.isfinite(model.loss(x[:1]).loss)  # a one-image batch has no MMD estimate: adds 0


# ------------------------------------------------------------------- RAE


@pytest.mark.parametrize("reg", ["l2", "gp", "none"])
def test_rae_encoder_is_deterministic_and_its_loss_ignores_noise(reg):
    model = tiny_model("rae-mnist", decoder_reg=reg)
    model.train()
    x = torch.rand(8, 1, 28, 28)
    z1, z2 = model.eval().encode(x)[0], model.encode(x)[0]
    assert torch.equal(z1, z2)
    model.train()
    a = model.loss(x, noise={"eps": torch.randn(8, 4)})
    b = model.loss(x, noise={"eps": torch.randn(8, 4)})
    torch.testing.assert_close(a.objective, b.objective)
    torch.testing.assert_close(a.extra["z_penalty"], 0.5 * a.mu.pow(2).sum(1))
    a.loss.backward()  # the gradient penalty is differentiable
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if reg == "none":
        assert (a.extra["decoder_reg"] == 0).all()
    else:
        assert (a.extra["decoder_reg"] > 0).all()


def test_rae_defaults_to_the_gmm_sampler_and_skips_the_likelihood():
    model = tiny_model("rae-mnist")
    assert model.DEFAULT_SAMPLER == "gmm" and not model.HAS_ELBO and "nll" in model.NOT_APPLICABLE
    with pytest.raises(ConfigError, match="needs the run folder"):
        vae.sampler(model, None)  # the ex-post density is fitted on a run's train codes
    with pytest.raises(ConfigError, match="unknown decoder_reg"):
        build_config("rae-mnist", decoder_reg="spectral")


# ------------------------------------------------------------------- VampPrior


def test_one_component_vampprior_is_the_gaussian_posterior_at_its_pseudo_input(shared_datasets):
    data = run_data(TrainConfig(dataset="mnist", data_root=str(shared_datasets), train_subset=500).resolved())
    mean_image = (data.train.images.float() / 255).mean(0)  # (1, 28, 28) in [0, 1]
    model = tiny_model("vamp-mnist", num_pseudo=1)
    model.train()
    model.loss(torch.rand(16, 1, 28, 28))  # move BatchNorm running stats off their init
    model.eval()
    with torch.no_grad():
        model.pseudo_raw.copy_(mean_image[None])
    torch.testing.assert_close(model.pseudo_inputs(), mean_image[None])
    mu_u, logvar_u = model.encode(mean_image[None])
    z = torch.randn(50, 4) * 2
    expected = Normal(mu_u, (0.5 * logvar_u).exp()).log_prob(z).sum(1)
    torch.testing.assert_close(model.log_prior(z), expected, rtol=1e-5, atol=1e-4)
    # in training mode too (the prior encodes its pseudo-inputs with BatchNorm's running statistics)
    torch.testing.assert_close(model.train().log_prior(z), expected, rtol=1e-5, atol=1e-4)
    model.eval()
    draws = model.sample_prior(4000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draws.mean(0), mu_u[0], atol=0.15, rtol=0)
    torch.testing.assert_close(draws.std(0), (0.5 * logvar_u[0]).exp(), atol=0.1, rtol=0.1)


def test_vampprior_reaches_the_training_kl_and_the_iwae_bound():
    model = tiny_model("vamp-mnist", num_pseudo=5).eval()
    x = torch.rand(4, 1, 28, 28)
    eps = torch.randn(4, 4)
    out = model.loss(x, noise={"eps": eps})
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps
    torch.testing.assert_close(out.kl, Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1) - model.log_prior(z))
    # log p(z) is the log of the mean of the K components' densities
    mu_u, logvar_u = model.encode(model.pseudo_inputs())
    dens = Normal(mu_u[None], (0.5 * logvar_u).exp()[None]).log_prob(z[:, None]).sum(2).double().exp()  # (B, K)
    torch.testing.assert_close(model.log_prior(z).double(), dens.mean(1).log(), rtol=1e-5, atol=1e-4)
    # the IWAE bound of `vaelab evaluate` reads log p(z) from the model, not N(0, I)
    log_w = importance_weights(model, x, 3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    e = torch.randn((4, 3, 4), generator=g)
    zk = mu[:, None] + (0.5 * logvar).exp()[:, None] * e
    log_q = Normal(mu[:, None], (0.5 * logvar).exp()[:, None]).log_prob(zk).sum(2)
    recon, _ = model.recon_terms(x.repeat_interleave(3, 0), model.decode_logits(zk.reshape(12, 4)))
    manual = -recon.reshape(4, 3) + model.log_prior(zk.reshape(12, 4)).reshape(4, 3) - log_q
    torch.testing.assert_close(log_w.float(), manual, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(model.log_prior(zk.reshape(12, 4)), log_standard_normal(zk.reshape(12, 4)))


# ------------------------------------------------------------------- IAF posterior


def test_iaf_at_identity_initialisation_is_the_diagonal_gaussian_posterior():
    model = tiny_model("iaf-mnist").eval()  # MADE output layers start at zero: every step is the identity
    x, eps = torch.rand(5, 1, 28, 28), torch.randn(5, 4)
    mu0, logvar0, _ = model.base(x)
    std0 = (0.5 * logvar0).exp()
    z = mu0 + std0 * eps
    out = model.loss(x, noise={"eps": eps})
    torch.testing.assert_close(out.kl, Normal(mu0, std0).log_prob(z).sum(1) - Normal(0.0, 1.0).log_prob(z).sum(1))
    torch.testing.assert_close(out.extra["log_det"], torch.zeros(5))
    torch.testing.assert_close(model.encode(x), (mu0, logvar0))
    flow = model.importance_samples(x, 3, generator=torch.Generator().manual_seed(0))
    gaussian = ConvVAE.importance_samples(model, x, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(flow, gaussian)


def _iaf_with_a_working_flow():
    model = tiny_model("iaf-mnist", latent_dim=3, flow_steps=3).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for made in model.flow:
            made.out.weight.copy_(0.3 * torch.randn(made.out.weight.shape, generator=g))
            made.out.bias.copy_(0.3 * torch.randn(made.out.bias.shape, generator=g))
    return model


def test_iaf_log_det_is_the_log_determinant_of_the_flows_jacobian():
    model = _iaf_with_a_working_flow()
    x = torch.rand(1, 1, 28, 28)
    mu0, logvar0, h = model.base(x)
    eps = torch.randn(1, 1, 3)
    z, log_q, log_det = model.posterior(mu0, logvar0, h, eps)
    jac = torch.autograd.functional.jacobian(lambda e: model.posterior(mu0, logvar0, h, e.view(1, 1, 3))[0].view(3), eps.view(3))
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert abs(logabsdet.item() - (0.5 * logvar0.sum() + log_det[0, 0]).item()) < 1e-4
    assert abs(log_det.item()) > 0.05  # the flow is not the identity here
    # log q(z_T|x) = log N(eps) - log|det dz_T/d eps| (change of variables)
    torch.testing.assert_close(log_q[0, 0], Normal(0.0, 1.0).log_prob(eps).sum() - logabsdet, rtol=1e-5, atol=1e-4)
    # one step is autoregressive: its Jacobian is triangular
    step = torch.autograd.functional.jacobian(lambda v: model.flow[0](v[None], h)[0][0], z[0, 0])
    assert torch.equal(step.triu(), torch.zeros(3, 3))


def test_iaf_iwae_bound_reads_the_flows_log_q():
    model = _iaf_with_a_working_flow()
    x = torch.rand(4, 1, 28, 28)
    log_w = importance_weights(model, x, 1, generator=torch.Generator().manual_seed(7))
    eps = torch.randn((4, 1, 3), generator=torch.Generator().manual_seed(7))[:, 0]
    out = model.loss(x, noise={"eps": eps})  # recon + kl = -log w on the same z (kl uses the flow's log q)
    torch.testing.assert_close(-log_w[:, 0].float(), out.recon + out.kl, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------- Ladder VAE


def test_precision_weighted_merge_is_the_normalised_product_of_the_two_gaussians():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b, lv_a, lv_b = (torch.randn(6, 3, generator=g) for _ in range(4))
    mu, logvar = precision_weighted(mu_a, lv_a, mu_b, lv_b)
    va, vb = lv_a.exp(), lv_b.exp()
    torch.testing.assert_close(logvar.exp(), va * vb / (va + vb))
    torch.testing.assert_close(mu, (mu_a * vb + mu_b * va) / (va + vb))
    # N(z; a) N(z; b) / N(z; merged) does not depend on z
    z = torch.randn(5, 6, 3, generator=g)
    ratio = Normal(mu_a, va.sqrt()).log_prob(z) + Normal(mu_b, vb.sqrt()).log_prob(z) - Normal(mu, (0.5 * logvar).exp()).log_prob(z)
    torch.testing.assert_close(ratio - ratio[0], torch.zeros_like(ratio), atol=1e-4, rtol=0)


def test_ladder_elbo_is_recon_plus_the_kl_of_each_level():
    model = tiny_model("ladder-mnist", top_dim=2).eval()
    x = torch.rand(5, 1, 28, 28)
    noise = model.draw_noise(5, torch.Generator().manual_seed(2), torch.device("cpu"))
    out = model.loss(x, noise=noise)
    mu1, logvar1, mu2, logvar2 = model.bottom_up(x)
    q2 = Normal(mu2, (0.5 * logvar2).exp())
    z2 = mu2 + q2.scale * noise["eps_top"]
    mu_p, logvar_p = model.prior_z1(z2)
    v1, vp = logvar1.exp(), logvar_p.exp()
    q1 = Normal((mu1 * vp + mu_p * v1) / (v1 + vp), (v1 * vp / (v1 + vp)).sqrt())
    p1 = Normal(mu_p, vp.sqrt())
    z1 = q1.loc + q1.scale * noise["eps"]
    kl1 = torch.distributions.kl_divergence(q1, p1).sum(1)
    kl2 = torch.distributions.kl_divergence(q2, Normal(0.0, 1.0)).sum(1)
    recon, _ = model.recon_terms(x, model.decode_logits(z1))
    torch.testing.assert_close(out.extra["kl1"], kl1)
    torch.testing.assert_close(out.extra["kl2"], kl2)
    torch.testing.assert_close(out.elbo, -(recon + kl1 + kl2))
    # the IWAE bound samples both levels: one sample's -log w is recon + log q(z1, z2 | x) - log p(z1, z2)
    log_w = importance_weights(model, x, 1, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    e2, e1 = torch.randn((5, 1, 2), generator=g)[:, 0], torch.randn((5, 1, 4), generator=g)[:, 0]
    z2 = q2.loc + q2.scale * e2
    mu_p, logvar_p = model.prior_z1(z2)
    vp = logvar_p.exp()
    q1 = Normal((mu1 * vp + mu_p * v1) / (v1 + vp), (v1 * vp / (v1 + vp)).sqrt())
    z1 = q1.loc + q1.scale * e1
    recon, _ = model.recon_terms(x, model.decode_logits(z1))
    log_ratio = (Normal(0.0, 1.0).log_prob(z2).sum(1) + Normal(mu_p, vp.sqrt()).log_prob(z1).sum(1)
                 - q2.log_prob(z2).sum(1) - q1.log_prob(z1).sum(1))
    torch.testing.assert_close(log_w[:, 0].float(), -recon + log_ratio, rtol=1e-5, atol=1e-3)
    draws = model.sample_prior(3, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (3, 4) and torch.isfinite(draws).all()


# ------------------------------------------------------------------- VQ-VAE


def test_vqvae_uses_more_than_one_code_on_mnist_and_its_gradient_reaches_the_encoder(shared_datasets):
    data = run_data(TrainConfig(dataset="mnist", data_root=str(shared_datasets), train_subset=256).resolved())
    x = data.train.images[:64].float() / 255
    model = tiny_model("vqvae-mnist", num_codes=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(3):
        out = model.loss(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    assert model.code_indices(x).unique().numel() > 1
    # straight-through: with the commitment term off (beta 0), only the decoder's gradient can reach the encoder
    model.zero_grad()
    out = model.loss(x, beta=0.0)
    torch.testing.assert_close(out.objective, out.recon)
    out.loss.backward()
    for p in [*model.encoder.parameters(), *model.pre_quant.parameters()]:
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # the decoder reads codebook vectors: encode gives them, and decoding a code snaps it to them
    z, _ = model.encode(x[:4])
    vectors = z.view(4, 4, 7, 7).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (torch.cdist(vectors, model.codebook).min(1).values < 1e-5).all()
    torch.testing.assert_close(model.decode(z + 1e-3), model.decode(z))
    assert model.DEFAULT_SAMPLER == "pixelcnn" and not model.HAS_ELBO and "nll" in model.NOT_APPLICABLE
    with pytest.raises(ConfigError, match="discrete code grid"):
        vae.sampler(tiny_model("mnist-small"), None, sampler="pixelcnn")


def test_vqvae_ema_codebook_update_is_the_closed_form_on_a_hand_made_batch():
    # two 1-D codes at 0 and 10, counts 1; the batch 1, 2 (-> code 0) and 9 (-> code 1); gamma 0.5
    count, total, codes = torch.ones(2), torch.tensor([[0.0], [10.0]]), torch.tensor([[0.0], [10.0]])
    ema_update(count, total, codes, torch.tensor([0, 0, 1]), torch.tensor([[1.0], [2.0], [9.0]]), 0.5)
    torch.testing.assert_close(count, torch.tensor([1.5, 1.0]))  # 0.5 * 1 + 0.5 * n_k
    torch.testing.assert_close(total, torch.tensor([[1.5], [9.5]]))  # 0.5 * m_k + 0.5 * (sum of its vectors)
    torch.testing.assert_close(codes, torch.tensor([[1.0], [9.5]]), rtol=0, atol=1e-4)  # m_k / N_k (smoothed)
    # an unused code keeps its place: its sum and count decay together
    count, total, codes = torch.ones(2), torch.tensor([[0.0], [10.0]]), torch.tensor([[0.0], [10.0]])
    ema_update(count, total, codes, torch.tensor([0, 0]), torch.tensor([[1.0], [2.0]]), 0.5)
    torch.testing.assert_close(codes[1], torch.tensor([10.0]), rtol=1e-4, atol=0)
    # the model updates its codebook in training mode only
    model = tiny_model("vqvae-mnist", num_codes=8)
    x = torch.rand(4, 1, 28, 28)
    model.eval().loss(x)
    assert not model.initialised
    model.train().loss(x)
    before = model.codebook.clone()
    model.eval().loss(x)
    assert model.initialised and torch.equal(model.codebook, before)


def test_pixelcnn_is_causal_and_learns_a_grid_that_repeats_its_first_code():
    net = PixelCNN(PixelCNNConfig(num_codes=8, height=4, width=4, hidden=16, layers=3)).eval()
    idx = torch.randint(8, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[:, 2, 1] = (changed[:, 2, 1] + 1) % 8
    before, after = net(idx).flatten(2), net(changed).flatten(2)  # (B, K, 16), raster order
    torch.testing.assert_close(before[:, :, : 2 * 4 + 1 + 1], after[:, :, : 2 * 4 + 1 + 1])  # cells up to (2, 1)
    assert not torch.allclose(before[:, :, 2 * 4 + 2 :], after[:, :, 2 * 4 + 2 :])  # later cells see it
    # grids whose 16 cells all hold one random code: after fitting, sampled grids repeat their first cell
    grids = torch.randint(8, (256, 1, 1), generator=torch.Generator().manual_seed(1)).expand(256, 4, 4).contiguous()
    prior, report = train_pixelcnn(grids, torch.randn(8, 2), seed=0,
                                   options={"epochs": 40, "hidden": 16, "layers": 3, "batch_size": 64, "lr": 3e-3})
    assert report["final"]["val_nll"] < 0.25 * report["uniform_nll"]
    drawn = prior.net.sample(32, generator=torch.Generator().manual_seed(2))
    assert (drawn == drawn[:, :1, :1]).float().mean() > 0.8  # independent cells: 1/8
    assert len(drawn[:, 0, 0].unique()) > 1  # and the first cell is not always the same code
    codes = prior.sample(3, generator=torch.Generator().manual_seed(2))
    assert codes.shape == (3, 2 * 16)


def test_generation_speed_times_a_pixelcnn_sampler_whole():
    # its 1 + h*w passes per image are no diffusion chain: the VAE family takes no step count to shorten it
    model = tiny_model("vqvae-mnist", num_codes=8).eval()
    calls = []
    draw = Sampler(name="pixelcnn", options={}, label="pixelcnn", network_evaluations=50, latent_space="",
                   draw=lambda n, g, y: calls.append(n) or model.sample(n, generator=g))
    out = time_generation(model, draw, 2, repeats=1, max_steps=2)
    assert calls == [2, 2] and not out["method"].startswith("extrapolated")
