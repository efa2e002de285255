"""``vaelab`` command line: a thin layer over the library; every command maps to one function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vaelab.errors import VaelabError

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
    if not full:
        return
    p.add_argument("--model", help="model preset: mnist-small | cifar-seed | conv | cvae-mnist | cvae-cifar | cvae-conv")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--latent-dim", "--latent_dim", dest="latent_dim", type=int)
    p.add_argument("--beta", type=float)
    p.add_argument("--beta-schedule", "--beta_schedule", dest="beta_schedule", help="constant | linear | cyclical")
    p.add_argument("--kl-anneal-epochs", "--kl_anneal_epochs", dest="kl_anneal_epochs", type=int)
    p.add_argument("--recon-likelihood", "--recon_likelihood", dest="recon_likelihood",
                   help="bernoulli | gaussian | discretized_logistic")
    p.add_argument("--binarize", action="store_true", default=None,
                   help="dynamically binarise training images (Bernoulli likelihood on binary MNIST)")
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, help="use the first N train images")
    p.add_argument("--tsne", action="store_true", default=None, help="also plot t-SNE of the test latents")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelab", description="Train, sample and evaluate VAEs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model and write a run folder")
    _train_options(p)

    p = sub.add_parser("run", help="quickstart main job: a short VAE run on real MNIST")
    _train_options(p, full=False)

    p = sub.add_parser("sample", help="draw prior samples from a trained run into a PNG grid")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--class", dest="class_label", help="conditional models: class index or name to draw")

    p = sub.add_parser("synth", help="write a labelled synthetic dataset decoded from a VAE run's latent space")
    p.add_argument("--run", required=True, help="run folder of a trained VAE or conditional VAE")
    p.add_argument("--out", required=True, help="folder to create (ImageFolder of PNGs + train.safetensors + manifest.json)")
    p.add_argument("--per-class", "--per_class", dest="per_class", type=int, default=5000)
    p.add_argument("--method", help="class-mean (default for VAEs) | class-std | class-gaussian | prior (default for CVAEs)")
    p.add_argument("--noise-scale", "--noise_scale", dest="noise_scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("cas", help="classification accuracy score: train on real / synthetic / both, test on real")
    p.add_argument("--synthetic", required=True, help="synthetic set folder (train.safetensors or train/<class>/*)")
    p.add_argument("--dataset", required=True, help="the real dataset: mnist | fashion-mnist | cifar10 | imagefolder | tensors")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="folder holding the real dataset")
    p.add_argument("--out", help="results folder to create (default SYNTHETIC/cas)")
    p.add_argument("--epochs", type=int, help="classifier epochs for every row (default: the evaluator recipe's)")
    p.add_argument("--rows", help="comma-separated subset of real,synthetic,real+synthetic (default: all three)")
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, help="first N real train images")
    p.add_argument("--test-subset", "--test_subset", dest="test_subset", type=int, help="first N real test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("evaluate", help="compute FID/KID, confidence, reconstruction, likelihood, latent and speed metrics of a run")
    p.add_argument("--run", required=True, help="run folder")
    p.add_argument("--metrics", help="comma-separated: fid,kid,confidence,recon,nll,latent,speed (default: all)")
    p.add_argument("--fid-features", default="classifier", help="classifier (offline default) | inception")
    p.add_argument("--inception-weights", help="path of the FID Inception weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--num-samples", type=int, default=10000, help="generated images for FID/KID/confidence")
    p.add_argument("--iwae-k", type=int, default=1000, help="importance samples per image for the IWAE bound")
    p.add_argument("--nll-subset", type=int, help="likelihood on the first N test images only (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("evaluator", help="evaluator classifiers (the yardstick of FID/KID and confidence metrics)")
    ev = p.add_subparsers(dest="action", required=True)
    p = ev.add_parser("train", help="train (or load from the cache) a dataset's evaluator and print its test accuracy")
    p.add_argument("--dataset", required=True, help="mnist | fashion-mnist | cifar10 | imagefolder")
    p.add_argument("--data-root", "--data_root", dest="data_root", help="folder holding the dataset")
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="retrain even when a cached evaluator exists")
    return parser


def _config_from_args(args: argparse.Namespace, base: dict | None = None):
    from vaelab.config import TrainConfig, config_from_dict, load_config, with_overrides

    config = load_config(args.config) if args.config else config_from_dict(base or {})
    skip = {"command", "config", "resume"}
    return with_overrides(config, {k: v for k, v in vars(args).items() if k not in skip})


def _print_outputs(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("test_recon_nats", "test_kl_nats", "test_neg_elbo_nats", "test_mse_per_pixel", "active_units", "train_time_s")
    print(f"\nrun folder: {run_dir}")
    print(f"test split of {summary['dataset']}: " + ", ".join(f"{k}={summary[k]:.4g}" for k in keys))
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
        elif args.command == "sample":
            from vaelab.generation import sample_run

            print(sample_run(args.run, args.n, args.out, seed=args.seed, device=args.device, class_label=args.class_label))
        elif args.command == "synth":
            from vaelab.synthesis import synthesize

            out = synthesize(args.run, args.out, per_class=args.per_class, method=args.method,
                             noise_scale=args.noise_scale, seed=args.seed, device=args.device)
            print(f"synthetic dataset: {out} (manifest.json, train.safetensors, train/<class>/*.png, synthetic_grid.png)")
        elif args.command == "cas":
            from vaelab.cas import ROWS, cas

            rows = tuple(r.strip() for r in args.rows.split(",") if r.strip()) if args.rows else ROWS
            report = cas(args.synthetic, args.dataset, data_root=args.data_root, out=args.out, epochs=args.epochs,
                         seed=args.seed, device=args.device, train_subset=args.train_subset,
                         test_subset=args.test_subset, rows=rows)
            print("\n" + report["table"])
        elif args.command == "evaluate":
            from vaelab.evaluation import describe, evaluate_run

            result = evaluate_run(args.run, metrics=args.metrics, fid_features=args.fid_features, num_samples=args.num_samples,
                                  iwae_k=args.iwae_k, nll_subset=args.nll_subset, inception_weights=args.inception_weights,
                                  seed=args.seed, device=args.device)
            print(describe(result))
            print(f"  {Path(args.run) / 'eval.json'}")
        elif args.command == "evaluator":
            from vaelab.evaluator import build_evaluator, describe_evaluator
            from vaelab.training import select_device

            _, info = build_evaluator(args.dataset, data_root=args.data_root, device=select_device(args.device), force=args.force)
            print(describe_evaluator(info))
    except VaelabError as exc:
        print(f"vaelab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
