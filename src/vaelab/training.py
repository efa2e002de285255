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
from vaelab.data import ImageSplit, RunData, batches, global_batches
from vaelab.errors import VaelabError
from vaelab.families import family_of
from vaelab.losses import beta_at
from vaelab.models import build_config, build_model, count_parameters, model_fields
from vaelab.run import Run, checkpoint_dirs, run_data
from vaelab.runtime import (
    Distributed,
    autocast,
    derive_seed,
    distributed,
    provenance,
    resolve_precision,
    seed_everything,
    synchronize,
)

NONFINITE_HINT = ("lower --lr, keep gradient clipping on (grad_clip), or check the data for NaN/constant images; "
                  "resume from the newest finite checkpoint with --resume RUN_DIR")


class NonFiniteError(VaelabError):
    """A loss term, gradient norm or evaluation number became NaN or infinite; training stopped."""


# ---------------------------------------------------------------------------- set-up


def prepare(config: TrainConfig, *, resume_from: str | Path | None = None):
    """Validate a run before anything is written: resolved config, device, precision, data and model config.

    Returns:
        ``(config, dist, device, data, model_config)``, the data on ``device``; ``config.precision``
        and ``config.channels_last`` resolved for the device.

    Raises:
        ConfigError, DataError, VaelabError: the first problem found, named.
    """
    requested, config = config, config.resolved()  # validated before any data is read
    dist, device = distributed(config.device)
    data = run_data(config).to(device)
    config = requested.resolved(data=data.train)  # image folders: unset fields derived from the images
    if config.data_defaults and resume_from is None:
        say(dist, "defaults derived from the data (written to config.yaml):\n"
            + "\n".join(f"  {k}: {v}" for k, v in config.data_defaults.items()))
    config.precision = resolve_precision(config.precision, device)
    if config.channels_last is None:
        config.channels_last = device.type == "cuda"  # measured: no gain on the CPU (README, "Speed")
    overrides = config.model_overrides()
    if "num_classes" in model_fields(config.model):  # conditional models size their label input from the data
        overrides["num_classes"] = len(data.train.classes)
    if "dataset_size" in model_fields(config.model):  # estimators of the aggregate posterior q(z) weight by N
        overrides["dataset_size"] = len(data.train)
    model_config = build_config(config.model, data_shape=data.train.shape, **overrides)
    if config.out is None:
        stamp = dist.broadcast(datetime.now().strftime("%Y%m%d-%H%M%S"))
        config.out = str(Path("runs") / f"{config.dataset}-{config.model}-{stamp}")
    if resume_from is None and checkpoint_dirs(config.out):
        raise VaelabError(f"{config.out} already holds a run; use --resume {config.out} or another --out")
    return config, dist, device, data, model_config


