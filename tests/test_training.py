import json

import pytest
import torch
import yaml
from fixtures import write_mnist

from vaelab.config import TrainConfig, load_config
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.families import vae
from vaelab.metrics.latent import active_units
from vaelab.models import build_config, build_model
from vaelab.run import Run, run_data
from vaelab.training import resume, train

RUN_FILES = [
    "config.yaml", "metrics.jsonl", "summary.json", "training_curves.png", "reconstructions.png",
    "samples.png", "interpolation.png", "latent_mu_pca.png", "latent_sigma_pca.png",
]


def tiny_mnist(tmp_path, **kw) -> TrainConfig:
    values = dict(dataset="mnist", epochs=1, train_subset=2000, test_subset=1000, latent_dim=8,
                  batch_size=64, out=str(tmp_path / "run"), device="cpu")
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shared_datasets):
    tmp = tmp_path_factory.mktemp("train")
    config = tiny_mnist(tmp, data_root=str(shared_datasets))
    return config, train(config)


def test_one_epoch_on_real_mnist_writes_every_output(trained_run):
    config, run_dir = trained_run
    for name in RUN_FILES:
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    ckpt = Run(run_dir).last_checkpoint()
    assert ckpt.name == "epoch-0001"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "trainer_state.pt"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and {"train_loss", "val_loss", "val_active_units", "lr", "beta"} <= set(rows[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "MNIST" and summary["num_test_images"] == 1000 and summary["family"] == "vae"
    # CPU time of the training process: positive, summed from the epochs, at most its threads x the wall time
    assert summary["train_cpu_time_s"] == pytest.approx(sum(r["epoch_cpu_time_s"] for r in rows))
    assert 0 < summary["train_cpu_time_s"] <= torch.get_num_threads() * summary["train_time_s"] * 1.1 + 0.5
    assert set(summary["captions"]) == {n for n in RUN_FILES if n.endswith(".png")}
    # what the timings were measured on: the processor's model name beside the device and threads
    assert summary["device"] == "cpu" and summary["device_name"] not in ("", None) and summary["threads"] >= 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"] == "mnist-small"
    assert not list(run_dir.rglob("*.tmp*"))  # no temporary leftovers


def test_training_beats_the_untrained_model(trained_run):
    config, run_dir = trained_run
    config = config.resolved()
    data = run_data(config)
    torch.manual_seed(config.seed)
    untrained = build_model(build_config(config.model, data_shape=data.test.shape, **config.model_overrides()))
    before = vae.evaluate(untrained, data.test, seed=0)["neg_elbo"]
    after = json.loads((run_dir / "summary.json").read_text())["test_neg_elbo_nats"]
    assert after < before - 100, (before, after)  # an untrained decoder costs ~540 nats, one epoch ~200


def test_resume_continues_from_the_checkpoint(trained_run, tmp_path):
    import shutil

    _, run_dir = trained_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    resume(copy, epochs=2)
    rows = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["step"] == 2 * rows[0]["step"]
    assert Run(copy).last_checkpoint().name == "epoch-0002"
    assert Run(copy).load_model().config.latent_dim == 8
    # the new length is the run's now: config.yaml says 2, and a plain resume has nothing left to do
    assert Run(copy).config.epochs == 2 and (copy / "config.yaml").read_text().startswith("# vaelab run config:")
    resume(copy)
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 2


def test_active_units_counts_a_planted_dead_dimension():
    mu = torch.randn(500, 4)
    mu[:, 2] = 0.3 + 0.01 * torch.randn(500)  # Var = 1e-4 < 0.01
    assert active_units(mu) == 3


# ------------------------------------------------------------------- bad input: error, no run folder


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"epochs": 0}, ConfigError, "epochs must be a positive integer"),
        ({"batch_size": -1}, ConfigError, "batch_size must be a positive integer"),
        ({"lr": 0.0}, ConfigError, "lr must be a positive number"),
        ({"latent_dim": 0}, ConfigError, "latent_dim must be a positive integer"),
        ({"dataset": "svhn"}, DataError, "unknown dataset 'svhn'"),
        ({"model": "resnet"}, ConfigError, "unknown model 'resnet'"),
        ({"model": "cifar-seed"}, ConfigError, "expects 3x32x32 images but the dataset has 1x28x28"),
        ({"data_root": "/nonexistent/data"}, DataError, "not found"),
        ({"recon_likelihood": "poisson"}, ConfigError, "unknown recon_likelihood"),
        ({"model_args": {"latent_dim": 4}}, ConfigError, r"model_args.latent_dim: .* top-level .* --latent-dim"),
    ],
)
def test_bad_input_fails_before_the_run_folder_exists(tmp_path, in_repo, overrides, error, message):
    config = tiny_mnist(tmp_path, **overrides)
    with pytest.raises(error, match=message):
        train(config)
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint(tmp_path):
    (tmp_path / "config.yaml").write_text("dataset: mnist\n")
    with pytest.raises(VaelabError, match="has no checkpoint"):
        resume(tmp_path)
    with pytest.raises(VaelabError, match="no config.yaml"):
        resume(tmp_path / "elsewhere")


def test_existing_run_is_not_overwritten(trained_run):
    config, run_dir = trained_run
    with pytest.raises(VaelabError, match="already holds a run"):
        train(config)


def test_corrupt_data_fails_before_the_run_folder_exists(tmp_path):
    write_mnist(tmp_path / "data")
    f = tmp_path / "data" / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:12])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        train(tiny_mnist(tmp_path, data_root=str(tmp_path / "data"), train_subset=None, test_subset=None))
    assert not (tmp_path / "run").exists()


def test_config_file_rejects_unknown_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("dataset: mnist\nlatent_size: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'latent_size'"):
        load_config(tmp_path / "c.yaml")


def test_seed_config_aliases(tmp_path):
    (tmp_path / "c.yaml").write_text("dataset: mnist\nsave_path: out/x\n")
    assert load_config(tmp_path / "c.yaml").out == "out/x"


@pytest.mark.parametrize("name", ["mnist.yaml", "fashion-mnist.yaml", "cifar10-seed.yaml", "cifar10-cli.yaml"])
def test_shipped_configs_resolve(in_repo, name):
    c = load_config(in_repo / "configs" / name).resolved()
    assert c.epochs > 0 and c.latent_dim > 0


def test_posterior_collapse_is_warned_about(tmp_path, in_repo, capsys):
    # beta = 200 makes any information in z too expensive: KL -> 0 within two epochs
    train(tiny_mnist(tmp_path, epochs=2, beta=200.0, train_subset=1000, test_subset=200))
    out = capsys.readouterr().out
    assert "WARNING: posterior collapse" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["val_kl"] < 0.1 for r in rows)


def test_healthy_run_keeps_kl_above_the_collapse_threshold(trained_run):
    rows = [json.loads(line) for line in (trained_run[1] / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_kl"] > 1.0


def test_a_tiny_test_split_still_gets_every_picture(tmp_path, in_repo):
    run_dir = train(tiny_mnist(tmp_path, train_subset=300, test_subset=5))
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name


def test_summary_gives_bits_per_dim_only_for_a_discrete_likelihood(trained_run):
    summary = json.loads((trained_run[1] / "summary.json").read_text())
    assert summary["test_neg_elbo_bits_per_dim"] is None  # Bernoulli on gray-level MNIST
    assert "surrogate" in summary["likelihood"]
