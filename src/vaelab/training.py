"""The training loop, one for every model family: Adam, ReduceLROnPlateau, gradient clipping, KL-weight
schedules, checkpoints, and a guard that stops at the first non-finite loss or gradient.

``train(config)`` validates everything (config, data, model shape) before it creates the run
folder, then writes, every epoch, a ``metrics.jsonl`` row and a checkpoint, and at the end the
pictures and ``summary.json`` (see ``vaelab.run`` for the folder layout). ``resume(RUN_DIR)``
continues a run from its newest checkpoint. What differs between model families (loss terms,
validation metrics, progress line, summary fields, pictures) comes from ``vaelab.families``.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vaelab import tblog
from vaelab.config import TrainConfig, with_overrides
from vaelab.data import ImageSplit, RunData, batches
from vaelab.errors import VaelabError
from vaelab.families import family_of
from vaelab.losses import beta_at
from vaelab.models import build_config, build_model, count_parameters, model_fields
from vaelab.run import Run, checkpoint_dirs, run_data
from vaelab.runtime import provenance, seed_everything, select_device, synchronize

NONFINITE_HINT = ("lower --lr, keep gradient clipping on (grad_clip), or check the data for NaN/constant images; "
                  "resume from the newest finite checkpoint with --resume RUN_DIR")


class NonFiniteError(VaelabError):
    """A loss term, gradient norm or evaluation number became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------- set-up


def prepare(config: TrainConfig, *, resume_from: str | Path | None = None):
    """Validate a run before anything is written: resolved config, device, data and model config.

    Returns:
        ``(config, device, data, model_config)``, the data on ``device``.

    Raises:
        ConfigError, DataError, VaelabError: the first problem found, named.
    """
    config = config.resolved()
    device = select_device(config.device)
    data = run_data(config).to(device)
    overrides = config.model_overrides()
    if "num_classes" in model_fields(config.model):  # conditional models size their label input from the data
        overrides["num_classes"] = len(data.train.classes)
    model_config = build_config(config.model, data_shape=data.train.shape, **overrides)
    if config.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        config.out = str(Path("runs") / f"{config.dataset}-{config.model}-{stamp}")
    if resume_from is None and checkpoint_dirs(config.out):
        raise VaelabError(f"{config.out} already holds a run; use --resume {config.out} or another --out")
    return config, device, data, model_config


