import json

import pytest

from vaelab.cli import build_parser, main


def test_seed_underscore_spellings_are_accepted():
    args = build_parser().parse_args(["train", "--batch_size", "32", "--latent_dim", "7", "--save_path", "x"])
    assert (args.batch_size, args.latent_dim, args.out) == (32, 7, "x")
    args = build_parser().parse_args(["train", "--batch-size", "32", "--latent-dim", "7", "--out", "x"])
    assert (args.batch_size, args.latent_dim, args.out) == (32, 7, "x")


def test_train_from_config_file_then_sample(tmp_path, in_repo):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: fashion-mnist\nepochs: 1\ntrain_subset: 600\ntest_subset: 300\nlatent_dim: 4\nbeta: 5.0\n")
    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--batch-size", "100", "--out", str(run), "--device", "cpu"]) == 0
    config = (run / "config.yaml").read_text()
    assert "beta: 5.0" in config and "batch_size: 100" in config
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"] == "Fashion-MNIST" and summary["latent_dim"] == 4
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--n", "9", "--out", str(png)]) == 0
    from PIL import Image

    assert Image.open(png).size[0] > 3 * 28
    # two runs side by side (the same run twice here): one labelled row each, the same seed
    rows = tmp_path / "rows.png"
    assert main(["sample", "--run", str(run), "--run", str(run), "--n", "6", "--out", str(rows)]) == 0
    width, height = Image.open(rows).size
    assert width > 6 * 28 and height > 2 * 28
    assert main(["sample", "--run", str(run), "--run", str(run), "--class", "1", "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--epochs", "0", "--out", str(tmp_path / "r")]) == 2
    assert "epochs must be a positive integer" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "is not a run folder: no config.yaml" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text("dataset: mnist\n")
    assert main(["sample", "--run", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.png").exists()
