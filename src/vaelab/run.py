"""``Run``: one run folder, opened and written in one place.

Layout::

    RUN_DIR/config.yaml        the resolved TrainConfig (re-runnable with --config); its first line says how many
                               fields were written, so a copy cut at a line end is still caught
    RUN_DIR/metrics.jsonl      one strict-JSON row per finished epoch
    RUN_DIR/summary.json       test-split numbers and provenance, written when training ends
    RUN_DIR/checkpoints/epoch-NNNN/{model.safetensors, config.json, trainer_state.pt}
                               the newest epoch only; written to a temp folder, then renamed
    RUN_DIR/samplers/<name>.safetensors, <name>.json
                               fitted latent samplers (``vaelab.latent_priors``: GMM, second-stage VAE), with
                               the fingerprint of the checkpoint they were fitted on; refitted when it changes
    RUN_DIR/*.png, tb/, eval.json, report.html, ...

Every command that reads a trained run (``evaluate``, ``synth``, ``sample``, ``compare``, ``sweep``,
``train --resume``) goes through ``Run``, so they all see the same config, checkpoint and data
splits (subset, validation hold-out and binarisation exactly as in training).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from functools import cached_property
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from vaelab.config import TrainConfig, config_from_dict
from vaelab.data import RunData, load_run_data
from vaelab.errors import ConfigError, VaelabError
from vaelab.io import (append_jsonl, atomic_path, load_written_yaml, read_cache, read_checked, read_json, read_jsonl,
                       write_json, write_jsonl, write_text)
from vaelab.models import load_model, save_model

CONFIG, METRICS, SUMMARY, CHECKPOINTS = "config.yaml", "metrics.jsonl", "summary.json", "checkpoints"
SAMPLERS = "samplers"
TRAINER_STATE = "trainer_state.pt"
CONFIG_HEADER = "vaelab run config:"  # config.yaml's first line: "# vaelab run config: N fields"
# run files other commands write, and the command that writes each again ({run}: the run folder)
WRITTEN_BY = {SUMMARY: "vaelab train --resume {run}", "eval.json": "vaelab evaluate --run {run}"}
# config fields that change how a run trains, not what it learns: two runs differing only here are the same run
RUNTIME_FIELDS = ("out", "device", "precision", "channels_last", "compile", "log_every", "tensorboard")


class Run:
    """An existing run folder (``config.yaml`` present).

    Raises (constructor):
        VaelabError: ``path`` holds no ``config.yaml``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / CONFIG).is_file():
            raise VaelabError(f"{self.path} is not a run folder: no {CONFIG} there (expected a folder written by "
                              "'vaelab train')")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @classmethod
    def create(cls, config: TrainConfig) -> "Run":
        """Create ``config.out`` and write its ``config.yaml`` (``config`` must be resolved).

        Raises:
            VaelabError: the folder already holds a run with a checkpoint.
        """
        path = Path(config.out)
        if checkpoint_dirs(path):
            raise VaelabError(f"{path} already holds a run; use --resume {path} or another --out")
        path.mkdir(parents=True, exist_ok=True)
        _write_config(path, config)
        return cls(path)

    def write_config(self, config: TrainConfig) -> None:
        """Replace ``config.yaml`` (e.g. a resumed run's new ``epochs``)."""
        _write_config(self.path, config)
        self.__dict__.pop("config", None)  # the cached property reads the new file

    # ------------------------------------------------------------------ reading

    @cached_property
    def config(self) -> TrainConfig:
        """The run's config as trained (``config.yaml``), with ``out`` pointing at this folder."""
        path = self.path / CONFIG
        config = config_from_dict(read_checked(path, _read_run_config, remedy="restore it from a copy: it holds the "
                                               "settings the run was trained with"), source=str(path))
        config.out = str(self.path)
        return config

    def check_same_settings(self, config: TrainConfig) -> None:
        """Refuse to treat this run as a training of ``config`` (a study stage, a sweep point) when its
        settings differ: runtime-only fields (``RUNTIME_FIELDS``) aside, and the fields training derived
        from the images of an image folder or tensor file (``config`` left them unset).

        Raises:
            ConfigError: naming this folder and each differing field as ``field: saved vs wanted``.
        """
        saved_config = self.config
        skip = {*RUNTIME_FIELDS, "data_defaults", *saved_config.data_defaults}

        def fields(c: TrainConfig) -> dict:
            return {k: v for k, v in c.resolved().to_dict().items() if k not in skip}

        saved, wanted = fields(saved_config), fields(config)
        diff = sorted(k for k in wanted if saved.get(k) != wanted[k])
        if diff:
            raise ConfigError(f"{self.path} holds a run with other settings "
                              f"({', '.join(f'{k}: {saved.get(k)!r} vs {wanted[k]!r}' for k in diff)}); "
                              "remove it or use another --out")

    @property
    def family(self):
        """The model family module of this run's model (see ``vaelab.families``)."""
        from vaelab.families import get
        from vaelab.models import preset_family

        return get(preset_family(self.config.model))

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        return checkpoint_dirs(self.path)

    def last_checkpoint(self) -> Path:
        """The newest complete ``checkpoints/epoch-NNNN`` folder.

        Raises:
            VaelabError: there is none.
        """
        dirs = self.checkpoints()
        if not dirs:
            raise VaelabError(f"{self.path} has no checkpoint (expected {self.path}/{CHECKPOINTS}/epoch-NNNN/{TRAINER_STATE})")
        return dirs[-1]

    def load_model(self, device: torch.device | str = "cpu", checkpoint: Path | None = None):
        """The model of the newest checkpoint (or ``checkpoint``), in eval mode on ``device``."""
        ckpt = checkpoint or self.last_checkpoint()
        return load_model(ckpt, device=device, remedy=self.checkpoint_remedy(ckpt))

    def trainer_state(self, checkpoint: Path | None = None) -> dict:
        """Optimizer, scheduler, generator and counters saved with a checkpoint (CPU tensors)."""
        ckpt = checkpoint or self.last_checkpoint()
        return read_checked(ckpt / TRAINER_STATE, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                            remedy=self.checkpoint_remedy(ckpt))

    def checkpoint_remedy(self, checkpoint: Path) -> str:
        """What to do when a file of ``checkpoint`` is damaged: fall back to an older checkpoint where one
        is kept, else restore the run (training keeps only the newest checkpoint)."""
        older = [c for c in self.checkpoints() if c.name < checkpoint.name]
        if older:
            return (f"resume from the previous checkpoint: remove {checkpoint} and rerun "
                    f"`vaelab train --resume {self.path}`")
        return (f"{checkpoint.name} is the run's only checkpoint (training keeps the newest alone): restore "
                f"{self.path} from a copy, or remove it and train again")

    def data(self, device: torch.device | str = "cpu") -> RunData:
        """The run's train / validation / test splits exactly as trained, on ``device``."""
        return self._data_cpu.to(device)

    @cached_property
    def _data_cpu(self) -> RunData:
        return run_data(self.config)

    def metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl`` (one per finished epoch)."""
        return read_jsonl(self.path / METRICS)  # a cut row stops it, naming the line

    def summary(self) -> dict | None:
        """``summary.json`` (``None`` before training has finished)."""
        return self.read_json(SUMMARY)

    @property
    def finished(self) -> bool:
        """Whether training finished (``summary.json`` written)."""
        return (self.path / SUMMARY).is_file()

    def read_json(self, name: str) -> dict | None:
        """``RUN_DIR/name`` parsed, or ``None`` if absent (e.g. ``eval.json``).

        Raises:
            DamagedFileError: the file is not valid JSON; the message names the command that writes it again.
        """
        path = self.path / name
        if not path.is_file():
            return None
        command = WRITTEN_BY.get(name)
        remedy = (f"delete it and rerun `{command.format(run=self.path)}`, which writes it again" if command
                  else "delete it and rerun the command that wrote it")
        return read_json(path, remedy=remedy)

    def checkpoint_fingerprint(self, checkpoint: Path | None = None) -> str:
        """SHA-256 (hex, first 16 digits) of the newest (or ``checkpoint``'s) ``model.safetensors``: what a
        cached sampler was fitted on."""
        return self.weights_sha256(checkpoint)[:16]

    def weights_sha256(self, checkpoint: Path | None = None) -> str:
        """SHA-256 (64 hex digits) of the newest (or ``checkpoint``'s) ``model.safetensors``: what a latent
        diffusion model trained on this run records of it."""
        path = (checkpoint or self.last_checkpoint()) / "model.safetensors"
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def read_sampler(self, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``samplers/<name>.safetensors``: its tensors (CPU) and its metadata ``info`` (a dict, parsed from
        JSON), or ``None`` when absent or damaged (after a warning; the caller fits it again)."""
        path = self.path / SAMPLERS / f"{name}.safetensors"
        if not path.is_file():
            return None

        def read(p: Path) -> tuple[dict[str, torch.Tensor], dict]:
            with safe_open(str(p), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads((fh.metadata() or {})["info"])

        return read_cache(path, read, redo=f"fitting the {name} sampler again (it replaces the file)")

    # ------------------------------------------------------------------ writing

    def write_sampler(self, name: str, tensors: dict[str, torch.Tensor], info: dict, report: dict) -> Path:
        """Write a fitted sampler: ``samplers/<name>.safetensors`` (``tensors`` and ``info`` as metadata,
        which ``read_sampler`` returns) and the strict-JSON ``samplers/<name>.json`` (``report``: how it
        was fitted, its metrics), each atomically. Returns the safetensors path."""
        path = self.path / SAMPLERS / f"{name}.safetensors"
        with atomic_path(path) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"info": json.dumps(info, allow_nan=False)})
        write_json(self.path / SAMPLERS / f"{name}.json", report)
        return path

    def append_metrics(self, row: dict) -> None:
        """Append one epoch's row to ``metrics.jsonl``."""
        append_jsonl(self.path / METRICS, row)

    def drop_metrics_after(self, epoch: int) -> int:
        """Remove ``metrics.jsonl`` rows of epochs after ``epoch`` (left by a run killed before their
        checkpoint was written, so they will be trained again); returns how many were removed."""
        rows = self.metrics()
        keep = [r for r in rows if r["epoch"] <= epoch]
        if len(keep) != len(rows):
            write_jsonl(self.path / METRICS, keep)
        return len(rows) - len(keep)

    def write_summary(self, summary: dict) -> None:
        """Write ``summary.json`` (atomically): the test numbers of a finished training."""
        write_json(self.path / SUMMARY, summary)

    def save_checkpoint(self, epoch: int, model, state: dict) -> Path:
        """Write ``checkpoints/epoch-NNNN`` atomically (temp folder, then rename), then drop older ones.

        A model with a non-finite weight is never written (the newest finite checkpoint stays).

        Raises:
            VaelabError: a parameter or buffer of ``model`` is NaN or infinite.
        """
        bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise VaelabError(f"not saving epoch {epoch}: non-finite values in {', '.join(bad[:5])}"
                              f"{' ...' if len(bad) > 5 else ''}; the newest finite checkpoint is kept")
        ckpt = self.path / CHECKPOINTS
        final = ckpt / f"epoch-{epoch:04d}"
        tmp = ckpt / f".epoch-{epoch:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(model, tmp)
        torch.save(state, tmp / TRAINER_STATE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.checkpoints():
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final


def _write_config(folder: Path, config: TrainConfig) -> None:
    """``config.yaml``, atomically, after a header line with the field count (it catches a cut copy)."""
    values = config.to_dict()
    write_text(folder / CONFIG, f"# {CONFIG_HEADER} {len(values)} fields\n" + yaml.safe_dump(values, sort_keys=False))


def _read_run_config(path: Path) -> dict:
    """A run's ``config.yaml`` as a mapping; ``ValueError`` when it was cut short: a last line without its newline,
    or fewer fields than its first line says were written (a cut at a line end still parses as YAML)."""
    values = load_written_yaml(path)
    if not isinstance(values, dict):
        raise ValueError(f"it holds a {type(values).__name__}, not a mapping of config fields")
    match = re.match(rf"# {CONFIG_HEADER} (\d+) fields\n", path.read_text())
    if match and len(values) < int(match[1]):
        raise ValueError(f"{len(values)} of the {match[1]} fields written: the file was cut short")
    return values


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoints/epoch-NNNN`` folders of ``run_dir`` (with ``trainer_state.pt``), oldest first."""
    ckpt = Path(run_dir) / CHECKPOINTS
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.glob("epoch-*") if p.is_dir() and (p / TRAINER_STATE).exists())


def run_data(config: TrainConfig) -> RunData:
    """The splits a run with ``config`` trains and is tested on (CPU): see ``vaelab.data.load_run_data``."""
    return load_run_data(config.dataset, config.data_root, train_subset=config.train_subset,
                         test_subset=config.test_subset, val_fraction=config.val_fraction, seed=config.seed,
                         binarize=config.binarize)