def resume(run_dir: str | Path, *, epochs: int | None = None, device: str | None = None) -> Path:
    """Continue the run in ``run_dir`` from its newest checkpoint, up to ``epochs`` (default: its own).

    A new ``epochs`` is written into the run's ``config.yaml`` (a later resume continues to it). Schedules
    defined over the whole run (a ``cyclical`` β) follow the new length from the resumed epoch on.

    Raises:
        VaelabError: ``run_dir`` has no ``config.yaml`` or no complete checkpoint.
    """
    run = Run(run_dir)
    run.last_checkpoint()
    config = with_overrides(run.config, {"out": str(run.path), "epochs": epochs, "device": device})
    return train(config, resume_from=run.path)


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
    config, dist, device, data, model_config = prepare(config, resume_from=resume_from)
    seed_everything(config.seed)
    model = build_model(model_config).to(device)
    family = family_of(model)
    if resume_from is None:
        note = family.prepare_model(model, data.train, config)  # data-dependent set-up, kept in the checkpoints
        if note:
            say(dist, note)
    if dist.active and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over all ranks
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=config.lr_factor, patience=config.lr_patience)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    steps_per_epoch = sum(1 for _ in global_batches(len(data.train), config.batch_size, world_size=dist.world_size))
    total_steps = steps_per_epoch * config.epochs
    anneal_steps = config.kl_anneal_steps or (config.kl_anneal_epochs or 0) * steps_per_epoch

    start_epoch, step, elapsed = 1, 0, 0.0
    if resume_from is not None:
        run = Run(resume_from)
        ckpt = run.last_checkpoint()
        state = run.trainer_state(ckpt)
        model.load_state_dict(run.load_model(checkpoint=ckpt).state_dict())
        opt.load_state_dict(state["optimizer"])  # moves the optimizer state to the parameters' device
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step, elapsed = state["epoch"] + 1, state["step"], state["elapsed_s"]
        dropped = run.drop_metrics_after(state["epoch"]) if dist.main else 0
        if dist.main and run.config.epochs != config.epochs:  # --resume --epochs N: config.yaml says what the run is now
            run.write_config(with_overrides(run.config, {"epochs": config.epochs}))
        say(dist, f"resuming {run.path} from {ckpt.name}" + (f" ({dropped} metrics row(s) of unsaved epochs dropped)" if dropped else ""))
    else:
        run = Run.create(config) if dist.main else None
        dist.barrier()
        run = run or Run(config.out)
    net = torch.nn.parallel.DistributedDataParallel(model) if dist.active else model  # gradients averaged over ranks
    if config.compile:
        net = torch.compile(net)
    rows = run.metrics()
    say(dist, f"training {config.model} ({count_parameters(model):,} parameters, {family.DESCRIPTION}) on "
              f"{data.train.source}: {len(data.train):,} train / {len(data.val):,} val / {len(data.test):,} test images, "
              f"device {device}, {config.precision}" + (f", {dist.world_size} processes" if dist.active else ""))

    def beta_for(s: int) -> float:
        return beta_at(s, beta=config.beta, schedule=config.beta_schedule, anneal_steps=anneal_steps,
                       total_steps=total_steps, cycles=config.kl_cycles, ratio=config.kl_cycle_ratio)

    terms = tuple(family.TERMS)  # per-image loss terms tracked beside the loss (for the metrics row)
    tb = tblog.open_writer(run.path, enabled=config.tensorboard and dist.main, purge_step=start_epoch)
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            t0, cpu0 = time.perf_counter(), time.process_time()
            sums, step, beta = _train_epoch(net, model, opt, scaler, data.train, config, dist, step=step, epoch=epoch,
                                            beta_for=beta_for)
            synchronize(device)
            epoch_time, epoch_cpu = time.perf_counter() - t0, time.process_time() - cpu0
            elapsed += epoch_time
            loss, *means, n = dist.all_reduce(sums).tolist()
            val = family.evaluate(model, data.val, beta=config.beta, seed=config.seed, dist=dist)
            _check_finite(val, "validation", epoch)
            sched.step(val["loss"])
            row = {
                "epoch": epoch, "step": step, **({"beta": beta} if family.USES_BETA else {}), "lr": opt.param_groups[0]["lr"],
                "train_loss": loss / n, **{f"train_{k}": v / n for k, v in zip(terms, means)},
                **{f"val_{k}": v for k, v in val.items()},
                "epoch_time_s": epoch_time, "epoch_cpu_time_s": epoch_cpu, "images_per_s": n / epoch_time,
            }
            rows.append(row)
            if dist.main:
                run.append_metrics(row)
                tblog.log_epoch(tb, row, model, data.val, seed=config.seed)
                tqdm.write(f"epoch {epoch}/{config.epochs}  {family.epoch_line(row, model)} | lr {row['lr']:.2g} | "
                           f"{epoch_time:.1f}s {row['images_per_s']:.0f} img/s")
                warning = family.epoch_warning(rows)
                if warning:
                    tqdm.write(warning)
                run.save_checkpoint(epoch, model, {
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "epoch": epoch, "step": step, "elapsed_s": elapsed,
                })
    finally:
        if tb is not None:
            tb.close()
    finalize(run, model, data, config, dist, train_time_s=elapsed, device=device)
    return run.path


def make_optimizer(model: torch.nn.Module, *, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                   fused: bool | None = None) -> torch.optim.Adam:
    """vaelab's optimiser: Adam (Kingma & Ba 2015) over the model's parameters.

    ``fused`` (default: on where torch has a fused kernel for the parameters' device, CPU and CUDA):
    one kernel for all parameter updates instead of a loop of small ones; the same update rule, equal
    up to float rounding. Its state dict is the same as the unfused optimiser's (checkpoints resume either way).
    """
    params = list(model.parameters())  # frozen ones (a DDPM's EMA copy) get no gradient and no update; kept so
    if fused is None:                  # optimizer state dicts match the checkpoints of every earlier run
        fused = bool(params) and params[0].device.type in ("cpu", "cuda") and params[0].is_floating_point()
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def say(dist: Distributed, text: str) -> None:
    """Print on rank 0 only."""
    if dist.main:
        print(text)