def resume(run_dir: str | Path, *, epochs: int | None = None, device: str | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint, up to ``epochs`` (default: its own).

    Raises:
        VaelabError: ``run_dir`` has no ``config.yaml`` or no complete checkpoint.
    """
    run = Run(run_dir)
    run.last_checkpoint()
    config = with_overrides(run.config, {"out": str(run.path), "epochs": epochs, "device": device})
    return train(config, resume_from=run.path)


def _restore_generator(gen: torch.Generator, state: dict, seed: int) -> str | None:
    """Set ``gen`` to the saved state; a state saved on another device kind (CPU and CUDA generators keep
    different states) cannot be transferred, so ``gen`` is re-seeded from ``seed`` and the epoch instead.
    Returns a note for people in that case."""
    saved_on = state.get("generator_device") or ("cpu" if state["generator"].numel() > 16 else "cuda")
    if saved_on == gen.device.type:
        try:
            gen.set_state(state["generator"])
            return None
        except RuntimeError:
            pass
    gen.manual_seed(seed + state["epoch"])
    return (f"note: the checkpoint's random generator was saved on {saved_on}, this run continues on "
            f"{gen.device.type}: batch order and noise from here on are re-seeded (seed {seed} + epoch "
            f"{state['epoch']}), so they differ from an uninterrupted run on one device")


class _NonFiniteWatch:
    """Remembers, on the device, the first step at which any watched value was NaN or infinite, and
    which values those were, so the hot loop needs no host synchronisation; ``check`` reads it."""

    def __init__(self, names: list[str], device: torch.device):
        self.names = names
        self.first = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad = torch.zeros(len(names), dtype=torch.bool, device=device)

    def update(self, step: int, values: torch.Tensor) -> None:
        bad = ~torch.isfinite(values)
        new = bad.any() & (self.first < 0)
        self.first = torch.where(new, step, self.first)
        self.bad = torch.where(new, bad, self.bad)

    def check(self, epoch: int, lr: float) -> None:
        first = int(self.first)
        if first >= 0:
            names = [n for n, b in zip(self.names, self.bad.tolist()) if b]
            raise NonFiniteError(f"non-finite {', '.join(names)} at epoch {epoch}, step {first + 1} (lr {lr:.3g}): "
                                 f"training stopped, nothing after the last checkpoint was saved. Hint: {NONFINITE_HINT}")


def _check_finite(values: dict, what: str, epoch: int) -> None:
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"non-finite {what} {', '.join(bad)} at the end of epoch {epoch}: training stopped, "
                             f"nothing of this epoch was saved. Hint: {NONFINITE_HINT}")


# ---------------------------------------------------------------------------- the loop


def train(config: TrainConfig, *, resume_from: str | Path | None = None) -> Path:
    """Train the model described by ``config`` and write its run folder.

    Args:
        config: the run's settings (see ``TrainConfig``).
        resume_from: the run folder to continue (use ``resume()``, which loads its saved config).

    Returns:
        The run folder.

    Raises:
        ConfigError, DataError, VaelabError: bad input, before the run folder is created.
        NonFiniteError: a loss term, gradient norm or validation number became NaN/inf; the newest
            finite checkpoint is kept and ``--resume`` continues from it.
    """
    config, device, data, model_config = prepare(config, resume_from=resume_from)
    seed_everything(config.seed)
    model = build_model(model_config).to(device)
    family = family_of(model)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    gen = torch.Generator(device=device).manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    anneal_steps = config.kl_anneal_steps or (config.kl_anneal_epochs or 0) * steps_per_epoch

    start_epoch, step, elapsed = 1, 0, 0.0
    if resume_from is not None:
        run = Run(resume_from)
        ckpt = run.last_checkpoint()
        state = run.trainer_state(ckpt)
        model.load_state_dict(run.load_model(checkpoint=ckpt).state_dict())
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        note = _restore_generator(gen, state, config.seed)
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step, elapsed = state["epoch"] + 1, state["step"], state["elapsed_s"]
        dropped = run.drop_metrics_after(state["epoch"])
        print(f"resuming {run.path} from {ckpt.name}" + (f" ({dropped} metrics row(s) of unsaved epochs dropped)" if dropped else ""))
        if note:
            print(note)
    else:
        run = Run.create(config)
    rows = run.metrics()
    print(f"training {config.model} ({count_parameters(model):,} parameters, {family.DESCRIPTION}) on "
          f"{data.train.source}: {len(data.train):,} train / {len(data.val):,} val / {len(data.test):,} test images, "
          f"device {device}")

    def beta_for(s: int) -> float:
        return beta_at(s, beta=config.beta, schedule=config.beta_schedule, anneal_steps=anneal_steps,
                       total_steps=total_steps, cycles=config.kl_cycles, ratio=config.kl_cycle_ratio)

    terms = tuple(family.TERMS)  # per-image loss terms tracked beside the loss (for the metrics row)
    tb = tblog.open_writer(run.path, enabled=config.tensorboard, purge_step=start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t0 = time.perf_counter()
            sums, step, beta = _train_epoch(model, opt, data.train, config, gen, step=step, epoch=epoch, beta_for=beta_for)
            synchronize(device)
            epoch_time = time.perf_counter() - t0
            elapsed += epoch_time
            loss, *means, n = sums.tolist()
            val = family.evaluate(model, data.val, beta=config.beta, seed=config.seed)
            _check_finite(val, "validation", epoch)
            sched.step(val["loss"])
            row = {
                "epoch": epoch, "step": step, **({"beta": beta} if family.USES_BETA else {}), "lr": opt.param_groups[0]["lr"],
                "train_loss": loss / n, **{f"train_{k}": v / n for k, v in zip(terms, means)},
                **{f"val_{k}": v for k, v in val.items()},
                "epoch_time_s": epoch_time, "images_per_s": n / epoch_time,
            }
            run.append_metrics(row)
            rows.append(row)
            tblog.log_epoch(tb, row, model, data.val, seed=config.seed)
            tqdm.write(f"epoch {epoch}/{config.epochs}  {family.epoch_line(row, model)} | lr {row['lr']:.2g} | "
                       f"{epoch_time:.1f}s {row['images_per_s']:.0f} img/s")
            warning = family.epoch_warning(rows)
            if warning:
                tqdm.write(warning)
            run.save_checkpoint(epoch, model, {
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "generator": gen.get_state(),
                "generator_device": device.type, "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step,
                "elapsed_s": elapsed,
            })
    finally:
        if tb is not None:
            tb.close()
    finalize(run, model, data, config, train_time_s=elapsed, device=device)
    return run.path


def _train_epoch(model, opt, train: ImageSplit, config: TrainConfig, gen: torch.Generator, *, step: int, epoch: int,
                 beta_for) -> tuple[torch.Tensor, int, float]:
    """One pass over ``train``. Returns the device-side sums ``[loss * n, *terms, n]``, the global step
    after the epoch and the last KL weight. Raises ``NonFiniteError`` at the first sync after a NaN/inf."""
    family = family_of(model)
    terms = tuple(family.TERMS)
    device = train.images.device
    model.train()
    sums = torch.zeros(2 + len(terms), device=device)  # on the device: no per-step host sync
    watch = _NonFiniteWatch(["loss", *terms, "gradient norm"], device)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    beta = beta_for(step)
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False) as bar:
        for i, (x, y) in enumerate(batches(train.images, train.labels, config.batch_size, shuffle=True,
                                           augment_data=config.augment, pixel_range=config.pixel_range, generator=gen)):
            beta = beta_for(step)
            if config.binarize:  # dynamic binarisation: a fresh binary image every time (Salakhutdinov & Murray 2008)
                x = torch.bernoulli(x, generator=gen)
            out = model.loss(x, beta=beta, y=y, generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            opt.step()
            family.after_step(model)
            term_sums = [getattr(out, k).detach().sum() for k in terms]
            watch.update(step, torch.stack([out.loss.detach(), *term_sums, grad_norm]))
            step += 1
            sums += torch.stack([out.loss.detach() * len(x), *term_sums, torch.tensor(float(len(x)), device=device)])
            bar.update(1)
            if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
                watch.check(epoch, opt.param_groups[0]["lr"])
                loss, *means, n = sums.tolist()
                bar.set_postfix(loss=f"{loss / n:{family.LOSS_FORMAT}}", **{k: f"{v / n:.2f}" for k, v in zip(terms, means)},
                                **({"beta": f"{beta:.3g}"} if family.USES_BETA else {}), lr=f"{opt.param_groups[0]['lr']:.2g}")
    return sums, step, beta


def finalize(run: Run, model, data: RunData, config: TrainConfig, *, train_time_s: float, device) -> dict:
    """Test-split evaluation, the run's pictures, then ``summary.json`` (its presence marks a finished run)."""
    family = family_of(model)
    model.eval()
    test = family.evaluate(model, data.test, beta=config.beta, seed=config.seed, keep_latents=True)
    rows = run.metrics()
    _check_finite(test, "test", rows[-1]["epoch"] if rows else 0)
    images_seen = sum(r["images_per_s"] * r["epoch_time_s"] for r in rows)
    summary = {
        "dataset": data.test.source,
        "split": "test",
        "num_test_images": len(data.test),
        "model": config.model,
        "family": family.NAME,
        "parameters": count_parameters(model),
        "epochs": rows[-1]["epoch"] if rows else 0,
        "steps": rows[-1]["step"] if rows else 0,
        **family.summary(model, data.test, config, test),
        "train_time_s": train_time_s,
        "train_images_per_s": images_seen / train_time_s if train_time_s else None,
        **provenance(device, config.seed),
    }
    summary["captions"] = family.write_pictures(run.path, model, data, rows, config, test)
    run.write_summary(summary)
    return summary
