"""The latent-diffusion family: diffusion over a frozen VAE run's latents (Rombach et al. 2022; ``vaelab.models.ldm``).

The training loss is the "simple" epsilon-prediction MSE per latent entry on the first stage's scaled
posterior means; there is no KL weight. Images are drawn with DPM-Solver++ (default, 20 steps), DDIM
or the ``T``-step ancestral sampler from the EMA weights, then decoded by the first stage; a
class-conditional model takes a classifier-free guidance scale as a sampler option
(``--sampler dpmsolver++:guidance=2``). See ``vaelab.families`` for the contract this module implements.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab import plots
from vaelab.data import ImageSplit
from vaelab.errors import ConfigError
from vaelab.families import ddpm
from vaelab.families.base import Sampler, constant_labels, cycle_labels
from vaelab.families.ddpm import VAE_ONLY
from vaelab.models.diffusion import DEFAULT_STEPS, SAMPLER_HOW, SAMPLER_NAMES, SAMPLERS, default_steps
from vaelab.models.ldm import first_stage_path

NAME = "ldm"
DESCRIPTION = "latent diffusion model on a frozen VAE first stage (DDPM, DDIM, DPM-Solver++ sampling)"
LOSS_UNIT = "epsilon-MSE per latent entry"
LOSS_FORMAT = ".4f"
TERMS: dict[str, str] = {}
USES_BETA = False
HEADLINE = ("test_eps_mse", "scale_factor", "parameters", "train_time_s", "train_images_per_s")
SWEEP_COLUMNS = [("eps_mse", "test eps-MSE", "test epsilon-MSE per latent entry")]
NOT_APPLICABLE = {
    "recon": "a latent diffusion model reconstructs nothing itself: the reconstructions are its first stage's "
             "(evaluate the first-stage run)",
    "rfid": "the reconstructions are its first stage's (evaluate the first-stage run with --metrics rfid)",
    "nll": "no likelihood bound is computed for latent diffusion",
    "latent": "the latent code is the first stage's (evaluate the first-stage run)",
    "disentanglement": "the latent code is the first stage's (evaluate the first-stage run)",
}
DEFAULT_SAMPLER = "dpmsolver++"
OPTIONS = {"guidance": "classifier-free guidance scale w >= 0 (1: conditional only; class-conditional models)"}

PICTURES = {
    "samples.png": "{n} samples: DPM-Solver++ with {steps} steps in latent space from the EMA weights, decoded by the first "
                   "stage{labels} (model trained on {source}).",
    "training_curves.png": "Epsilon-MSE per latent entry per epoch: train (running mean over the epoch on the {source} train "
                           "split) and validation (held-out part of the train split, end of each epoch).",
}


def resolve_config(config) -> None:
    """Reject VAE-only fields; ``first_stage`` is required and stored as an absolute path. When that run
    folder exists, its dataset and pixel range must be this run's (its weights are checked when the
    model is built, see ``vaelab.models.ldm.open_first_stage``).

    Raises:
        ConfigError: a VAE-only field is set, ``first_stage`` is missing, or the first stage was trained
            on another dataset or pixel range.
    """
    for name, unset in VAE_ONLY.items():
        if getattr(config, name) not in unset:
            raise ConfigError(f"{name}={getattr(config, name)!r} applies to VAEs only; model {config.model!r} is a latent "
                              "diffusion model (set it on the first stage's run instead)")
    if not config.first_stage:
        raise ConfigError(f"model {config.model!r} diffuses the latents of a trained VAE: give its run folder with "
                          "--first-stage RUN_DIR (first_stage: in a config file)")
    config.first_stage = first_stage_path(config.first_stage)
    if (Path(config.first_stage) / "config.yaml").is_file():  # a folder without one is refused when the model is built
        from vaelab.run import Run

        first_run = Run(config.first_stage)
        first = first_run.config
        for name in ("dataset", "pixel_range"):
            if getattr(first, name) != getattr(config, name):
                raise ConfigError(f"{name} {getattr(config, name)!r} differs from the first stage's ({getattr(first, name)!r} "
                                  f"in {first_run.path / 'config.yaml'}); a latent diffusion model trains on its first "
                                  "stage's data")


def data_defaults(config, stats) -> dict[str, str]:
    """No family defaults depend on the images (the shape is the first stage's)."""
    return {}


def prepare_model(model, train: ImageSplit, config) -> str:
    """The latent scale factor, once, from the train split (``LDM.set_scale_factor``); returns a line saying it."""
    scale = model.set_scale_factor(train.images, pixel_range=config.pixel_range)
    return f"latent scale factor {scale:.4g} (1 / std of the first stage's posterior means over {len(train):,} train images)"


# the loss is the DDPM's on latents instead of pixels: the same per-step hook, evaluation and lines
after_step, evaluate, epoch_line, epoch_warning = ddpm.after_step, ddpm.evaluate, ddpm.epoch_line, ddpm.epoch_warning


def summary(model, test: ImageSplit, config, metrics: dict) -> dict:
    import diffusers

    cfg = model.config
    return {
        "first_stage": cfg.first_stage,
        "first_stage_sha256": cfg.first_stage_sha256,
        "latent_shape": list(model.latent_shape),
        "scale_factor": float(model.scale_factor),
        "denoiser": cfg.denoiser,
        "num_timesteps": cfg.num_train_timesteps,
        "class_conditional": cfg.class_conditional,
        "label_dropout": cfg.label_dropout if cfg.class_conditional else None,
        "test_eps_mse": metrics["loss"],
        "units": "eps-MSE: mean squared error of the predicted noise per latent entry (latents scaled to unit variance "
                 "on the train split), one uniform t and noise draw per test image (trained weights, not the EMA)",
        "diffusers_version": diffusers.__version__,
    }


@torch.no_grad()
def write_pictures(run_dir: Path, model, data, rows: list[dict], config, metrics: dict) -> dict[str, str]:
    """``PICTURES``; returns ``{file: caption}`` of those written."""
    run_dir = Path(run_dir)
    model.eval()
    gen = torch.Generator(device=model.ema_updates.device).manual_seed(config.seed)
    written = []
    if rows:
        plots.loss_curves(rows, run_dir / "training_curves.png", ylabel="epsilon-MSE per latent entry")
        written.append("training_curves.png")
    steps = min(DEFAULT_STEPS[DEFAULT_SAMPLER], model.config.num_train_timesteps)
    n, labels = 64, ""
    y = None
    if model.conditional:  # one row of 8 per class
        k = model.config.num_classes
        n, y = 8 * k, torch.arange(k, device=gen.device).repeat_interleave(8)
        labels = ", one row of 8 per class, no guidance"
    images = model.sample(n, y=y, generator=gen, sampler=DEFAULT_SAMPLER, steps=steps)
    plots.save_grid(images, run_dir / "samples.png", nrow=8, pixel_range=model.config.pixel_range)
    written.append("samples.png")
    return {name: PICTURES[name].format(source=data.test.source, steps=steps, n=n, labels=labels) for name in written}


def log_images(writer, model, val: ImageSplit, epoch: int, seed: int) -> None:
    """No images per epoch: a sample costs many network evaluations."""


def sweep_metrics(summary: dict) -> dict:
    return {"eps_mse": summary["test_eps_mse"]}


def parse_sampler(spec: str | None) -> tuple[str, dict]:
    """``"dpmsolver++"``, ``"ddim:guidance=2"`` -> ``(name, {"guidance": w})`` (guidance 1 by default).

    Raises:
        ConfigError: unknown sampler or option, or a value that is not a number.
    """
    name, _, rest = (spec or DEFAULT_SAMPLER).partition(":")
    name = name.strip()
    if name not in SAMPLERS:
        raise ConfigError(f"unknown latent diffusion sampler {name!r}; valid: {', '.join(SAMPLERS)} "
                          f"(options: NAME:guidance=W)")
    options = {"guidance": 1.0}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if key.strip() not in OPTIONS or not eq:
            raise ConfigError(f"--sampler {spec!r}: unknown option {item!r}; valid: "
                              + "; ".join(f"{k}=... ({v})" for k, v in OPTIONS.items()))
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--sampler {spec!r}: {key.strip()} must be a number, got {value!r}") from None
    return name, options


def sampler(model, run=None, *, sampler: str | None = None, steps: int | None = None) -> Sampler:
    """``dpmsolver++`` (default, 20 steps), ``sde-dpmsolver++`` (its SDE form, 50 steps), ``ddim`` (eta 0, 50
    steps) or ``ddpm`` (ancestral, ``T`` steps) in
    latent space from the EMA weights, then the first stage's decoder; option ``guidance=W`` (classifier-free
    guidance, class-conditional models: two network evaluations per step unless ``W = 1``).

    Raises:
        ConfigError: unknown sampler or option, steps outside ``[1, T]``, guidance on an unconditional
            model or below 0 (checked now, before any sampling).
    """
    name, options = parse_sampler(sampler)
    guidance = model.check_guidance(options["guidance"])
    T = model.config.num_train_timesteps
    steps = steps if steps is not None else default_steps(name, T)
    model.make_scheduler(name, steps)  # raises for steps outside [1, T]
    shape = "x".join(map(str, model.latent_shape))
    how = SAMPLER_HOW[name]
    guided = model.conditional and guidance != 1.0
    spec = f"{name}:guidance={guidance:g}" if guided else name
    label = SAMPLER_NAMES[name] + f", {steps} steps"

    def draw(n: int, generator: torch.Generator | None, y: torch.Tensor | None) -> torch.Tensor:
        return model.sample(n, y=y, generator=generator, sampler=name, steps=steps, guidance=guidance, batch_size=n)

    return Sampler(name=name, options={"sampler": spec, "steps": steps, **({"guidance": guidance} if model.conditional else {})},
                   label=label + (f", guidance {guidance:g}" if guided else ""),
                   # denoiser passes, as for a pixel DDPM (speed extrapolation scales with them); the one decoder
                   # pass at the end is not counted
                   network_evaluations=steps * (2 if guided else 1),
                   latent_space=f"z_T ~ N(0, I) in R^{shape} (the first stage's posterior-mean space scaled by "
                                f"{float(model.scale_factor):.4g}); {how}; decoded by the first stage",
                   draw=draw, steps=steps)


def comparison_samplers(model, run=None, *, ddim_steps: int = DEFAULT_STEPS["ddim"]) -> list[Sampler]:
    """DPM-Solver++ with 20 steps, then DDIM with ``ddim_steps`` steps (no guidance)."""
    return [sampler(model, run, sampler="dpmsolver++"), sampler(model, run, sampler="ddim", steps=ddim_steps)]


def sample_labels(model, n: int) -> torch.Tensor | None:
    return cycle_labels(model, n)


def class_labels(model, index: int, n: int) -> torch.Tensor:
    return constant_labels(model, index, n)


def synthesis_methods(model) -> list[str]:
    """A class-conditional LDM draws each class from its own sampler (guidance as a sampler option)."""
    return ["prior"] if model.conditional else []
