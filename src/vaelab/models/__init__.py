"""Model registry: preset names -> (config class, default fields), and weight save/load.

Presets fix the input shape where the architecture is tied to it (``cifar-seed``,
``mnist-small``, ``resnet-cifar``); ``conv`` takes its input shape from the dataset. ``cvae-mnist``,
``cvae-cifar`` and ``cvae-conv`` are their conditional twins. ``resnet-cifar`` is the stronger CIFAR-10
VAE (residual blocks, ``vaelab.models.resnet_vae``); ``cifar-seed`` stays the seeds' network. The zoo
(``ZOO``: IWAE, beta-TC-VAE, InfoVAE, RAE, VampPrior, IAF posterior, Ladder VAE, VQ-VAE; docs/model-zoo.md) has
``<type>-mnist`` and ``<type>-conv`` presets on the networks of ``mnist-small`` and ``conv``: only the objective,
the prior or the posterior differs. ``kl-f4`` is a VAE with a spatial latent map (``vaelab.models.kl_vae``), the first stage of latent
diffusion; ``ldm-mlp`` and ``ldm-unet`` are latent diffusion models over a first-stage run folder
(``vaelab.models.ldm``).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vaelab.errors import ConfigError, VaelabError
from vaelab.io import atomic_path, read_checked, write_json
from vaelab.models.classifier import ClassifierConfig, ResNetClassifier
from vaelab.models.conv_vae import ConvVAE, ConvVAEConfig
from vaelab.models.ddpm import DDPM, DDPMConfig
from vaelab.models.cvae import CVAE, CVAEConfig
from vaelab.models.kl_vae import KLVAE, KLVAEConfig
from vaelab.models.kl_vae_diffusers import DiffusersKLVAE, DiffusersKLVAEConfig
from vaelab.models.ldm import LDM, LDMConfig
from vaelab.models.resnet_vae import ResNetVAE, ResNetVAEConfig
from vaelab.models.iwae import IWAE, IWAEConfig
from vaelab.models.btcvae import BTCVAE, BTCVAEConfig
from vaelab.models.infovae import InfoVAE, InfoVAEConfig
from vaelab.models.rae import RAE, RAEConfig
from vaelab.models.vamp import VampConfig, VampVAE
from vaelab.models.iaf import IAFConfig, IAFVAE
from vaelab.models.ladder import LadderConfig, LadderVAE
from vaelab.models.vqvae import VQVAE, VQVAEConfig

# model_type (stored in config.json) -> (config class, model class)
MODEL_TYPES: dict[str, tuple[type, type[nn.Module]]] = {
    "conv_vae": (ConvVAEConfig, ConvVAE),
    "ddpm": (DDPMConfig, DDPM),
    "cvae": (CVAEConfig, CVAE),
    "classifier": (ClassifierConfig, ResNetClassifier),
    "resnet_vae": (ResNetVAEConfig, ResNetVAE),
    "iwae": (IWAEConfig, IWAE),
    "btcvae": (BTCVAEConfig, BTCVAE),
    "infovae": (InfoVAEConfig, InfoVAE),
    "rae": (RAEConfig, RAE),
    "vamp": (VampConfig, VampVAE),
    "iaf": (IAFConfig, IAFVAE),
    "ladder": (LadderConfig, LadderVAE),
    "vqvae": (VQVAEConfig, VQVAE),
    "kl_vae": (KLVAEConfig, KLVAE),
    "kl_vae_diffusers": (DiffusersKLVAEConfig, DiffusersKLVAE),
    "ldm": (LDMConfig, LDM),
}

# preset name -> (model_type, fixed fields); fields not fixed here come from the dataset/config.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "mnist-small": (
        "conv_vae",
        dict(in_channels=1, image_size=28, channels=(32, 64, 64), latent_dim=10, fc_hidden=256),
    ),
    "cifar-seed": (
        "conv_vae",
        dict(in_channels=3, image_size=32, channels=(64, 128, 256, 512), latent_dim=256, fc_hidden=None),
    ),
    "conv": ("conv_vae", dict(channels=(32, 64, 128, 256), latent_dim=64, fc_hidden=None)),
    # residual CIFAR-10 VAE: 32 -> 16 -> 8 -> 4 px, two residual blocks per level, latent 128; 2.6 M parameters,
    # faster per image on a CPU than cifar-seed (7.1 M; docs/samplers.md)
    "resnet-cifar": (
        "resnet_vae",
        dict(in_channels=3, image_size=32, channels=(32, 64, 128), blocks=2, latent_dim=128, fc_hidden=None),
    ),
    # DDPM baselines: attention at the lowest level (7x7 and 8x8) and in the middle block
    "ddpm-28": ("ddpm", dict(in_channels=1, image_size=28, widths=(32, 64, 128))),
    "ddpm-32": ("ddpm", dict(in_channels=3, image_size=32, widths=(64, 128, 256))),
    "ddpm": ("ddpm", dict(widths=(32, 64, 128))),  # input shape from the dataset (side divisible by 4)
    # first stage of latent diffusion: a VAE with a 4-channel latent map at 1/4 of the image side
    # (28x28 -> 4x7x7, 32x32 -> 4x8x8; Rombach et al. 2022, "KL-f4"); input shape from the dataset
    "kl-f4": ("kl_vae", dict(channels=(64, 128), latent_channels=4)),
    # the same latent from diffusers' AutoencoderKL (ResNet blocks, GroupNorm, mid-block attention)
    "kl-f4-diffusers": ("kl_vae_diffusers", dict(channels=(32, 64), latent_channels=4)),
    # latent diffusion on a first stage's latents (--first-stage RUN_DIR): a residual MLP for vector latents
    # (any VAE run; a spatial latent is flattened), diffusers' UNet2DModel for spatial ones (kl-f4)
    "ldm-mlp": ("ldm", dict(denoiser="mlp")),
    "ldm-unet": ("ldm", dict(denoiser="unet")),
}
# conditional VAEs mirror the unconditional presets layer for layer (num_classes comes from the dataset)
PRESETS["cvae-mnist"] = ("cvae", PRESETS["mnist-small"][1])
PRESETS["cvae-cifar"] = ("cvae", PRESETS["cifar-seed"][1])
PRESETS["cvae-conv"] = ("cvae", PRESETS["conv"][1])
# the zoo (docs/model-zoo.md): VAE objectives and priors over the same networks, layer for layer; <name>-mnist on
# mnist-small's networks (28x28 gray), <name>-conv on conv's (input shape from the dataset)
ZOO = ("iwae", "btcvae", "infovae", "rae", "vamp", "iaf", "ladder", "vqvae")  # model types, also the presets' prefixes
# where a zoo model's code is not mnist-small's vector: the VQ-VAE quantises the 7x7 feature map of two convs
ZOO_MNIST_FIELDS = {"vqvae": dict(channels=(32, 64), latent_dim=16)}
for _type in ZOO:
    PRESETS[f"{_type}-mnist"] = (_type, {**PRESETS["mnist-small"][1], **ZOO_MNIST_FIELDS.get(_type, {})})
    PRESETS[f"{_type}-conv"] = (_type, PRESETS["conv"][1])
# fields a preset pins to its input shape: a dataset of another shape is an error, not a resize
SHAPE_FIELDS = ("in_channels", "image_size")


def check_preset(name: str) -> None:
    if name not in PRESETS:
        raise ConfigError(f"unknown model {name!r}; valid models: {', '.join(PRESETS)}")


def preset_family(name: str) -> str:
    """The model family (a key of ``vaelab.families.FAMILIES``) of the model class behind preset ``name``."""
    check_preset(name)
    return MODEL_TYPES[PRESETS[name][0]][1].family


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (a DDPM's frozen EMA copy is not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_fields(name: str) -> set[str]:
    """The config fields of preset ``name``'s model type (e.g. to see whether it takes ``num_classes``)."""
    check_preset(name)
    return {f.name for f in fields(MODEL_TYPES[PRESETS[name][0]][0]) if f.init}


