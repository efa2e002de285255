"""The generated shapes dataset (every factor combination once, deterministic) and the MIG / DCI metrics:
a code that is the factors scores near 1, a random or shuffled code near 0; `vaelab evaluate` applies them
only where the data has factors."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.data import binarize_split, load_run_data, load_split, write_tensor_file
from vaelab.data.shapes import FACTOR_NAMES, SHAPES, ShapesSpec, factor_grid, make_shapes, render, write_shapes
from vaelab.errors import ConfigError, DataError
from vaelab.evaluation import describe, evaluate_run
from vaelab.io import write_yaml
from vaelab.metrics.disentanglement import dci, dci_scores, mig
from vaelab.training import train

TINY = ShapesSpec(image_size=16, scales=2, orientations=3, positions=3, test_fraction=0.3)
GRID = ShapesSpec(image_size=16, scales=3, orientations=4, positions=4)  # 576 factor combinations


def test_every_factor_combination_once_with_the_expected_counts():
    spec = ShapesSpec(image_size=16, scales=3, orientations=5, positions=4)
    factors = factor_grid(spec)
    assert spec.count == 3 * 3 * 5 * 4 * 4 == len(factors)
    assert len({tuple(row) for row in factors.tolist()}) == spec.count  # no combination twice
    for k, size in enumerate(spec.sizes):
        assert Counter(factors[:, k].tolist()) == {v: spec.count // size for v in range(size)}


def test_shapes_are_deterministic_distinct_and_inside_the_frame():
    a, b = make_shapes(TINY), make_shapes(TINY)
    assert torch.equal(a.images, b.images) and torch.equal(a.factors, b.factors)
    assert a.images.dtype == torch.uint8 and a.images.shape == (TINY.count, 1, 16, 16)
    assert a.factor_names == FACTOR_NAMES and a.classes == list(SHAPES)
    assert torch.equal(a.labels, a.factors[:, 0])
    assert len({img.numpy().tobytes() for img in a.images}) == TINY.count  # every combination looks different
    half_turn = make_shapes(ShapesSpec(image_size=16, scales=1, orientations=2, positions=1))  # as in dSprites,
    assert torch.equal(half_turn.images[0], half_turn.images[1])  # a square turned by pi looks the same
    assert not torch.equal(half_turn.images[4], half_turn.images[5])  # a heart does not
    border = torch.cat([a.images[..., 0, :], a.images[..., -1, :], a.images[..., 0], a.images[..., -1]], -1)
    assert border.max() == 0 and (a.images.flatten(1).amax(1) > 0).all()  # every shape inside, none vanishes
    # a position step is a whole-pixel shift of the same sprite
    f = a.factors.tolist()
    left, right = f.index([0, 1, 1, 0, 1]), f.index([0, 1, 1, 1, 1])
    step = a.images[right].nonzero()[:, 2].min() - a.images[left].nonzero()[:, 2].min()
    assert step > 0 and torch.equal(torch.roll(a.images[left], int(step), dims=2), a.images[right])


def test_write_shapes_splits_the_combinations_and_loads_as_a_tensors_dataset(tmp_path):
    out = write_shapes(tmp_path / "shapes", TINY)
    train_split, test_split = load_split("tensors", "train", out), load_split("tensors", "test", out)
    assert len(test_split) == round(0.3 * TINY.count) and len(train_split) + len(test_split) == TINY.count
    rows = [tuple(r) for r in torch.cat([train_split.factors, test_split.factors]).tolist()]
    assert sorted(rows) == sorted(tuple(r) for r in factor_grid(TINY).tolist())  # disjoint, complete
    assert test_split.factor_names == FACTOR_NAMES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == {"train": len(train_split), "test": len(test_split)}
    assert manifest["factor_values"]["shape"] == list(SHAPES)
    assert not list(tmp_path.glob(".*.tmp"))
    # factors stay with their images through a run's subsets, validation hold-out and binarisation
    run_data = load_run_data("tensors", out, train_subset=60, test_subset=20, val_fraction=0.2, seed=3)
    for split in (run_data.train, run_data.val, run_data.test):
        assert torch.equal(render(TINY, split.factors), split.images)
    assert torch.equal(binarize_split(run_data.test, 3).factors, run_data.test.factors)
    again = write_shapes(tmp_path / "again", TINY)  # same spec and seed: the same split
    repeat = load_split("tensors", "test", again)
    assert torch.equal(repeat.images, test_split.images) and torch.equal(repeat.factors, test_split.factors)
    with pytest.raises(ConfigError, match="not empty"):
        write_shapes(out, TINY)
    with pytest.raises(ConfigError, match="positions"):
        write_shapes(tmp_path / "x", ShapesSpec(image_size=16, positions=12))
    with pytest.raises(ConfigError, match="scales"):
        write_shapes(tmp_path / "x", ShapesSpec(scales=0))
    assert not (tmp_path / "x").exists()


def test_a_code_that_is_the_factors_scores_high_a_random_or_shuffled_code_low():
    factors = factor_grid(GRID)
    g = torch.Generator().manual_seed(0)
    identity = factors.double() + 0.01 * torch.randn(len(factors), 5, generator=g, dtype=torch.float64)
    assert mig(identity, factors)["mig"] > 0.98
    scores = dci(identity, factors, n_estimators=20)
    assert scores["disentanglement"] > 0.95 and scores["completeness"] > 0.95 and scores["informativeness"] > 0.95
    for code in (torch.randn(len(factors), 5, generator=g),
                 identity[torch.randperm(len(factors), generator=g)]):  # the right values, on the wrong images
        assert mig(code, factors)["mig"] < 0.05
        scores = dci(code, factors, n_estimators=20)
        assert scores["disentanglement"] < 0.1 and scores["completeness"] < 0.1
    # one dimension holding two factors: complete but not disentangled, and MIG sees both factors captured
    mixed = torch.stack([factors[:, 0] * 10 + factors[:, 1], *factors[:, 2:].T], 1).double()
    scores = dci(mixed, factors, n_estimators=20)
    assert scores["completeness"] > 0.9 and scores["disentanglement"] < 0.9


def test_dci_scores_of_planted_importance_matrices():
    assert dci_scores(np.eye(4)) == pytest.approx((1.0, 1.0))
    assert dci_scores(np.ones((4, 4))) == pytest.approx((0.0, 0.0), abs=1e-9)
    d, c = dci_scores(np.array([[1.0, 1.0], [0.0, 0.0]]))  # one dimension serves both factors
    assert d == pytest.approx(0.0, abs=1e-9) and c == pytest.approx(1.0)
    with pytest.raises(DataError, match="same N"):
        mig(torch.zeros(5, 2), torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(DataError, match="NaN"):
        dci(torch.full((20, 2), float("nan")), torch.zeros(20, 2, dtype=torch.long))


def test_evaluate_scores_a_run_on_shapes_and_says_why_not_elsewhere(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "shapes"), "--image-size", "16", "--scales", "2",
                 "--orientations", "3", "--positions", "3", "--test-fraction", "0.3"]) == 0
    config = TrainConfig(dataset="tensors", data_root=str(tmp_path / "shapes"), model="conv", latent_dim=3, epochs=1,
                         batch_size=16, model_args={"channels": [4, 8], "fc_hidden": 16}, device="cpu",
                         out=str(tmp_path / "run"), recon_likelihood="bernoulli", tensorboard=False)
    run = train(config)
    result = evaluate_run(run, metrics="disentanglement,recon", device="cpu")
    d = result["disentanglement"]
    assert d["factor_names"] == list(FACTOR_NAMES) and d["latent_dim"] == 3
    assert 0 <= d["mig"]["mig"] <= 1 and len(d["mig"]["per_factor"]) == 5
    assert all(0 <= d["dci"][k] <= 1 for k in ("disentanglement", "completeness", "informativeness"))
    assert np.array(d["dci"]["importance"]).shape == (3, 5)
    assert set(result["timing_s"]) == set(result["estimated_s"])
    assert "disentanglement: MIG" in describe(result)
    # the same run pointed at the same images without their factors: not applicable, with the reason
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("train", "test"):
        write_tensor_file(replace(load_split("tensors", split, tmp_path / "shapes"), factors=None, factor_names=()),
                          plain / f"{split}.safetensors")
    write_yaml(run / "config.yaml", replace(config, data_root=str(plain)).to_dict())
    result = evaluate_run(run, metrics="disentanglement", device="cpu")
    assert "disentanglement" not in result and "no ground-truth factors" in result["not_applicable"]["disentanglement"]


def test_tensor_files_refuse_factors_that_do_not_fit_their_images(tmp_path):
    from safetensors.torch import save_file

    from vaelab.data.tensors import read_tensor_file

    split = make_shapes(TINY)
    with pytest.raises(DataError, match="factors must be int64"):
        write_tensor_file(replace(split, factors=split.factors.float()), tmp_path / "a.safetensors")
    with pytest.raises(DataError, match="one name per column"):
        write_tensor_file(replace(split, factor_names=("shape",)), tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    save_file({"images": split.images, "labels": split.labels, "factors": split.factors[:-1]},
              str(tmp_path / "b.safetensors"), metadata={"classes": json.dumps(split.classes),
                                                         "factor_names": json.dumps(FACTOR_NAMES)})
    with pytest.raises(DataError, match=f"N={len(split)}"):
        read_tensor_file(tmp_path / "b.safetensors")
