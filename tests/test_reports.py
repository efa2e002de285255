"""HTML reports (content, self-containment, bad folders), TensorBoard logs, and the page in a real browser.

The browser test needs Chromium (Debian package ``chromium``; ``make test`` installs it) and
Playwright. Where apt is unavailable it is skipped with a message; under CI (``$CI`` set) a missing
browser is a failure, never a skip.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from vaelab.cli import build_parser, main
from vaelab.config import TrainConfig
from vaelab.reports import CAPTIONS, ReportError, folder_kind, write_report
from vaelab.training import train

RUN_PICTURES = ["training_curves.png", "reconstructions.png", "samples.png", "interpolation.png",
                "latent_mu_pca.png", "latent_sigma_pca.png"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shared_datasets) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    config = TrainConfig(dataset="mnist", data_root=str(shared_datasets), train_subset=300, test_subset=200, epochs=2, batch_size=64, latent_dim=4,
                         log_every=100, device="cpu", out=str(out))
    return train(config)


def data_uris(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_of_a_run_has_every_section_and_picture(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for heading in ("Key numbers", "Training per epoch", "Pictures"):
        assert f">{heading}</h2>" in page
    for folded in ("Numbers: summary.json", "Config"):
        assert f"<summary>{folded}</summary>" in page
    summary = json.loads((run / "summary.json").read_text())
    embedded = data_uris(page)
    assert len(embedded) == len(RUN_PICTURES) == len(page.split("<img")) - 1
    for name in RUN_PICTURES:  # each file's exact bytes, with its caption
        assert base64.b64encode((run / name).read_bytes()).decode() in embedded
        caption = summary["captions"][name]  # written by the model family with the pictures
        assert "MNIST" in caption and html.escape(caption) in page, name
        assert f"[{name}]" in page
    assert "test split" in page and "MNIST" in page
    assert f"{summary['test_kl_nats']:.4g}" in page
    # self-contained: no external resource of any kind
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "<link" not in page and "url(" not in page


def first_heading_and_table(page: str) -> tuple[str, str]:
    heading = re.search(r"<h2 [^>]*>([^<]+)</h2>", page)[1]
    table = re.search(r"<table.*?</table>", page, re.S)[0]
    return heading, table


def folded(page: str, heading: str) -> str:
    """The content of the closed ``<details>`` titled ``heading``."""
    match = re.search(rf'<details id="[^"]+"><summary>{re.escape(heading)}</summary>(.*?)</details>', page, re.S)
    assert match, f"no <details> titled {heading}"
    return match[1]


def test_a_run_report_opens_with_its_key_numbers_beside_the_samples(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "eval.json").write_text(json.dumps({
        "settings": {"fid_features": ["inception", "classifier"]},
        "fid": {"value": 61.25, "floor": {"value": 2.125}, "num_samples": 1000, "real": "the MNIST test split"},
        "prdc": {"precision": 0.625, "recall": 0.375, "k_precision_recall": 5, "floor": {"precision": 0.75, "recall": 0.8125}},
        "fid_classifier": {"value": 9.5, "floor": {"value": 0.25}, "num_samples": 1000},
        "confidence": {"generated": {"mean_max_prob": 0.8125, "share_confident": 0.5, "confidence_threshold": 0.9,
                                     "class_balance": 0.875},
                       "real_test": {"mean_max_prob": 0.9375, "share_confident": 0.875, "class_balance": 0.9925}},
        "warnings": ["FID from 1,000 samples is biased upward"],
    }))
    page = write_report(run).read_text()
    summary = json.loads((run / "summary.json").read_text())
    heading, table = first_heading_and_table(page)
    assert heading == "Key numbers"
    # the headline: the family's numbers on the test split, FID with its floor, precision/recall, confidence vs real
    for text in ("test −ELBO (nats/image)", f"{summary['test_neg_elbo_nats']:.4g}", "MNIST test split (200 images)",
                 "FID [inception]", "61.25", "floor 2.125 (real train vs test)", "1,000 samples vs the MNIST test split",
                 "FID [classifier]", "floor 0.25", "precision / recall [inception]", "0.625 / 0.375", "floor 0.75 / 0.8125",
                 "confidence (mean top-1 probability)", "0.8125", "real test images 0.9375", "class balance"):
        assert html.escape(text) in table, text
    headline = page[page.index(">Key numbers</h2>"):page.index("<nav>")]
    assert "FID from 1,000 samples is biased upward" in headline
    samples = base64.b64encode((run / "samples.png").read_bytes()).decode()
    assert samples in headline and page.count(samples) == 1  # the sample grid beside the numbers, shown once
    # every raw field folds away below; the page no longer opens with them
    assert "<td>test_kl_nats</td>" in folded(page, "Numbers: summary.json")
    assert "<td>fid.floor.value</td>" in folded(page, "Numbers: eval.json")
    assert "<td>latent_dim</td>" in folded(page, "Config")
    assert page.index("<details") > page.index(">Pictures</h2>")


def test_a_study_report_opens_with_its_claims_beside_the_key_samples(tiny_run, tmp_path):
    folder = tmp_path / "study"
    (folder / "ev").mkdir(parents=True)
    shutil.copy(tiny_run / "samples.png", folder / "ev" / "eval_samples.png")
    shutil.copy(tiny_run / "reconstructions.png", folder / "ev" / "other.png")
    claims = [{"id": "fid", "claim": "FID of the VAE is 45.93", "stage": "ev", "seed": {"value": 45.93, "protocol": "pytorch-fid"},
               "ours": 61.25, "than": None, "unit": "", "protocol": "Inception, 1,000 samples", "verdict": "not reproduced",
               "why": "ours 61.25 vs seed 45.93, tolerance ±10"}]
    (folder / "study.json").write_text(json.dumps({
        "study": "s", "title": "S", "question": "Does the FID match?", "budget": "full", "claims": claims, "notes": [],
        "stages": [{"name": "ev", "kind": "evaluate", "seconds": 12.0, "done": True}]}))
    page = write_report(folder).read_text()
    heading, table = first_heading_and_table(page)
    assert heading == "Claims"
    assert re.findall(r"<th>([^<]+)</th>", table) == ["claim", "seed", "ours", "verdict"]
    assert "45.93" in table and "61.25" in table and "<b>not reproduced</b>" in table
    headline = page[page.index(">Claims</h2>"):page.index("<nav>")]
    grid = base64.b64encode((folder / "ev" / "eval_samples.png").read_bytes()).decode()
    assert grid in headline and page.count(grid) == 1 and "Stage ev:" in headline
    assert ">Protocols</h2>" in page and "pytorch-fid" in page and ">Stage ev</h2>" in page


def test_report_renders_unknown_json_and_pictures_generically(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "eval.json").write_text(json.dumps({
        "fid": {"value": 123.456, "feature_space": "evaluator classifier penultimate layer", "num_samples": 1000},
        "per_class": [0.9, 0.8], "confusion": [[5, 1], [2, 7]],
        "captions": {"eval/knn.png": "Nearest training images of 8 samples (feature space: pixels)."},
    }))
    (run / "eval").mkdir()
    shutil.copy(run / "samples.png", run / "eval" / "knn.png")
    shutil.copy(run / "samples.png", run / "mystery_plot.png")
    page = write_report(run).read_text()
    assert "<summary>Numbers: eval.json</summary>" in page and "fid.value" in page and "123.5" in page
    assert "evaluator classifier penultimate layer" in page
    assert "confusion" in page and "<th>1</th>" in page
    assert "Nearest training images of 8 samples (feature space: pixels)." in page
    assert "Picture mystery_plot.png found in this folder" in page
    assert len(data_uris(page)) == len(RUN_PICTURES) + 2


def test_report_of_a_comparison_folder(tiny_run, tmp_path):
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "comparison.json").write_text(json.dumps({"models": [{"name": "vae", "fid": 80.5}, {"name": "ddpm", "fid": 40.25}]}))
    (folder / "comparison.md").write_text("| model | FID |\n|---|---|\n| vae | 80.5 |\n")
    shutil.copy(tiny_run / "samples.png", folder / "compare_samples.png")
    assert folder_kind(folder) == "comparison"
    page = write_report(folder).read_text()
    assert "40.25" in page and "Text: comparison.md" in page
    assert CAPTIONS["compare_samples.png"][:40] in page and len(data_uris(page)) == 1


@pytest.mark.parametrize("make", ["missing", "empty", "only_pictures"])
def test_report_of_a_folder_with_nothing_to_report_names_the_path(tmp_path, make, capsys):
    folder = tmp_path / "f"
    if make != "missing":
        folder.mkdir()
    if make == "only_pictures":
        (folder / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ReportError, match=re.escape(str(folder))):
        write_report(folder)
    assert not (folder / "report.html").exists()
    assert main(["report", str(folder)]) == 2
    assert f"vaelab report: error: {folder}" in capsys.readouterr().err


# ---------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_and_images_every_epoch(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tiny_run / "tb"), size_guidance={"images": 0, "scalars": 0}).Reload()
    scalars, images = acc.Tags()["scalars"], acc.Tags()["images"]
    for tag in ("loss/train", "recon/train", "kl/train", "loss/val", "kl/val", "neg_elbo/val", "active_units/val",
                "schedule/beta", "schedule/lr"):
        assert tag in scalars
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("kl/val")] == pytest.approx([r["val_kl"] for r in rows])
    assert set(images) >= {"reconstructions/val", "samples/prior"}
    recon = acc.Images("reconstructions/val")
    assert [e.step for e in recon] == [1, 2] and recon[0].height > 28 and recon[0].width > 28 * 8


def test_no_tensorboard_flag():
    assert build_parser().parse_args(["train", "--no-tensorboard"]).tensorboard is False
    assert build_parser().parse_args(["train"]).tensorboard is None  # keeps the config's value (default True)
    assert TrainConfig().tensorboard is True


# ---------------------------------------------------------------------------- real browser


@pytest.fixture(scope="module")
def chromium() -> str:
    from vaelab.browser import find_chromium

    in_ci = bool(os.environ.get("CI"))
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[dev]' (make test does it)")
    path = find_chromium()
    if path is None:
        if in_ci:
            pytest.fail("CI: no Chromium at /usr/bin/chromium; .ci/run (make test) must apt-get install chromium")
        if shutil.which("apt-get") is None:
            pytest.skip("no Chromium and no apt-get on this machine to install it (Debian package 'chromium')")
        pytest.fail("no Chromium found: run 'make test' (installs it) or 'apt-get install chromium'")
    return path


def test_report_in_headless_chromium(tiny_run, tmp_path, chromium):
    from vaelab.browser import check_page, problems

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = check_page(write_report(run), tmp_path / "shot.png", executable=chromium)
    assert problems(result) == []
    assert result["images"] == len(RUN_PICTURES)
    shot = Path(result["screenshot"])
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10000


def test_browser_check_catches_broken_images_network_and_console_errors(tmp_path, chromium):
    from vaelab.browser import check_page, problems

    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="data:image/png;base64,AAAA"><img src="http://example.com/x.png">'
                    '<script>console.error("boom")</script></body></html>')
    result = check_page(page, None, executable=chromium)
    found = "\n".join(problems(result))
    assert result["images"] == 2 and len(result["broken_images"]) == 2
    assert "http://example.com/x.png" in found and "boom" in found
