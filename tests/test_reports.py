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
    for heading in ("Summary (test split)", "Training per epoch", "Pictures", "Config"):
        assert f">{heading}</h2>" in page
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
    assert "Numbers: eval.json" in page and "fid.value" in page and "123.5" in page
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
