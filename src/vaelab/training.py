"""The VAE training recipe: Adam, ReduceLROnPlateau, gradient clipping, beta schedules, checkpoints.

``train(config)`` validates everything (config, data, model shape) before it creates the run
folder, then writes, every epoch, a ``metrics.jsonl`` row and a checkpoint, and at the end
``summary.json`` and the pictures. ``resume(RUN_DIR)`` continues a run.

Run folder::

    config.yaml  metrics.jsonl  summary.json  tb/ (TensorBoard events)  checkpoints/epoch-NNNN/{model.safetensors,config.json,trainer_state.pt}
    training_curves.png  reconstructions.png  samples.png  interpolation.png  latent_mu_pca.png  latent_sigma_pca.png
    per_class_samples.png (conditional models: one row per class, one z per column)
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vaelab
from vaelab import plots, tblog
from vaelab.config import TrainConfig, config_from_dict, load_config
from vaelab.data import ImageSplit, batches, load_split, split_validation
from vaelab.errors import ConfigError, VaelabError
from vaelab.io import append_jsonl, git_sha, read_jsonl, write_json, write_yaml
from vaelab.losses import beta_at, likelihood_note
from vaelab.models import build_config, build_model, load_model, model_fields, save_model

ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015), section 5.2
COLLAPSE_KL_NATS = 0.1


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; otherwise ``torch.device(name)``.

    Raises:
        ConfigError: the named device is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available; use --device cpu or auto")
    return dev


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class RunData:
    """The three splits of a run, on the training device."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit


def binarize_split(split: ImageSplit, seed: int) -> ImageSplit:
    """A copy of ``split`` with every pixel resampled once as 0 or 255 with probability ``v / 255``
    (stochastic binarisation, seeded; the fixed evaluation set of a dynamically binarised run)."""
    gen = torch.Generator(device=split.images.device).manual_seed(seed)
    p = split.images.float().div(255.0)
    images = (torch.bernoulli(p, generator=gen) * 255).to(torch.uint8)
    return ImageSplit(images, split.labels, split.classes, f"{split.source}, binarised (seed {seed})", split.name)


def load_run_data(config: TrainConfig, device: torch.device | str = "cpu") -> RunData:
    """Train/val/test splits for ``config`` (subsets applied, validation held out with ``config.seed``;
    with ``config.binarize`` validation and test images are binarised once, see ``binarize_split``)."""
    train = load_split(config.dataset, "train", config.data_root)
    test = load_split(config.dataset, "test", config.data_root)
    if train.shape != test.shape:
        raise VaelabError(f"{config.dataset}: train images are {train.shape} but test images are {test.shape}")
    if train.classes != test.classes:
        raise VaelabError(f"{config.dataset}: train classes {train.classes} differ from test classes {test.classes}")
    if config.train_subset:
        train = train.subset(slice(0, config.train_subset))
    if config.test_subset:
        test = test.subset(slice(0, config.test_subset))
    train, val = split_validation(train, config.val_fraction, config.seed)
    if config.binarize:
        val, test = binarize_split(val, config.seed), binarize_split(test, config.seed)
    return RunData(train.to(device), val.to(device), test.to(device))


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model,
    split: ImageSplit,
    *,
    beta: float = 1.0,
    batch_size: int = 500,
    pixel_range: str = "[0,1]",
    seed: int = 0,
    keep_latents: bool = False,
) -> dict:
    """Mean loss terms of ``model`` over ``split`` (one ``z`` sample per image, seeded).

    Returns:
        dict with ``loss`` (recon + beta*kl), ``recon``, ``kl``, ``neg_elbo`` (nats per image),
        ``mse`` (per pixel), ``mu_mean``, ``logvar_mean``, ``active_units`` (dims with
        Cov_x(E_q[z_i]) > 0.01, Burda et al. 2015) and, if ``keep_latents``, ``mu`` and ``logvar``
        as ``(N, latent_dim)`` CPU tensors. For a diffusion model (``model.kind == "ddpm"``): only
        ``loss``, the mean epsilon-prediction MSE per pixel (one seeded ``t`` and noise per image).
    """
    if model.kind == "ddpm":
        return _evaluate_denoising(model, split, batch_size=batch_size, pixel_range=pixel_range, seed=seed)
    was_training = model.training
    model.eval()
    device = split.images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(4, device=device)  # recon, kl, mse, n
    mus, logvars = [], []
    for x, y in batches(split.images, split.labels, batch_size, pixel_range=pixel_range):
        out = model.loss(x, beta=beta, y=y if model.conditional else None, generator=gen)
        sums += torch.stack([out.recon.sum(), out.kl.sum(), out.mse.sum(), torch.tensor(float(len(x)), device=device)])
        mus.append(out.mu)
        logvars.append(out.logvar)
    model.train(was_training)
    recon, kl, mse, n = sums.tolist()
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    result = {
        "loss": (recon + beta * kl) / n,
        "recon": recon / n,
        "kl": kl / n,
        "neg_elbo": (recon + kl) / n,
        "mse": mse / n,
        "mu_mean": mu.mean().item(),
        "logvar_mean": logvar.mean().item(),
        "active_units": active_units(mu),
    }
    if keep_latents:
        result["mu"], result["logvar"] = mu.cpu(), logvar.cpu()
    return result


