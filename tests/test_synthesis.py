"""Class-mean latent synthesis: statistics, output folder in both formats, bad input."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fixtures import save_png
from vaelab.config import TrainConfig
from vaelab.data import ImageSplit, load_split, to_pixels, to_uint8
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.synthesis import class_folders, class_latent_stats, encode_class_stats, sample_latents, synthesize
from vaelab.run import Run
from vaelab.training import train

CLASSES = ("ant", "bee", "cow")


def _image_folder(root: Path, classes=CLASSES, per_class=8, side=8) -> Path:
    """``root/{train,test}/<class>/i.png``: class k has mean brightness ~ (k + 1) / (K + 1)."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                level = 255 * (k + 1) / (len(classes) + 1)
                img = (level + 20 * torch.randn(3, side, side, generator=g)).clamp(0, 255).to(torch.uint8)
                save_png(img, root / split / name / f"{i}.png")
    return root


def _tiny_run(tmp_path: Path, *, classes=CLASSES, model="conv", per_class=8) -> Path:
    data = _image_folder(tmp_path / "data", classes, per_class)
    # a calibrated decoder sigma keeps the KL from swamping the tiny data term: the codes carry the class
    config = TrainConfig(dataset="imagefolder", data_root=str(data), model=model, latent_dim=3,
                         recon_likelihood="gaussian_calibrated", model_args={"channels": [4, 8], "fc_hidden": None},
                         epochs=1, batch_size=8, val_fraction=0.2, device="cpu", out=str(tmp_path / "run"))
    return train(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-epoch VAE run on a 3-class 8x8 RGB image folder, shared by the tests that only read it."""
    return _tiny_run(tmp_path_factory.mktemp("run"))


# ---------------------------------------------------------------------------- statistics


def test_class_means_of_planted_codes_are_exact():
    # class k's codes are m_k +/- d_i: the mean is m_k exactly and the std sqrt(sum d^2 / (n - 1))
    means = torch.tensor([[0.0, 1.0], [-3.0, 2.0], [5.0, -4.0]])
    offsets = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.25, 3.0]])
    mu = torch.cat([torch.cat([m + offsets, m - offsets]) for m in means])
    labels = torch.arange(3).repeat_interleave(6)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    stats = class_latent_stats(mu[perm], labels[perm], 3)
    torch.testing.assert_close(stats.mean, means)
    torch.testing.assert_close(stats.std, (2 * offsets.pow(2).sum(0) / 5).sqrt().expand(3, 2))
    torch.testing.assert_close(stats.cov[1], torch.cov(mu[labels == 1].T))
    assert stats.count.tolist() == [6, 6, 6]


def test_class_stats_reject_an_empty_class():
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no images"):
        class_latent_stats(torch.zeros(4, 2), torch.tensor([0, 0, 2, 2]), 3)


class _MeanPixelEncoder(nn.Module):
    """Stub VAE whose posterior mean is (mean pixel, 2 * mean pixel): class means are known in closed form."""

    conditional = False

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(pixel_range="[0,1]", latent_dim=2)
        self.dummy = nn.Parameter(torch.zeros(()))

    def encode(self, x, *, y=None):
        m = x.flatten(1).mean(1, keepdim=True)
        return torch.cat([m, 2 * m], 1), torch.zeros_like(torch.cat([m, m], 1))


def test_encoded_class_means_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    labels[:4] = torch.arange(4)
    split = ImageSplit(images, labels, ["a", "b", "c", "d"], "planted")
    stats = encode_class_stats(_MeanPixelEncoder(), split, batch_size=7)
    pixel_means = to_pixels(images).flatten(1).mean(1)
    for k in range(4):
        m = pixel_means[labels == k].mean()
        torch.testing.assert_close(stats.mean[k], torch.stack([m, 2 * m]))


@pytest.mark.parametrize("method", ["class-mean", "class-std", "class-gaussian"])
def test_latent_draws_have_the_stated_moments(method):
    means = torch.tensor([[4.0, -2.0], [0.0, 0.0]])
    cov = torch.tensor([[[2.0, 0.6], [0.6, 0.5]], [[1.0, 0.0], [0.0, 1.0]]])
    stats = SimpleNamespace(mean=means, std=torch.diagonal(cov, dim1=1, dim2=2).sqrt(), cov=cov)
    z = sample_latents(stats, 0, 20000, method=method, noise_scale=0.5, latent_dim=2,
                       generator=torch.Generator().manual_seed(0))
    want_mean = torch.zeros(2) if method == "prior" else means[0]
    want_cov = {"class-mean": torch.eye(2), "prior": torch.eye(2), "class-std": torch.diag(torch.tensor([2.0, 0.5])),
                "class-gaussian": cov[0]}[method] * 0.25
    torch.testing.assert_close(z.mean(0), want_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), want_cov, atol=0.03, rtol=0)


def test_class_folders_keep_label_order():
    assert class_folders(["0 - zero", "1 - one"]) == ["0 - zero", "1 - one"]
    assert class_folders(["T-shirt/top", "Trouser", "Bag"]) == ["0-T-shirt_top", "1-Trouser", "2-Bag"]


# ---------------------------------------------------------------------------- output folder


def test_synthesis_writes_n_per_class_and_reloads_identically(tmp_path, run):
    out = synthesize(run, tmp_path / "syn", per_class=7, noise_scale=0.0, seed=3, device="cpu", batch_size=4)
    files = {d.name: sorted(p.name for p in d.iterdir()) for d in (out / "train").iterdir()}
    assert sorted(files) == list(CLASSES) and all(len(v) == 7 for v in files.values())
    as_tensors = load_split("tensors", "train", data_root=out)
    as_folder = load_split("imagefolder", "train", data_root=out, use_cache=False)
    assert len(as_tensors) == 21 and as_tensors.classes == list(CLASSES) == as_folder.classes
    assert torch.equal(as_tensors.labels, torch.arange(3).repeat_interleave(7))
    assert torch.equal(as_tensors.images, as_folder.images) and torch.equal(as_tensors.labels, as_folder.labels)
    # with noise 0 every image of class k is the decoded class mean of k: labels match the class that made them
    model = Run(run).load_model()
    stats = encode_class_stats(model, Run(run).data().train)  # the images the run was trained on
    expected = to_uint8(model.decode(stats.mean)).repeat_interleave(7, dim=0)
    assert (as_tensors.images.int() - expected.int()).abs().max() <= 1
    assert not torch.equal(expected[0], expected[7])
    manifest = (out / "manifest.json").read_text()
    assert '"method": "class-mean"' in manifest and '"per_class": 7' in manifest and '"seed": 3' in manifest
    assert (out / "synthetic_grid.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_synthesis_is_seeded(tmp_path, run):
    a = synthesize(run, tmp_path / "a", per_class=5, seed=1, device="cpu")
    b = synthesize(run, tmp_path / "b", per_class=5, seed=1, device="cpu")
    c = synthesize(run, tmp_path / "c", per_class=5, seed=2, device="cpu")
    images = [load_split("tensors", "train", data_root=p).images for p in (a, b, c)]
    assert torch.equal(images[0], images[1]) and not torch.equal(images[0], images[2])


def test_conditional_prior_synthesis(tmp_path):
    run = _tiny_run(tmp_path, model="cvae-conv")
    out = synthesize(run, tmp_path / "syn", per_class=4, device="cpu")
    split = load_split("tensors", "train", data_root=out)
    assert len(split) == 12 and '"method": "prior"' in (out / "manifest.json").read_text()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("per_class", [0, -5])
def test_non_positive_per_class(tmp_path, run, per_class):
    with pytest.raises(ConfigError, match="--per-class must be a positive integer"):
        synthesize(run, tmp_path / "syn", per_class=per_class, device="cpu")
    assert not (tmp_path / "syn").exists()


def test_unlabelled_source_run(tmp_path):
    run = _tiny_run(tmp_path, classes=("all",), per_class=24)
    with pytest.raises(DataError, match="unlabelled"):
        synthesize(run, tmp_path / "syn", per_class=3, device="cpu")
    assert not (tmp_path / "syn").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_prior_on_unconditional_and_not_a_run(tmp_path, run):
    (tmp_path / "taken").mkdir()
    with pytest.raises(VaelabError, match="already exists"):
        synthesize(run, tmp_path / "taken", per_class=3, device="cpu")
    with pytest.raises(ConfigError, match="'prior' needs a conditional model"):
        synthesize(run, tmp_path / "syn", per_class=3, method="prior", device="cpu")
    with pytest.raises(ConfigError, match="unknown synthesis method 'median'; valid: class-mean"):
        synthesize(run, tmp_path / "syn", per_class=3, method="median", device="cpu")
    with pytest.raises(VaelabError, match="no config.yaml"):
        synthesize(run.parent / "data", tmp_path / "syn", per_class=3, device="cpu")
    assert not (tmp_path / "syn").exists()


def test_failure_midway_leaves_no_folder(tmp_path, run, monkeypatch):
    import vaelab.synthesis as synthesis


    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthesis, "write_tensor_file", broken)
    with pytest.raises(OSError, match="disk full"):
        synthesize(run, tmp_path / "syn", per_class=3, device="cpu")
    assert not (tmp_path / "syn").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------- per-class Gaussian mixtures


def test_class_gmms_fit_each_class_on_its_own_codes():
    from vaelab.synthesis import fit_class_gmms

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(600) % 3
    # class c: two clusters at (c * 10, +-3)
    centres = torch.stack([labels.float() * 10, torch.where(torch.arange(600) % 2 == 0, 3.0, -3.0)], 1)
    mu = centres + 0.2 * torch.randn(600, 2, generator=g)
    mixture, fits = fit_class_gmms(mu, labels, 3, components=2, seed=0)
    assert [f["class"] for f in fits] == [0, 1, 2] and all(f["components"] == 2 and f["converged"] for f in fits)
    for c in range(3):
        means = mixture.means[c][mixture.means[c][:, 1].argsort()]
        torch.testing.assert_close(means, torch.tensor([[10.0 * c, -3.0], [10.0 * c, 3.0]]), atol=0.1, rtol=0)
    y = torch.full((100,), 1)
    z = mixture.sample(100, generator=torch.Generator().manual_seed(1), y=y, scale=0.0)
    assert ((z[:, 0] - 10).abs() < 0.1).all() and set(z[:, 1].sign().tolist()) == {-1.0, 1.0}
    with pytest.raises(DataError, match="class 2 has 1 training image"):
        fit_class_gmms(mu[:7], torch.tensor([0, 1, 0, 1, 0, 1, 2]), 3, components=2, seed=0)


def test_class_gmm_synthesis_decodes_each_class_mixture(tmp_path, run):
    from safetensors.torch import load_file

    out = synthesize(run, tmp_path / "syn", per_class=6, method="class-gmm", components=2, noise_scale=0.0,
                     seed=0, device="cpu")
    split = load_split("tensors", "train", data_root=out)
    assert len(split) == 18
    gmm = load_file(str(out / "class_gmm.safetensors"))
    assert gmm["weights"].shape == (3, 2) and gmm["covariances"].shape == (3, 2, 3, 3)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "class-gmm" and manifest["class_gmm"]["components_asked"] == 2
    assert [f["class"] for f in manifest["class_gmm"]["per_class"]] == [0, 1, 2]
    # with noise 0 every image of class c is a decoded component mean of class c's mixture
    model = Run(run).load_model()
    for c in range(3):
        options = to_uint8(model.decode(gmm["means"][c].float())).int()  # (2, C, H, W)
        images = split.images[split.labels == c].int()
        assert ((images[:, None] - options[None]).abs().flatten(2).amax(2).amin(1) <= 1).all()


def test_sampler_option_of_synthesis(tmp_path, run):
    with pytest.raises(ConfigError, match="--sampler applies to --method prior"):
        synthesize(run, tmp_path / "syn", per_class=3, method="class-mean", sampler="gmm", device="cpu")
    with pytest.raises(ConfigError, match="--components must be a positive integer"):
        synthesize(run, tmp_path / "syn", per_class=3, method="class-gmm", components=0, device="cpu")
    assert not (tmp_path / "syn").exists()
    cvae = _tiny_run(tmp_path, model="cvae-conv")
    out = synthesize(cvae, tmp_path / "syn", per_class=4, sampler="gmm:components=2", device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "prior" and manifest["sampler"]["sampler"] == "gmm:components=2"
    assert (cvae / "samplers" / "gmm-components2.safetensors").is_file()
