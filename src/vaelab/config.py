"""The training config: one flat dataclass, read from YAML and/or CLI flags, validated up front."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any


from vaelab.data.pixels import PIXEL_RANGES
from vaelab.data.sources import check_dataset_name
from vaelab import families
from vaelab.errors import ConfigError, DataError
from vaelab.io import read_yaml_mapping
from vaelab.losses import BETA_SCHEDULES, RECON_LIKELIHOODS
from vaelab.models import check_preset, preset_family

if TYPE_CHECKING:
    from vaelab.data import ImageSplit

# the seeds' spellings, accepted in YAML files as well as on the command line
ALIASES = {"save_path": "out", "batch-size": "batch_size", "latent-dim": "latent_dim"}

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MODEL = {"mnist": "mnist-small", "fashion-mnist": "mnist-small", "cifar10": "cifar-seed"}
# datasets whose classes are mirror-symmetric: random horizontal flips are on by default (generative training)
MIRROR_SYMMETRIC = ("cifar10",)
# datasets known only from their images: defaults come from the training split itself (``DataStats``)
DATA_DERIVED = ("imagefolder", "tensors")
DEFAULT_EPOCHS = 10
# the epoch budget of a data-derived run: enough epochs for about TARGET_STEPS optimiser steps, within bounds
TARGET_STEPS, MIN_EPOCHS, MAX_EPOCHS = 2000, 10, 200


@dataclass(frozen=True)
class DataStats:
    """What defaults can be derived from: a training split's shape, size and pixel statistics.

    Attributes:
        channels, height, width: image shape ``(C, H, W)``.
        num_images: images in the split.
        near_binary: share of sub-pixels within 10 % of black or white (``v <= 25`` or ``v >= 230`` of 255),
            over at most the first 10,000 images: ~0.9 for MNIST, 0.6 for Fashion-MNIST, lower for photos.
    """

    channels: int
    height: int
    width: int
    num_images: int
    near_binary: float

    @classmethod
    def of(cls, split: "ImageSplit", *, max_images: int = 10000) -> "DataStats":
        x = split.images[:max_images]
        near = ((x <= 25) | (x >= 230)).float().mean().item() if len(x) else 0.0
        c, h, w = split.shape
        return cls(channels=c, height=h, width=w, num_images=len(split), near_binary=near)

    def describe(self) -> str:
        return (f"{self.num_images:,} train images of {self.channels}x{self.height}x{self.width}, "
                f"{self.near_binary:.0%} of pixels within 10% of black or white")


@dataclass
class TrainConfig:
    """Everything that defines a training run. ``None`` means "the default for this dataset/model".

    Data: ``dataset`` (mnist | fashion-mnist | cifar10 | imagefolder), ``data_root``,
    ``val_fraction`` of train held out (seeded), ``train_subset``/``test_subset`` (N images drawn at random with seed 0,
    for quick runs), ``augment`` (random horizontal flips, no crops: the augmentation of generative
    training; default on where the classes are mirror-symmetric, CIFAR-10, off for digits and for
    image folders and tensor files, whose mirror symmetry cannot be known from the pixels),
    ``pixel_range`` ("[0,1]" or "[-1,1]"), ``binarize`` (dynamic binarisation: every training batch
    is resampled as ``x ~ Bernoulli(pixel intensity)``, validation/test images are binarised once with
    the run's seed; for Bernoulli likelihoods comparable with the literature, e.g. MNIST VAE ~89.9 nats).

    Model: ``model`` preset (default: mnist-small for 28x28 digits, cifar-seed for CIFAR-10, conv
    otherwise), ``latent_dim``, ``recon_likelihood`` (default: the model family's, see
    ``vaelab.families.vae.resolve_config``), ``recon_sigma`` (Gaussian std in pixel units),
    ``model_args`` (any other model field), ``first_stage`` (latent diffusion presets ``ldm-*``: the run
    folder of the frozen VAE whose latents are diffused; stored as an absolute path).

    Data-derived defaults (``DATA_DERIVED`` datasets: image folders, tensor files): fields left unset
    are chosen from the training split (``DataStats``) when ``prepare`` has loaded it
    (``resolved(data=...)``): the family's likelihood and network size, augmentation off, and an epoch
    budget of about ``TARGET_STEPS`` steps; ``data_defaults`` records each choice and why (printed at
    the start of training, written to config.yaml).

    Optimisation: ``epochs`` (default 10; data-derived for image folders), ``batch_size``, ``lr``,
    ``adam_betas``, ``weight_decay``, ``grad_clip``
    (max gradient norm, null to disable), ``lr_patience``/``lr_factor`` (ReduceLROnPlateau on the
    validation loss).

    KL weight: ``beta``; ``beta_schedule`` constant | linear | cyclical (default linear when
    ``kl_anneal_epochs`` or ``kl_anneal_steps`` is set, else constant); ``kl_cycles`` and
    ``kl_cycle_ratio`` for cyclical.

    Run: ``device`` (auto = cuda -> mps -> cpu), ``precision`` (auto | fp32 | bf16 | fp16: autocast
    of the networks' forward and backward; loss sums stay float32; fp16 with a gradient scaler, CUDA
    only; auto = bf16 where the device runs it fast, see ``vaelab.runtime.resolve_precision``),
    ``channels_last`` (NHWC memory format for convolutions; None = where it helps), ``compile``
    (``torch.compile`` the model), ``seed``, ``out`` (run folder), ``log_every`` (steps between
    progress-bar refreshes and non-finite checks), ``tsne`` (also plot t-SNE of the latents),
    ``tensorboard`` (scalars and image grids every epoch in ``RUN_DIR/tb/``).
    """

    dataset: str = "mnist"
    data_root: str | None = None
    val_fraction: float = 0.05
    train_subset: int | None = None
    test_subset: int | None = None
    augment: bool | None = None
    pixel_range: str = "[0,1]"
    binarize: bool = False

    model: str | None = None
    latent_dim: int | None = None
    recon_likelihood: str | None = None
    recon_sigma: float | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    first_stage: str | None = None
    data_defaults: dict[str, str] = field(default_factory=dict)

    epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = 100.0
    lr_patience: int = 2
    lr_factor: float = 0.5

    beta: float = 1.0
    beta_schedule: str | None = None
    kl_anneal_epochs: int | None = None
    kl_anneal_steps: int | None = None
    kl_cycles: int = 4
    kl_cycle_ratio: float = 0.5

    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    seed: int = 0
    out: str | None = None
    log_every: int = 25
    tsne: bool = False
    tensorboard: bool = True

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # YAML gives lists

    # ------------------------------------------------------------------ resolution

    def resolved(self, data: "ImageSplit | None" = None) -> "TrainConfig":
        """A copy with every dataset/model-dependent default filled in, validated.

        Args:
            data: the training split, for the defaults of ``DATA_DERIVED`` datasets (image folders,
                tensor files): fields still unset are derived from its ``DataStats`` first, and
                ``data_defaults`` says what was chosen and why. Without it (e.g. to validate a
                config before loading data) they get the dataset-name defaults.

        Raises:
            ConfigError / DataError: the first invalid field, named, with what was expected.
        """
        c = dataclasses.replace(self, model_args=dict(self.model_args), data_defaults=dict(self.data_defaults))
        check_dataset_name(c.dataset)
        stats = DataStats.of(data) if data is not None and c.dataset in DATA_DERIVED else None
        derived: dict[str, str] = {}
        if c.model is None:
            c.model = DEFAULT_MODEL.get(c.dataset, "conv")
            if stats is not None:
                derived["model"] = f"{c.model}: the preset that takes its input shape from the data"
        check_preset(c.model)
        family = families.get(preset_family(c.model))
        if stats is not None:
            derived.update(family.data_defaults(c, stats))  # before resolve_config: fills fields still unset
        family.resolve_config(c)  # family defaults; fields it has no use for are errors
        if c.augment is None:
            c.augment = c.dataset in MIRROR_SYMMETRIC
            if stats is not None:
                derived["augment"] = ("off: whether the classes of an image folder are mirror-symmetric cannot be "
                                      "read from the pixels (flipped digits or text are other images); turn on with "
                                      "--augment (augment: true) if they are")
        if c.epochs is None:
            c.epochs = DEFAULT_EPOCHS
            if stats is not None and c.batch_size and c.batch_size > 0:
                steps = math.ceil(stats.num_images / c.batch_size)
                c.epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps)))
                derived["epochs"] = (f"{c.epochs}: about {TARGET_STEPS:,} optimiser steps ({steps} per epoch of "
                                     f"{stats.num_images:,} images at batch size {c.batch_size}), within "
                                     f"{MIN_EPOCHS}..{MAX_EPOCHS} epochs")
        if stats is not None:  # the images were looked at: record what they decided (nothing: {})
            c.data_defaults = {"data": stats.describe(), **derived} if derived else {}
        if c.beta_schedule is None:
            c.beta_schedule = "linear" if (c.kl_anneal_epochs or c.kl_anneal_steps) else "constant"
        c.validate()
        return c

    def validate(self) -> None:
        def positive(name: str, integer: bool = True) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int) and not isinstance(v, bool) if integer else isinstance(v, (int, float))
            if not ok or v <= 0:
                kind = "a positive integer" if integer else "a positive number"
                raise ConfigError(f"{name} must be {kind}, got {v!r}")

        for name in ("epochs", "batch_size", "log_every", "kl_cycles"):
            positive(name)
        shadowed = sorted(set(self.model_args) & set(TOP_LEVEL_MODEL_FIELDS))
        if shadowed:  # model_overrides() would let the top-level field win without a word
            raise ConfigError(f"model_args.{shadowed[0]}: {shadowed[0]} is a top-level config field; set "
                              f"{shadowed[0]}: ... (or --{shadowed[0].replace('_', '-')}) instead")
        positive("lr", integer=False)
        if self.recon_sigma is not None:  # None for models without a Gaussian decoder
            positive("recon_sigma", integer=False)
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.latent_dim is not None and (not isinstance(self.latent_dim, int) or self.latent_dim < 1):
            raise ConfigError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        for name in ("train_subset", "test_subset", "kl_anneal_epochs", "kl_anneal_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0 or (v == 0 and "subset" in name)):
                raise ConfigError(f"{name} must be a {'positive' if 'subset' in name else 'non-negative'} integer, got {v!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.pixel_range not in PIXEL_RANGES:
            raise ConfigError(f"pixel_range must be one of {', '.join(PIXEL_RANGES)}, got {self.pixel_range!r}")
        if self.recon_likelihood is not None and self.recon_likelihood not in RECON_LIKELIHOODS:
            raise ConfigError(f"unknown recon_likelihood {self.recon_likelihood!r}; valid: {', '.join(RECON_LIKELIHOODS)}")
        if self.binarize and (self.recon_likelihood != "bernoulli" or self.pixel_range != "[0,1]"):
            raise ConfigError("binarize: true needs recon_likelihood 'bernoulli' and pixel_range '[0,1]', got "
                              f"{self.recon_likelihood!r} and {self.pixel_range!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(f"unknown beta_schedule {self.beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if self.beta_schedule == "linear" and not (self.kl_anneal_epochs or self.kl_anneal_steps):
            raise ConfigError("beta_schedule 'linear' needs kl_anneal_epochs or kl_anneal_steps > 0")
        if not 0.0 < self.kl_cycle_ratio <= 1.0:
            raise ConfigError(f"kl_cycle_ratio must be in (0, 1], got {self.kl_cycle_ratio}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "mps") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be auto, cpu, mps or cuda[:N], got {self.device!r}")

    def model_overrides(self) -> dict[str, Any]:
        values = {**self.model_args, **{k: getattr(self, k) for k in TOP_LEVEL_MODEL_FIELDS}}
        return {k: v for k, v in values.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


# model fields that are TrainConfig fields of their own (the CLI has a flag for each)
TOP_LEVEL_MODEL_FIELDS = ("latent_dim", "recon_likelihood", "recon_sigma", "pixel_range", "first_stage")


def config_from_dict(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Build a ``TrainConfig`` from a dict, accepting the seeds' aliases (``save_path`` -> ``out``).

    Raises:
        ConfigError: an unknown key (listing the valid ones) or a value of the wrong type.
    """
    clean: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key.replace("-", "_"))
        if name not in FIELD_NAMES:
            raise ConfigError(f"{source}: unknown field {key!r}; valid fields: {', '.join(FIELD_NAMES)}")
        clean[name] = value
    try:
        return TrainConfig(**clean)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: str | Path) -> TrainConfig:
    """Read a YAML config file (keys are ``TrainConfig`` fields).

    Raises:
        ConfigError: missing file, invalid YAML, not a mapping, or unknown keys.
    """
    return config_from_dict(read_yaml_mapping(path, "config file"), source=str(path))


def with_overrides(config: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``config`` with every non-``None`` entry of ``overrides`` replacing its field."""
    values = {k: v for k, v in overrides.items() if v is not None}
    return config_from_dict({**config.to_dict(), **values})


__all__ = ["TrainConfig", "load_config", "config_from_dict", "with_overrides", "ConfigError", "DataError", "FIELD_NAMES"]