@torch.no_grad()
def _evaluate_denoising(model, split: ImageSplit, *, batch_size: int, pixel_range: str, seed: int) -> dict:
    was_training = model.training
    model.eval()
    device = split.images.device
    gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(2, device=device)  # eps_mse, n
    for x, y in batches(split.images, split.labels, batch_size, pixel_range=pixel_range):
        out = model.loss(x, y=y if model.conditional else None, generator=gen)
        sums += torch.stack([out.eps_mse.sum(), torch.tensor(float(len(x)), device=device)])
    model.train(was_training)
    eps_mse, n = sums.tolist()
    return {"loss": eps_mse / n}


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of latent dims whose posterior mean varies across data: ``Var_x(mu_i) > threshold``.

    Args:
        mu: ``(N, latent_dim)`` posterior means over a dataset (N >= 2).
    """
    return int((mu.float().var(dim=0) > threshold).sum().item())


# ---------------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.glob("epoch-*") if p.is_dir() and (p / "trainer_state.pt").exists())


def last_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete ``checkpoints/epoch-NNNN`` folder of a run.

    Raises:
        VaelabError: the folder has no complete checkpoint.
    """
    run_dir = Path(run_dir)
    dirs = _checkpoint_dirs(run_dir)
    if not dirs:
        raise VaelabError(f"{run_dir} has no checkpoint (expected {run_dir}/checkpoints/epoch-NNNN/trainer_state.pt)")
    return dirs[-1]


def load_run_model(run_dir: str | Path, device: torch.device | str = "cpu"):
    """The model of the newest checkpoint of ``run_dir``, in eval mode on ``device``."""
    return load_model(last_checkpoint(run_dir), device=device)