def build_config(name: str, *, data_shape: tuple[int, int, int] | None = None, **overrides: Any):
    """The config of preset ``name`` with ``overrides`` applied (``None`` values are ignored).

    Args:
        name: a key of ``PRESETS``.
        data_shape: ``(C, H, W)`` of the dataset; checked against (or filling in) the preset's shape.
        overrides: config fields, e.g. ``latent_dim=32``, ``recon_likelihood="gaussian"``.

    Raises:
        ConfigError: unknown preset or field, a shape that does not match the preset, or a field
            value the architecture cannot take.
    """
    check_preset(name)
    model_type, fixed = PRESETS[name]
    config_cls = MODEL_TYPES[model_type][0]
    valid = {f.name for f in fields(config_cls) if f.init}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ConfigError(f"model {name!r} has no field(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    values = {**fixed, **{k: v for k, v in overrides.items() if v is not None}}
    if data_shape is not None:
        c, h, w = data_shape
        if h != w:
            raise ConfigError(f"model {name!r} needs square images, the dataset has {h}x{w}")
        for key, actual in (("in_channels", c), ("image_size", h)):
            if key in fixed and fixed[key] != actual:
                want = f"{fixed['in_channels']}x{fixed['image_size']}x{fixed['image_size']}"
                raise ConfigError(
                    f"model {name!r} expects {want} images but the dataset has {c}x{h}x{w}; "
                    f"choose a preset for this shape (e.g. --model conv) or another dataset"
                )
            values.setdefault(key, actual)
    return config_cls(**values)


def build_model(config) -> nn.Module:
    """Instantiate the model class that belongs to ``config`` (by its ``model_type``)."""
    return MODEL_TYPES[config.model_type][1](config)


def config_from_dict(d: dict):
    """Inverse of ``config.to_dict()``; raises ``VaelabError`` for an unknown ``model_type``."""
    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise VaelabError(f"unknown model_type {model_type!r} in model config; valid: {', '.join(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0](**d)


def save_model(model: nn.Module, folder: str | Path) -> None:
    """Write ``model.safetensors`` (weights and buffers) and ``config.json`` into ``folder``, atomically."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_json(folder / "config.json", model.config.to_dict())


def load_model(folder: str | Path, *, device: torch.device | str = "cpu",
               remedy: str = "restore it from a copy") -> nn.Module:
    """Rebuild a model saved by ``save_model``; returned in eval mode on ``device``.

    Args:
        remedy: what to do when a file of the folder is damaged (the caller knows what wrote it).

    Raises:
        VaelabError: the folder lacks ``config.json`` or ``model.safetensors``.
        DamagedFileError: one of them cannot be read, or the weights do not fit the config (named, with ``remedy``).
    """
    folder = Path(folder)
    for f in ("config.json", "model.safetensors"):
        if not (folder / f).exists():
            raise VaelabError(f"{folder} is not a saved model: {f} is missing")
    config = read_checked(folder / "config.json", lambda p: config_from_dict(json.loads(p.read_text())), remedy=remedy)
    model = build_model(config)
    read_checked(folder / "model.safetensors", lambda p: model.load_state_dict(load_file(str(p))), remedy=remedy)
    return model.to(device).eval()
