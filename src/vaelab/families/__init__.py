"""Model families: everything that differs between kinds of generative model, behind one contract.

The training loop, evaluation, synthesis, compare, sweep, reports and the command line never ask
what kind of model they hold; they look its family up here (``family_of(model)``) and call the
contract below. A family is one module; ``FAMILIES`` maps its name (the model class's ``family``
attribute) to it.

The contract (module-level names of a family module)::

    NAME, DESCRIPTION      registry key and a phrase for people
    LOSS_UNIT              unit of the training loss, e.g. "nats per image"
    LOSS_FORMAT            format spec of the loss in progress lines, e.g. ".2f"
    TERMS                  {term: unit}: per-image terms of the loss output tracked during training
    USES_BETA              whether the KL weight schedule applies (shown in the progress bar)
    HEADLINE               summary.json keys printed after training
    SWEEP_COLUMNS          [(key, column label, plot title)] of sweep tables, values from sweep_metrics
    NOT_APPLICABLE         {evaluate metric: reason} for metrics the family cannot support

    resolve_config(config)                     fill family defaults into a TrainConfig, reject fields that do not apply
    data_defaults(config, stats) -> dict       fill unset fields from the training images (image folders; stats: a
                                               config.DataStats) before resolve_config; {field: "value: why"}
    prepare_model(model, train, config) -> str | None   once before the first step of a new run (not on resume:
                                               what it sets lives in the checkpoint), e.g. the LDM's latent scale
                                               factor; returns a line for people or None
    after_step(model)                          called after every optimiser step (e.g. an EMA update)
    evaluate(model, split, *, beta, seed, keep_latents, dist) -> dict
                                               mean loss terms over a split; "loss" drives the LR schedule
    epoch_line(row, model) -> str              one line per epoch for people
    epoch_warning(rows) -> str | None          a warning from the metrics history (e.g. posterior collapse)
    summary(model, test, config, metrics) -> dict    family fields of summary.json (test split numbers)
    write_pictures(run_dir, model, data, rows, config, metrics) -> {file: caption}
    log_images(writer, model, val, epoch, seed)      TensorBoard image grids of one epoch
    sweep_metrics(summary) -> dict             values for SWEEP_COLUMNS from a summary.json
    sampler(model, run, *, sampler, steps) -> Sampler   a validated way to draw images (options checked)
    comparison_samplers(model, run, *, ddim_steps) -> [Sampler]   the entries of a comparison
    sample_labels(model, n) -> labels | None   class labels a conditional model draws in turn, else None
    class_labels(model, index, n) -> labels    n copies of one class; ConfigError for an unconditional model
    synthesis_methods(model) -> [str]          latent-synthesis methods it supports, default first ([] for none)

Adding a family: write ``vaelab/families/<name>.py`` with the names above (copy ``ddpm.py``, the
smaller one, as a start), give its model class ``family = "<name>"``, register the model type and
presets in ``vaelab.models``, and add the module to ``FAMILIES`` below.
"""

from __future__ import annotations

from types import ModuleType

from vaelab.errors import ConfigError
from vaelab.families import ddpm, ldm, vae
from vaelab.families.base import Sampler

FAMILIES: dict[str, ModuleType] = {vae.NAME: vae, ddpm.NAME: ddpm, ldm.NAME: ldm}


def get(name: str) -> ModuleType:
    """The family module registered as ``name``.

    Raises:
        ConfigError: unknown name (the valid ones listed).
    """
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(model) -> ModuleType:
    """The family module of a model instance or class (its ``family`` attribute)."""
    return get(getattr(model, "family", None))


__all__ = ["FAMILIES", "Sampler", "family_of", "get"]
