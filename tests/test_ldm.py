"""Latent diffusion: the kl-f4 first stage, LDMs (MLP and UNet denoisers) on tiny first stages trained on a
few hundred real MNIST images: training, the scale factor, every sampler, resume, guidance, synthesis and
CAS, and the refusal of a changed first stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures import write_image_folder

from vaelab.cas import cas
from vaelab.comparison import compare_runs
from vaelab.cli import main
from vaelab.config import TrainConfig
from vaelab.data import to_pixels
from vaelab.errors import ConfigError
from vaelab.evaluation import evaluate_run
from vaelab.families import family_of
from vaelab.models import build_config, build_model
from vaelab.run import Run
from vaelab.study import _train_config, load_study, run_study
from vaelab.synthesis import synthesize
from vaelab.training import resume, train

COMMON = dict(dataset="mnist", epochs=1, train_subset=300, test_subset=100, batch_size=64, device="cpu",
              precision="fp32", tensorboard=False)
TINY_MLP = {"width": 32, "depth": 2, "num_train_timesteps": 20}
TINY_UNET = {"widths": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_train_timesteps": 20}


@pytest.fixture(scope="module")
def first_stages(tmp_path_factory, shared_datasets):
    """Two 1-epoch first stages: a vector-latent VAE (latent 4) and a kl-f4 (4x7x7 latent map, beta 0.01)."""
    tmp = tmp_path_factory.mktemp("first")
    root = str(shared_datasets)
    vector = train(TrainConfig(**COMMON, data_root=root, model="mnist-small", latent_dim=4, out=str(tmp / "vae"),
                               model_args={"channels": [8, 16], "fc_hidden": 32}))
    spatial = train(TrainConfig(**COMMON, data_root=root, model="kl-f4", beta=0.01, out=str(tmp / "klf4"),
                                model_args={"channels": [8, 16]}))
    return {"vector": vector, "spatial": spatial, "root": root}


def ldm_config(first_stages, out, *, model="ldm-mlp", stage="vector", **model_args) -> TrainConfig:
    args = {**(TINY_MLP if model == "ldm-mlp" else TINY_UNET), **model_args}
    return TrainConfig(**COMMON, data_root=first_stages["root"], model=model, first_stage=str(first_stages[stage]),
                       out=str(out), model_args=args)


@pytest.mark.parametrize("preset, fields", [("kl-f4", {}), ("kl-f4-diffusers", {"norm_num_groups": 4})])
@pytest.mark.parametrize("shape, latent", [((1, 28, 28), (4, 7, 7)), ((3, 32, 32), (4, 8, 8))])
def test_kl_f4_has_a_spatial_latent_a_quarter_of_the_image_side(shape, latent, preset, fields):
    model = build_model(build_config(preset, data_shape=shape, channels=(8, 16), **fields)).eval()
    assert model.latent_shape == latent and model.config.latent_dim == latent[0] * latent[1] * latent[2]
    x = torch.rand(2, *shape)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, model.config.latent_dim)  # the family's flattened code
    assert model.decode(mu).shape == (2, *shape)
    with pytest.raises(ConfigError, match="latent_dim 16 does not fit"):
        build_config(preset, data_shape=shape, latent_dim=16)


def test_kl_f4_diffusers_refuses_what_autoencoder_kl_cannot_build():
    with pytest.raises(ConfigError, match="divisible by 4"):  # nearest upsampling cannot give back 30 from 8
        build_config("kl-f4-diffusers", data_shape=(1, 30, 30), channels=(32, 64))
    with pytest.raises(ConfigError, match=r"norm_num_groups 32 must divide every width.*\[8, 16\]"):
        build_config("kl-f4-diffusers", data_shape=(1, 28, 28), channels=(8, 16))
    with pytest.raises(ConfigError, match="has no BatchNorm.*batch_norm must be false"):
        build_config("kl-f4-diffusers", data_shape=(1, 28, 28), batch_norm=True)
    assert build_config("kl-f4-diffusers", data_shape=(1, 28, 28)).batch_norm is False


def test_an_ldm_trains_on_a_kl_f4_diffusers_first_stage(first_stages, tmp_path):
    fs = train(TrainConfig(**COMMON, data_root=first_stages["root"], model="kl-f4-diffusers", beta=0.01,
                           out=str(tmp_path / "fs"), model_args={"channels": [8, 16], "norm_num_groups": 4}))
    assert Run(fs).summary()["latent_dim"] == 196
    ldm = train(ldm_config({**first_stages, "diffusers": fs}, tmp_path / "ldm", model="ldm-unet", stage="diffusers"))
    model = Run(ldm).load_model()
    assert model.latent_shape == (4, 7, 7)
    images = family_of(model).sampler(model, sampler="ddim", steps=2).draw(2, torch.Generator().manual_seed(0), None)
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


def test_kl_f4_run_works_with_the_vae_family_latent_tools(first_stages):
    """Pictures (PCA of mu), active units and the fitted GMM sampler all see the flattened 4x7x7 map."""
    run = Run(first_stages["spatial"])
    assert run.summary()["latent_dim"] == 196 and 0 <= run.summary()["active_units"] <= 196
    assert (run.path / "latent_mu_pca.png").is_file() and (run.path / "samples.png").is_file()
    model = run.load_model()
    sampler = family_of(model).sampler(model, run, sampler="gmm:components=2")
    assert sampler.draw(3, torch.Generator().manual_seed(0), None).shape == (3, 1, 28, 28)


def test_mlp_ldm_trains_scales_samples_with_each_sampler_and_resumes(first_stages, tmp_path):
    run_dir = train(ldm_config(first_stages, tmp_path / "ldm"))
    run = Run(run_dir)
    summary = run.summary()
    first = Run(first_stages["vector"])
    assert summary["family"] == "ldm" and summary["first_stage"] == str(first.path.resolve())
    assert summary["first_stage_sha256"] == first.weights_sha256() and len(summary["first_stage_sha256"]) == 64
    assert (run_dir / "samples.png").is_file() and summary["latent_shape"] == [4]

    model = run.load_model()
    assert model.scale_factor.item() == pytest.approx(summary["scale_factor"])
    train_images = run.data().train.images
    z = model.encode_latents(to_pixels(train_images, "[0,1]"))
    assert z.shape == (len(train_images), 4)
    assert z.std().item() == pytest.approx(1.0, abs=1e-3)  # unit variance over the train split, as intended
    assert model.first_stage_means(to_pixels(train_images, "[0,1]")).std().item() != pytest.approx(1.0, abs=0.05)

    family = family_of(model)
    for name in ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++"):
        sampler = family.sampler(model, run, sampler=name, steps=3)
        images = sampler.draw(5, torch.Generator().manual_seed(0), None)
        assert images.shape == (5, 1, 28, 28) and 0 <= images.min() and images.max() <= 1, name
    assert [s.name for s in family.comparison_samplers(model, run, ddim_steps=4)] == ["dpmsolver++", "ddim"]
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        family.sampler(model, run, sampler="ddim:guidance=2")
    with pytest.raises(ConfigError, match=r"steps must be an integer in \[1, 20\]"):
        family.sampler(model, run, sampler="dpmsolver++", steps=21)

    result = evaluate_run(run_dir, metrics="recon,nll,latent", device="cpu")
    assert set(result["not_applicable"]) == {"recon", "nll", "latent"}
    model.double()  # the unregistered first stage moves with the model
    assert next(model.first_stage.parameters()).dtype == torch.float64

    resume(run_dir, epochs=2)
    assert [r["epoch"] for r in Run(run_dir).metrics()] == [1, 2]
    assert Run(run_dir).load_model().scale_factor.item() == pytest.approx(summary["scale_factor"])  # kept, not refitted
    out = tmp_path / "grid.png"
    assert main(["sample", "--run", str(run_dir), "--n", "4", "--out", str(out), "--device", "cpu",
                 "--sampler", "ddim", "--steps", "2"]) == 0 and out.is_file()


def test_conditional_unet_ldm_guidance_synth_and_cas(first_stages, tmp_path):
    run_dir = train(ldm_config(first_stages, tmp_path / "cldm", model="ldm-unet", stage="spatial", class_conditional=True))
    run = Run(run_dir)
    model = run.load_model()
    assert model.latent_shape == (4, 7, 7) and run.summary()["class_conditional"]
    assert "one row of 8 per class" in run.summary()["captions"]["samples.png"]
    y = torch.tensor([3, 3, 7])
    z = model.sample_latents(3, y=y, sampler="dpmsolver++", steps=3, guidance=2.0)
    assert z.shape == (3, 4, 7, 7) and torch.isfinite(z).all()
    sampler = family_of(model).sampler(model, run, sampler="dpmsolver++:guidance=2.5", steps=3)
    assert sampler.options["guidance"] == 2.5 and sampler.network_evaluations == 2 * 3
    assert sampler.draw(3, torch.Generator().manual_seed(0), y).shape == (3, 1, 28, 28)
    # a speed measurement on a shortened chain keeps the guidance: two denoiser rows per image and step
    from vaelab.metrics.speed import time_generation

    rows = []
    hook = model.ema_denoiser.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    t = time_generation(model, sampler, 3, repeats=1, max_steps=2)
    hook.remove()
    assert sum(rows) == 2 * (3 * 2 * 2) and t["method"].startswith("extrapolated") and "4 of the 6" in t["method"]
    with pytest.raises(ConfigError, match="unknown option"):
        family_of(model).sampler(model, run, sampler="ddim:scale=2")
    model.config.label_dropout = 0.0  # as if trained without label dropout: no unconditional estimate to guide with
    with pytest.raises(ConfigError, match="label_dropout 0 never learned"):
        model.check_guidance(2.0)
    model.config.label_dropout = 0.1

    syn = synthesize(run_dir, tmp_path / "syn", per_class=2, method="prior", sampler="dpmsolver++:guidance=2",
                     device="cpu")
    manifest = json.loads((syn / "manifest.json").read_text())
    assert manifest["sampler"]["guidance"] == 2.0
    report = cas(syn, "mnist", data_root=first_stages["root"], out=tmp_path / "cas", steps=2, test_subset=50,
                 rows=("synthetic",), recipe={"widths": (8, 16, 32), "batch_size": 16}, device="cpu")
    assert report["rows"]["synthetic"]["train_images"] == 20 and 0 <= report["rows"]["synthetic"]["top1"] <= 1


def test_a_changed_first_stage_is_refused_naming_both_hashes(first_stages, tmp_path):
    run_dir = train(ldm_config(first_stages, tmp_path / "ldm", model="ldm-mlp", stage="spatial"))
    first = Run(first_stages["spatial"])
    weights = first.last_checkpoint() / "model.safetensors"
    original, trained_on = weights.read_bytes(), first.weights_sha256()
    try:
        state = load_file(str(weights))
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key] + 0.5
        save_file(state, str(weights))
        changed = first.weights_sha256()
        for attempt in (lambda: Run(run_dir).load_model(), lambda: resume(run_dir, epochs=2)):
            with pytest.raises(ConfigError, match=f"SHA-256 {changed}.*SHA-256 {trained_on}"):
                attempt()
    finally:
        weights.write_bytes(original)
    assert Run(run_dir).load_model().latent_shape == (4, 7, 7)  # the restored first stage is accepted again


def test_cli_train_takes_the_first_stage_flag(first_stages, tmp_path, capsys):
    config = ldm_config(first_stages, tmp_path / "unused").to_dict()
    config.pop("first_stage"), config.pop("out")
    (tmp_path / "ldm.yaml").write_text(json.dumps(config))  # JSON is YAML
    out = tmp_path / "cli"
    assert main(["train", "--config", str(tmp_path / "ldm.yaml"), "--first-stage", str(first_stages["vector"]),
                 "--out", str(out)]) == 0
    assert "latent scale factor" in capsys.readouterr().out
    assert Run(out).config.first_stage == str(Path(first_stages["vector"]).resolve())


def test_bad_configs_are_refused_before_any_work(first_stages, tmp_path):
    with pytest.raises(ConfigError, match="--first-stage RUN_DIR"):
        TrainConfig(model="ldm-mlp").resolved()
    with pytest.raises(ConfigError, match="first_stage applies to latent diffusion"):
        TrainConfig(model="mnist-small", first_stage=str(first_stages["vector"])).resolved()
    with pytest.raises(ConfigError, match="dataset 'fashion-mnist' differs from the first stage's"):
        TrainConfig(model="ldm-mlp", dataset="fashion-mnist", first_stage=str(first_stages["vector"])).resolved()
    with pytest.raises(ConfigError, match="latent_dim=8 applies to VAEs only"):
        TrainConfig(model="ldm-mlp", latent_dim=8, first_stage=str(first_stages["vector"])).resolved()
    with pytest.raises(ConfigError, match="denoiser 'unet' needs a spatial first-stage latent"):
        train(ldm_config(first_stages, tmp_path / "u", model="ldm-unet", stage="vector"))
    with pytest.raises(ConfigError, match="not a run folder"):
        train(TrainConfig(**COMMON, data_root=first_stages["root"], model="ldm-mlp", first_stage=str(tmp_path),
                          out=str(tmp_path / "x")))
    assert not (tmp_path / "u").exists() and not (tmp_path / "x").exists()


def test_latent_diffusion_study_validates_and_points_ldm_stages_at_their_first_stage(tmp_path):
    path = Path(__file__).resolve().parents[1] / "studies" / "latent-diffusion.yaml"
    for budget in ("full", "quick"):
        study = load_study(path, budget=budget)
        for name, first in (("ldm-vae", "vae"), ("ldm-klf4", "klf4"), ("cifar-cldm", "cifar-klf4")):
            stage = study.stage(name)
            assert stage["first_stage"] == first
            assert _train_config(study.path, stage, name, tmp_path).first_stage == str(tmp_path / first)
        assert study.stage("cifar-synth")["sampler"] == "dpmsolver++:guidance=2"


def test_compare_gives_an_ldm_two_entries_beside_its_first_stage(tmp_path, monkeypatch):
    """On a 3-class 8x8 image folder: compare a VAE and an LDM on its latents (classifier-space FID, confidence)."""
    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", classes=("c0", "c1", "c2"), per_class=20, size=8, channels=1)
    common = dict(dataset="imagefolder", data_root=str(tmp_path / "data"), epochs=1, batch_size=16, device="cpu",
                  tensorboard=False)
    vae = train(TrainConfig(model="conv", latent_dim=3, recon_likelihood="bernoulli", out=str(tmp_path / "vae"),
                            model_args={"channels": [4, 8], "fc_hidden": 16}, **common))
    ldm = train(TrainConfig(model="ldm-mlp", first_stage=str(vae), out=str(tmp_path / "ldm"), model_args=TINY_MLP,
                            **common))
    out = compare_runs([vae, ldm], out=tmp_path / "cmp", num_samples=30, ddim_steps=3, metrics="fid,confidence",
                       fid_features="classifier", timing_repeats=1, timing_max_steps=5, device="cpu")
    entries = json.loads((out / "comparison.json").read_text())["entries"]
    ldm_entries = [e for e in entries if e["family"] == "ldm"]
    assert [(e["sampler"]["sampler"], e["network_evaluations"]) for e in ldm_entries] == [("dpmsolver++", 20), ("ddim", 3)]
    for e in ldm_entries:
        assert "fid" in e["evaluation"] and "confidence" in e["evaluation"]
        assert e["parameters"] == Run(ldm).load_model().num_parameters  # the denoiser; the first stage is its own run
    assert "LDM, DPM-Solver++, 20 steps" in (out / "comparison.md").read_text()


def test_a_study_chains_first_stage_ldm_synth_and_cas_and_reruns_skipping(shared_datasets, tmp_path):
    tiny = {**COMMON, "data_root": str(shared_datasets)}
    study = {
        "name": "tiny-ldm", "stages": [
            {"name": "fs", "kind": "train", "set": {**tiny, "model": "kl-f4", "beta": 0.01, "model_args": {"channels": [8, 16]}}},
            {"name": "cldm", "kind": "train", "first_stage": "fs",
             "set": {**tiny, "model": "ldm-unet", "model_args": {**TINY_UNET, "class_conditional": True}}},
            {"name": "syn", "kind": "synth", "run": "cldm", "per_class": 2, "method": "prior",
             "sampler": "dpmsolver++:guidance=2"},
            {"name": "cas", "kind": "cas", "synthetic": "syn", "rows": ["synthetic"], "steps": 2, "test_subset": 50}],
        "claims": [{"id": "cas", "claim": "CAS of the LDM set", "ours": {"stage": "cas", "key": "rows.synthetic.top1"},
                    "verdict": {"rule": "report"}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    out = tmp_path / "out"
    run_study(path, out=out, device="cpu")
    assert Run(out / "cldm").config.first_stage == str((out / "fs").resolve())
    assert json.loads((out / "syn" / "manifest.json").read_text())["sampler"]["guidance"] == 2.0
    assert (out / "cas" / "cas.json").is_file()
    before = (out / "cldm" / "summary.json").stat().st_mtime_ns
    run_study(path, out=out, device="cpu")  # everything finished: skipped, the LDM's config still matches
    assert (out / "cldm" / "summary.json").stat().st_mtime_ns == before
