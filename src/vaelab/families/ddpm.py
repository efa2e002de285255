"""The diffusion family: DDPM (Ho et al. 2020) on diffusers' UNet and schedulers (``vaelab.models.ddpm``).

The training loss is the "simple" epsilon-prediction MSE per pixel (Ho et al. 2020, eq. 14); there
is no latent code and no KL weight. Images are drawn with the full ``T``-step ancestral sampler
(``ddpm``) or DDIM (``ddim``, Song et al. 2021) from the EMA weights. See ``vaelab.families`` for
the contract this module implements.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab import plots
from vaelab.data import ImageSplit
from vaelab.errors import ConfigError
from vaelab.families.base import Sampler, constant_labels, cycle_labels, eval_blocks
from vaelab.models.diffusion import DEFAULT_STEPS, SAMPLER_HOW, SAMPLER_NAMES, SAMPLERS, default_steps
from vaelab.runtime import Distributed

NAME = "ddpm"
DESCRIPTION = "denoising diffusion model (DDPM, DDIM sampling)"
LOSS_UNIT = "epsilon-MSE per pixel"
LOSS_FORMAT = ".4f"
TERMS: dict[str, str] = {}
USES_BETA = False
HEADLINE = ("test_eps_mse", "parameters", "train_time_s", "train_images_per_s")
SWEEP_COLUMNS = [("eps_mse", "test eps-MSE", "test epsilon-MSE per pixel")]
NOT_APPLICABLE = {name: "the model has no encoder (not a VAE): no reconstruction, likelihood bound or latent code"
                  for name in ("recon", "rfid", "nll", "latent", "disentanglement")}
# config fields that mean something for VAEs only, with the values that mean "not used"
VAE_ONLY = {"latent_dim": (None,), "recon_likelihood": (None,), "recon_sigma": (None,), "beta": (1.0,),
            "beta_schedule": (None, "constant"), "kl_anneal_epochs": (None,), "kl_anneal_steps": (None,),
            "tsne": (False,), "binarize": (False,)}

PICTURES = {
    "samples.png": "64 samples from the EMA weights, DDIM sampler with min(50, T) steps (model trained on {source}).",
    "denoising_steps.png": "One sample of the full T-step DDPM sampler (EMA weights): the state x_t (top) and the model's "
                           "estimate of x_0 (bottom) at 11 timesteps from noise to image.",
    "training_curves.png": "Epsilon-MSE per pixel per epoch: train (running mean over the epoch on the {source} train "
                           "split) and validation (held-out part of the train split, end of each epoch).",
}


def resolve_config(config) -> None:
    """Reject VAE-only fields: a diffusion model has no latent code, likelihood choice or KL weight.

    Raises:
        ConfigError: naming the first such field that is set (or ``first_stage``: latent diffusion only).
    """
    for name, unset in VAE_ONLY.items():
        if getattr(config, name) not in unset:
            raise ConfigError(f"{name}={getattr(config, name)!r} applies to VAEs only; model {config.model!r} is a "
                              "diffusion model (remove it from the config or command line)")
    if config.first_stage is not None:
        raise ConfigError(f"first_stage applies to latent diffusion models (ldm-mlp, ldm-unet); model {config.model!r} "
                          "is a pixel-space diffusion model (remove it from the config or command line)")


def data_defaults(config, stats) -> dict[str, str]:
    """No family defaults depend on the images (the ``ddpm`` preset already takes its shape from them)."""
    return {}


def prepare_model(model, train: ImageSplit, config) -> str | None:
    """Nothing to set up from the data."""
    return None


def after_step(model) -> None:
    """One EMA update of the sampling weights."""
    model.update_ema()


@torch.no_grad()
def evaluate(model, split: ImageSplit, *, beta: float = 1.0, seed: int = 0, keep_latents: bool = False,
             dist: Distributed | None = None) -> dict:
    """``{"loss": mean epsilon-MSE per diffused entry (pixel, or latent entry for latent diffusion)}`` over
    ``split``, one seeded ``t`` and noise draw per image, true labels (trained weights, not the EMA; the
    same with any number of data-parallel ranks, see ``eval_blocks``)."""
    dist = dist or Distributed()
    was_training = model.training
    model.eval()
    device = split.images.device
    sums = torch.zeros(2, device=device)  # eps_mse, n
    for x, y, noise, _ in eval_blocks(model, split, seed=seed, dist=dist):
        out = model.loss(x, y=y, noise=noise)
        sums += torch.stack([out.eps_mse.sum(), torch.tensor(float(len(x)), device=device)])
    model.train(was_training)
    eps_mse, n = dist.all_reduce(sums).tolist()
    return {"loss": eps_mse / n}


def epoch_line(row: dict, model) -> str:
    return f"train eps-MSE {row['train_loss']:.4f} | val eps-MSE {row['val_loss']:.4f}"


def epoch_warning(rows: list[dict]) -> str | None:
    return None


def summary(model, test: ImageSplit, config, metrics: dict) -> dict:
    import diffusers

    return {
        "num_timesteps": model.config.num_train_timesteps,
        "class_conditional": model.config.class_conditional,
        "test_eps_mse": metrics["loss"],
        "units": "eps-MSE: mean squared error of the predicted noise per pixel, one uniform t and noise draw per "
                 "test image (trained weights, not the EMA)",
        "diffusers_version": diffusers.__version__,
    }


@torch.no_grad()
def write_pictures(run_dir: Path, model, data, rows: list[dict], config, metrics: dict) -> dict[str, str]:
    """``PICTURES``; returns ``{file: caption}`` of those written."""
    run_dir = Path(run_dir)
    model.eval()
    pr = model.config.pixel_range
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed)
    written = []
    if rows:
        plots.loss_curves(rows, run_dir / "training_curves.png", ylabel="epsilon-MSE per pixel")
        written.append("training_curves.png")
    T = model.config.num_train_timesteps
    plots.save_grid(model.sample(64, generator=gen, sampler="ddim", steps=min(50, T)), run_dir / "samples.png",
                    nrow=8, pixel_range=pr)
    _, states = model.denoise(1, generator=gen, sampler="ddpm", snapshots=11)
    plots.denoising_figure(states, run_dir / "denoising_steps.png", pixel_range=pr,
                           title=f"DDPM ancestral sampling, T={T} steps (EMA weights)")
    written += ["samples.png", "denoising_steps.png"]
    return {name: PICTURES[name].format(source=data.test.source) for name in written}


def log_images(writer, model, val: ImageSplit, epoch: int, seed: int) -> None:
    """No images per epoch: a sample costs ``T`` network evaluations."""


def sweep_metrics(summary: dict) -> dict:
    return {"eps_mse": summary["test_eps_mse"]}


def sampler(model, run=None, *, sampler: str | None = None, steps: int | None = None) -> Sampler:
    """``ddpm`` (ancestral, ``T`` steps by default), ``ddim`` (eta 0, 50 steps by default), ``dpmsolver++``
    (DPM-Solver++ 2M, 20 steps by default) or ``sde-dpmsolver++`` (its SDE form, 50 steps), EMA weights.

    Raises:
        ConfigError: unknown sampler or steps outside ``[1, T]`` (checked now, before any sampling).
    """
    name = sampler or "ddpm"
    if name not in SAMPLERS:
        raise ConfigError(f"unknown diffusion sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    T = model.config.num_train_timesteps
    steps = steps if steps is not None else default_steps(name, T)
    model.make_scheduler(name, steps)  # raises for steps outside [1, T]
    c, s = model.config.in_channels, model.config.image_size
    noise = f"no compact latent: x_T is {c}x{s}x{s} Gaussian noise, the size of the image"
    how = SAMPLER_HOW[name]

    def draw(n: int, generator: torch.Generator | None, y: torch.Tensor | None) -> torch.Tensor:
        return model.sample(n, y=y, generator=generator, sampler=name, steps=steps, batch_size=n)

    label = SAMPLER_NAMES[name]
    return Sampler(name=name, options={"sampler": name, "steps": steps}, label=f"{label}, {steps} steps",
                   network_evaluations=steps, latent_space=f"{noise}; {how}", draw=draw, steps=steps)


def comparison_samplers(model, run=None, *, ddim_steps: int = DEFAULT_STEPS["ddim"]) -> list[Sampler]:
    """The full ``T``-step DDPM chain, DDIM with ``ddim_steps`` steps, DPM-Solver++ with 20 and its SDE form with
    50 (at most ``T``), in this order: the chain, the two ODE samplers, and the stochastic fast one, which on
    our Fashion-MNIST DDPM came within 6 % of the chain's FID where the ODE samplers stayed 13-21 % above
    (docs/speed.md)."""
    T = model.config.num_train_timesteps
    return [sampler(model, run, sampler="ddpm"), sampler(model, run, sampler="ddim", steps=ddim_steps),
            sampler(model, run, sampler="dpmsolver++", steps=min(DEFAULT_STEPS["dpmsolver++"], T)),
            sampler(model, run, sampler="sde-dpmsolver++", steps=min(DEFAULT_STEPS["sde-dpmsolver++"], T))]


def sample_labels(model, n: int) -> torch.Tensor | None:
    return cycle_labels(model, n)


def class_labels(model, index: int, n: int) -> torch.Tensor:
    return constant_labels(model, index, n)


def synthesis_methods(model) -> list[str]:
    """A class-conditional DDPM can draw each class from its prior; there is no latent code to take statistics of."""
    return ["prior"] if model.conditional else []
