"""Evaluator-confidence metrics of generated images: max-probability, confident share, class balance."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vaelab import plots

CONFIDENT = 0.8  # "confident" sample: evaluator max-probability >= this
MAX_PROB_BINS = 20  # histogram of the evaluator's max-probability kept in eval.json


def confidence_metrics(logits: torch.Tensor, *, threshold: float = CONFIDENT) -> dict:
    """Evaluator confidence on a set of images, from its logits ``(N, K)``.

    Returns:
        dict with ``mean_max_prob`` (mean over images of the largest softmax probability, in
        [1/K, 1]), ``share_confident`` (fraction with max-probability >= ``threshold``),
        ``class_distribution`` (fraction predicted as each class, K floats), ``class_entropy_nats``
        (entropy H of that distribution), ``class_balance`` (``H / log K`` in [0, 1]: 1 = every class
        predicted equally often; balance of the predicted classes, not the coverage of Naeem et al.
        2020), ``effective_classes`` (``exp(H)``) and ``max_prob_histogram`` (image counts of the
        max-probability in ``MAX_PROB_BINS`` equal bins of [0, 1]).
    """
    probs = logits.float().softmax(1)
    k = probs.shape[1]
    max_prob = probs.max(1).values
    dist = torch.bincount(probs.argmax(1), minlength=k).double() / len(probs)
    entropy = float(-(dist[dist > 0] * dist[dist > 0].log()).sum())
    return {
        "mean_max_prob": float(max_prob.mean()),
        "share_confident": float((max_prob >= threshold).double().mean()),
        "confidence_threshold": threshold,
        "class_distribution": dist.tolist(),
        "class_entropy_nats": entropy,
        "class_balance": entropy / math.log(k),
        "effective_classes": math.exp(entropy),
        "max_prob_histogram": torch.histc(max_prob, bins=MAX_PROB_BINS, min=0.0, max=1.0).long().tolist(),
    }


def confidence_report(evaluator, fake, fake_y, test, run_dir: Path, *, device) -> dict:
    from vaelab.evaluator import predict_logits

    fake_logits = predict_logits(evaluator, fake, device=device, desc="classifying: generated")
    real_logits = predict_logits(evaluator, test.images, device=device, desc="classifying: real test")
    out = {
        "metric": "evaluator confidence", "feature_space": "evaluator softmax", "num_samples": len(fake),
        "split": f"{test.source} test split, {len(test):,} images",
        "generated": confidence_metrics(fake_logits), "real_test": confidence_metrics(real_logits),
        "classes": test.classes,
    }
    if fake_y is not None:
        out["generated"]["label_accuracy"] = float((fake_logits.argmax(1) == fake_y).double().mean())
        out["label_accuracy_definition"] = "share of samples generated with label c that the evaluator classifies as c"
    plots.confidence_hist([("generated samples", out)], run_dir / "confidence_hist.png")
    plots.class_balance(out["generated"], out["real_test"], test.classes, run_dir / "class_balance.png", source=test.source)
    return out