def _train_epoch(net, model, opt, scaler, train: ImageSplit, config: TrainConfig, dist: Distributed, *, step: int,
                 epoch: int, beta_for) -> tuple[torch.Tensor, int, float]:
    """One pass over ``train`` (this rank's shard of it). Returns the device-side sums
    ``[loss * n, *terms, n]`` of this rank, the global step after the epoch and the last KL weight.

    Randomness (batch order, flips, binarisation, the model's noise) comes from one generator seeded
    from ``(seed, epoch)`` and is drawn for whole global batches, then sliced per rank: every rank
    draws alike, a resumed epoch repeats exactly, and N ranks see what one process with an N times
    larger batch would. Raises ``NonFiniteError`` at the first check after a NaN/inf.
    """
    family = family_of(model)
    terms = tuple(family.TERMS)
    device = train.images.device
    model.train()
    gen = torch.Generator(device=device).manual_seed(derive_seed(config.seed, "epoch", epoch))
    order = torch.randperm(len(train), device=device, generator=gen)
    sums = torch.zeros(2 + len(terms), device=device)  # on the device: no per-step host sync
    watched = ["loss", *terms] + ([] if scaler.is_enabled() else ["gradient norm"])  # fp16 overflows are the scaler's job
    watch = _NonFiniteWatch(watched, device)
    rank, world = dist.rank, dist.world_size
    global_batch = config.batch_size * world
    steps_per_epoch = sum(1 for _ in global_batches(len(train), config.batch_size, world_size=world))
    beta = beta_for(step)
    with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", unit="step", leave=False,
              disable=not dist.main) as bar:
        for i, (x, y) in enumerate(batches(train.images, train.labels, config.batch_size, order=order, flip=config.augment,
                                           binarize=config.binarize, pixel_range=config.pixel_range, generator=gen,
                                           rank=rank, world_size=world)):
            beta = beta_for(step)
            size = min(global_batch, len(train) - i * global_batch)
            noise = {k: v[rank::world] for k, v in model.draw_noise(size, gen, device).items()}
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.precision):
                out = net(x, beta=beta, y=y, noise=noise)
            opt.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            family.after_step(model)
            term_sums = [getattr(out, k).detach().float().sum() for k in terms]
            watch.update(step, torch.stack([out.loss.detach().float(), *term_sums, grad_norm.float()][: len(watched)]))
            step += 1
            sums += torch.stack([out.loss.detach().float() * len(x), *term_sums, torch.tensor(float(len(x)), device=device)])
            bar.update(1)
            if (i + 1) % config.log_every == 0 or i + 1 == steps_per_epoch:
                watch.check(epoch, opt.param_groups[0]["lr"])
                if dist.main:
                    loss, *means, n = sums.tolist()  # this rank's running means: enough for a progress bar
                    bar.set_postfix(loss=f"{loss / n:{family.LOSS_FORMAT}}", **{k: f"{v / n:.2f}" for k, v in zip(terms, means)},
                                    **({"beta": f"{beta:.3g}"} if family.USES_BETA else {}), lr=f"{opt.param_groups[0]['lr']:.2g}")
    return sums, step, beta


def finalize(run: Run, model, data: RunData, config: TrainConfig, dist: Distributed, *, train_time_s: float,
             device) -> dict | None:
    """Test-split evaluation (all ranks), then on rank 0 the run's pictures and ``summary.json`` (its
    presence marks a finished run). Returns the summary on rank 0, ``None`` elsewhere."""
    family = family_of(model)
    model.eval()
    test = family.evaluate(model, data.test, beta=config.beta, seed=config.seed, keep_latents=True, dist=dist)
    rows = run.metrics() if dist.main else []
    _check_finite(test, "test", rows[-1]["epoch"] if rows else 0)
    if not dist.main:
        dist.barrier()
        return None
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
        # CPU seconds of this process (rank 0) over the epochs, all its threads; rows of runs that predate it lack it
        "train_cpu_time_s": sum(r["epoch_cpu_time_s"] for r in rows) if all("epoch_cpu_time_s" in r for r in rows) else None,
        "train_images_per_s": images_seen / train_time_s if train_time_s else None,
        "precision": config.precision,
        "processes": dist.world_size,
        **provenance(device, config.seed),
    }
    summary["captions"] = family.write_pictures(run.path, model, data, rows, config, test)
    run.write_summary(summary)
    dist.barrier()
    return summary