def _save_checkpoint(run_dir: Path, epoch: int, model, state: dict) -> None:
    """Write ``checkpoints/epoch-NNNN`` atomically (temp folder, then rename) and drop older ones."""
    ckpt = run_dir / "checkpoints"
    final = ckpt / f"epoch-{epoch:04d}"
    tmp = ckpt / f".epoch-{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp)
    torch.save(state, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in _checkpoint_dirs(run_dir):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- training


def prepare(config: TrainConfig, *, resume_from: str | Path | None = None):
    """Validate a run before anything is written: resolved config, device, data and model config.

    Raises:
        ConfigError, DataError, VaelabError: the first problem found, named.
    """
    config = config.resolved()
    device = select_device(config.device)
    data = load_run_data(config, device)
    overrides = config.model_overrides()
    if "num_classes" in model_fields(config.model):  # conditional models size their label input from the data
        overrides["num_classes"] = len(data.train.classes)
    model_config = build_config(config.model, data_shape=data.train.shape, **overrides)
    if config.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        config.out = str(Path("runs") / f"{config.dataset}-{config.model}-{stamp}")
    run_dir = Path(config.out)
    if resume_from is None and _checkpoint_dirs(run_dir):
        raise VaelabError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    return config, device, data, model_config


def resume(run_dir: str | Path, *, epochs: int | None = None, device: str | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint, up to ``epochs`` (default: its own).

    Raises:
        VaelabError: ``run_dir`` has no ``config.yaml`` or no complete checkpoint.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise VaelabError(f"--resume {run_dir}: no config.yaml there; expected a run folder written by 'vaelab train'")
    last_checkpoint(run_dir)
    config = load_config(run_dir / "config.yaml")
    overrides = {"out": str(run_dir), "epochs": epochs, "device": device}
    config = config_from_dict({**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    return train(config, resume_from=run_dir)


def train(config: TrainConfig, *, resume_from: str | Path | None = None) -> Path:
    """Train a VAE as described by ``config`` and write its run folder.

    Args:
        config: the run's settings (see ``TrainConfig``).
        resume_from: the run folder to continue (use ``resume()``, which loads its saved config).

    Returns:
        The run folder.

    Raises:
        ConfigError, DataError, VaelabError: bad input, before the run folder is created.
    """
    config, device, data, model_config = prepare(config, resume_from=resume_from)
    run_dir = Path(config.out)
    seed_everything(config.seed)
    model = build_model(model_config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    anneal_steps = config.kl_anneal_steps or (config.kl_anneal_epochs or 0) * steps_per_epoch

    start_epoch, step, elapsed, low_kl_epochs = 1, 0, 0.0, 0
    if resume_from is not None:
        ckpt = last_checkpoint(run_dir)
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(load_model(ckpt).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        elapsed, low_kl_epochs = state["elapsed_s"], state["low_kl_epochs"]
        print(f"resuming {run_dir} from {ckpt.name}")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_yaml(run_dir / "config.yaml", config.to_dict())
    print(
        f"training {config.model} ({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters) on "
        f"{data.train.source}: {len(data.train):,} train / {len(data.val):,} val / {len(data.test):,} test images, "
        f"device {device}"
    )
    tb = tblog.open_writer(run_dir, enabled=config.tensorboard, purge_step=start_epoch)

    def beta_for(s: int) -> float:
        return beta_at(s, beta=config.beta, schedule=config.beta_schedule, anneal_steps=anneal_steps,
                       total_steps=total_steps, cycles=config.kl_cycles, ratio=config.kl_cycle_ratio)

    vae = model.kind == "vae"
    terms = ("recon", "kl") if vae else ()  # per-image loss terms tracked beside the loss
    fmt = ".2f" if vae else ".4f"  # nats per image vs. epsilon-MSE per pixel
    for epoch in range(start_epoch, config.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(2 + len(terms), device=device)  # loss, *terms, n (device-side: no per-step host sync)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False)
        for i, (x, y) in enumerate(batches(data.train.images, data.train.labels, config.batch_size, shuffle=True,
                                           augment_data=config.augment, pixel_range=config.pixel_range, generator=gen)):
            beta = beta_for(step)
            if config.binarize:  # dynamic binarisation: a fresh binary image every time (Salakhutdinov & Murray 2008)
                x = torch.bernoulli(x, generator=gen)
            out = model.loss(x, beta=beta, y=y if model.conditional else None, generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            if model.kind == "ddpm":
                model.update_ema()
            step += 1
            sums += torch.stack([out.loss.detach() * len(x), *(getattr(out, k).detach().sum() for k in terms),
                                 torch.tensor(float(len(x)), device=device)])
            bar.update(1)
            if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
                loss, *term_sums, n = sums.tolist()
                bar.set_postfix(loss=f"{loss / n:{fmt}}", **{k: f"{v / n:.2f}" for k, v in zip(terms, term_sums)},
                                **({"beta": f"{beta:.3g}"} if vae else {}), lr=f"{opt.param_groups[0]['lr']:.2g}")
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        elapsed += epoch_time
        loss, *term_sums, n = sums.tolist()
        val = evaluate(model, data.val, beta=config.beta, pixel_range=config.pixel_range, seed=config.seed)
        sched.step(val["loss"])
        low_kl_epochs = low_kl_epochs + 1 if vae and val["kl"] < COLLAPSE_KL_NATS else 0
        row = {
            "epoch": epoch, "step": step, **({"beta": beta} if vae else {}), "lr": opt.param_groups[0]["lr"],
            "train_loss": loss / n, **{f"train_{k}": v / n for k, v in zip(terms, term_sums)},
            **{f"val_{k}": v for k, v in val.items()},
            "epoch_time_s": epoch_time, "images_per_s": n / epoch_time,
        }
        append_jsonl(run_dir / "metrics.jsonl", row)
        tblog.log_epoch(tb, row, model, data.val, seed=config.seed)
        if not vae:
            tqdm.write(
                f"epoch {epoch}/{config.epochs}  train eps-MSE {row['train_loss']:.4f} | val eps-MSE {val['loss']:.4f} | "
                f"lr {row['lr']:.2g} | {epoch_time:.1f}s {row['images_per_s']:.0f} img/s"
            )
        else:
            tqdm.write(
                f"epoch {epoch}/{config.epochs}  train loss {row['train_loss']:.2f} recon {row['train_recon']:.2f} "
                f"kl {row['train_kl']:.2f} | val loss {val['loss']:.2f} recon {val['recon']:.2f} kl {val['kl']:.2f} | "
                f"mu mean {val['mu_mean']:+.3f} logvar mean {val['logvar_mean']:+.3f} | active units "
                f"{val['active_units']}/{model_config.latent_dim} | beta {beta:.3g} lr {row['lr']:.2g} | "
                f"{epoch_time:.1f}s {row['images_per_s']:.0f} img/s"
            )
        if low_kl_epochs >= 2:
            tqdm.write(
                f"WARNING: posterior collapse: validation KL is {val['kl']:.3f} nats/image (< {COLLAPSE_KL_NATS}) for "
                f"{low_kl_epochs} epochs in a row; the decoder is ignoring z. Try a smaller beta, KL annealing "
                "(--kl-anneal-epochs) or a cyclical schedule."
            )
        _save_checkpoint(run_dir, epoch, model, {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step, "elapsed_s": elapsed,
            "low_kl_epochs": low_kl_epochs,
        })

    if tb is not None:
        tb.close()
    finalize(run_dir, model, data, config, train_time_s=elapsed, device=device)
    return run_dir


def finalize(run_dir: Path, model, data: RunData, config: TrainConfig, *, train_time_s: float, device) -> dict:
    """Test-split evaluation, ``summary.json`` and the run's pictures."""
    model.eval()
    if model.kind == "ddpm":
        return _finalize_ddpm(run_dir, model, data, config, train_time_s=train_time_s, device=device)
    test = evaluate(model, data.test, beta=config.beta, pixel_range=config.pixel_range, seed=config.seed, keep_latents=True)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    images_seen = sum(r["images_per_s"] * r["epoch_time_s"] for r in rows)
    c, h, w = data.test.shape
    discrete, likelihood = likelihood_note(model.config.recon_likelihood, data.test.images)
    summary = {
        "dataset": data.test.source,
        "split": "test",
        "num_test_images": len(data.test),
        "model": config.model,
        "latent_dim": model.config.latent_dim,
        "recon_likelihood": model.config.recon_likelihood,
        "epochs": rows[-1]["epoch"] if rows else 0,
        "test_recon_nats": test["recon"],
        "test_kl_nats": test["kl"],
        "test_neg_elbo_nats": test["neg_elbo"],
        "test_neg_elbo_bits_per_dim": test["neg_elbo"] / (c * h * w * math.log(2)) if discrete else None,
        "test_mse_per_pixel": test["mse"],
        "active_units": test["active_units"],
        "train_time_s": train_time_s,
        "train_images_per_s": images_seen / train_time_s if train_time_s else None,
        "units": f"recon/KL/-ELBO in nats per image (one z sample); MSE per pixel on {model.config.pixel_range} pixels",
        "likelihood": likelihood,
        **_provenance(device, config.seed),
    }
    write_json(run_dir / "summary.json", summary)
    plots.write_run_pictures(run_dir, model, data.test, test["mu"], test["logvar"], rows, config)
    return summary


def _provenance(device, seed: int) -> dict:
    return {
        "device": str(device),
        "seed": seed,
        "vaelab_version": vaelab.__version__,
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
    }


def _finalize_ddpm(run_dir: Path, model, data: RunData, config: TrainConfig, *, train_time_s: float, device) -> dict:
    """``summary.json`` (test epsilon-MSE) and the pictures of a diffusion run."""
    import diffusers

    test = evaluate(model, data.test, pixel_range=config.pixel_range, seed=config.seed)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    images_seen = sum(r["images_per_s"] * r["epoch_time_s"] for r in rows)
    summary = {
        "dataset": data.test.source,
        "split": "test",
        "num_test_images": len(data.test),
        "model": config.model,
        "parameters": model.num_parameters,
        "num_timesteps": model.config.num_train_timesteps,
        "class_conditional": model.config.class_conditional,
        "epochs": rows[-1]["epoch"] if rows else 0,
        "steps": rows[-1]["step"] if rows else 0,
        "test_eps_mse": test["loss"],
        "train_time_s": train_time_s,
        "train_images_per_s": images_seen / train_time_s if train_time_s else None,
        "units": "eps-MSE: mean squared error of the predicted noise per pixel, one uniform t and noise draw per "
                 "test image (trained weights, not the EMA)",
        "pictures": plots.DDPM_PICTURES,
        **_provenance(device, config.seed),
        "diffusers_version": diffusers.__version__,
    }
    write_json(run_dir / "summary.json", summary)
    plots.write_ddpm_pictures(run_dir, model, rows, config)
    return summary
