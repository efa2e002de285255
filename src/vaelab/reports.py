"""One self-contained HTML page per run, sweep, comparison or study folder: ``FOLDER/report.html``.

The page opens with what a person looks for first: for a run its key numbers (the model family's
headline fields of ``summary.json``; FID with its train-vs-test floor, precision/recall and the
evaluator's confidence on samples against real images from ``eval.json``), for a study its claims
(the seed's number, ours, the verdict), each beside the key sample grid. Below come the tables and
every picture, each with a caption saying what it shows and on which split / feature space; the raw
key/value dumps (every field of ``summary.json`` and ``eval.json``, the config) are folded away in
``<details>`` elements. Pictures are embedded as
``data:image/png;base64`` URIs and the CSS is inline, so the file makes no network request and can
be mailed or archived on its own. There is no JavaScript.

What is read (top level of the folder unless said otherwise):

- run folder (``config.yaml`` + ``summary.json`` or ``metrics.jsonl``): ``summary.json``,
  ``metrics.jsonl`` (per-epoch table), ``config.yaml``, any other ``*.json`` (e.g. ``eval.json``) as
  tables, every ``*.png`` below the folder except ``checkpoints/`` and ``tb/``.
- sweep folder (``sweep.json``): the sweep table, ``sweep_curves.png``, the sample strips, and for
  every point its summary and pictures.
- comparison folder (``comparison.json``): every ``*.json`` as tables, ``*.md`` as text, every
  ``*.png``.

Captions come from a JSON file of the folder with a top-level ``"captions": {"file.png": "text"}``
mapping (a run's ``summary.json`` carries the captions its model family wrote), else from a table of
known file names (``CAPTIONS``: evaluation, sweep and comparison pictures); any other picture gets a
generic caption naming its file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import vaelab
from vaelab.errors import VaelabError
from vaelab.io import read_checked, read_json, write_text

# a stage that resumed an interrupted run timed only its last run
RESUMED_NOTE = " (its last run only: it resumed an interrupted one)"

REPORT_NAME = "report.html"
SKIP_DIRS = {"checkpoints", "tb", "logs", "configs", "__pycache__"}
MAX_INLINE_LIST = 12  # longer lists of numbers are summarised, not printed in full

# file name -> caption; {source} is the dataset label, {n_test} the number of test images
CAPTIONS: dict[str, str] = {
    "sweep_curves.png": (
        "Sweep curves: each metric against the swept value (one line per combination of the other swept "
        "values). Recon MSE, KL and -ELBO on the {source} test split; FID of prior samples against the test "
        "split in the feature space named in the table; training time on the machine that ran the sweep."
    ),
    "sweep_kl_per_dim.png": (
        "Per-dimension KL(q(z_i|x) || N(0,1)) of every sweep point on the {source} test split: sorted by size (left) "
        "and as a histogram over log10 KL (right). Dimensions near 0 nats carry no information about the image "
        "(collapsed); values in each point's eval.json."
    ),
    "eval_samples.png": (
        "64 of the generated images used for the FID/KID and confidence numbers in eval.json (prior samples of "
        "the model trained on {source})."
    ),
    "confidence_hist.png": (
        "Evaluator classifier's top-1 probability on generated samples and on real {source} test images "
        "(the threshold line marks a 'confident' prediction; numbers in eval.json)."
    ),
    "class_balance.png": (
        "Share of generated samples and of real {source} test images that the evaluator classifier assigns to "
        "each class (class balance = entropy of the distribution / log K)."
    ),
    "kl_per_dim.png": (
        "KL(q(z_i|x) || p(z_i)) per latent dimension and the variance of mu_i across the {source} test split; "
        "dimensions above the threshold count as active units."
    ),
    "compare_samples.png": (
        "Samples of the compared models side by side, one model per row (settings and numbers in the "
        "comparison tables above)."
    ),
}
# captions for families of files, matched on a word in the file name
CAPTION_PATTERNS: list[tuple[str, str]] = [
    ("confidence", "Histogram of the evaluator classifier's top-1 confidence; the split or sample set is named "
                   "in the file name and in the evaluation tables."),
    ("confusion", "Confusion matrix of the evaluator classifier (rows: true class, columns: predicted class)."),
    ("nearest", "Generated images next to their nearest neighbours in the training set."),
]
# the sample grid shown beside the headline numbers: the samples behind FID/KID when evaluated, else the run's own
KEY_GRIDS = ["eval_samples.png", "samples.png"]
ORDER = ["sweep_curves.png", "sweep_kl_per_dim.png", "training_curves.png", "reconstructions.png", "samples.png", "interpolation.png",
         "latent_mu_pca.png", "latent_sigma_pca.png", "latent_mu_tsne.png", "eval_samples.png", "confidence_hist.png",
         "class_balance.png", "kl_per_dim.png"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1200px;
padding:16px 28px;color:#1d1d1f;background:#fff;line-height:1.4}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.6em}.meta{color:#555;font-size:.9em}nav a{margin-right:1em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
.wide{overflow-x:auto;max-width:100%}table.kv td{max-width:760px}table.kv td.num{text-align:left}
figure{margin:1.2em 0;padding:8px;border:1px solid #e3e3e3;border-radius:4px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;image-rendering:pixelated;display:block}
figcaption{font-size:.88em;color:#333;margin-top:6px;max-width:900px}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:.85em}
.caption-file{font-family:monospace;color:#777}
.headline{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.headline-text{flex:1 1 520px;min-width:0}.headline figure{margin:.6em 0;flex:0 1 440px;max-width:440px}
table.key td.what{font-weight:600}table.key td{max-width:420px}table.key .why{font-weight:normal}
.why{color:#555;font-size:.9em}.warn{color:#8a4b00}
details{margin:1.2em 0;border:1px solid #e3e3e3;border-radius:4px;padding:4px 10px}
summary{font-size:1.2em;font-weight:600;cursor:pointer;padding:4px 0}
"""


class ReportError(VaelabError):
    """A folder holds nothing a report can be made of."""


# ---------------------------------------------------------------------------- entry points


def folder_kind(folder: str | Path) -> str:
    """``"study"``, ``"sweep"``, ``"comparison"`` or ``"run"``, from the files in ``folder``.

    Raises:
        ReportError: ``folder`` does not exist, or holds none of ``study.json``, ``sweep.json``,
            ``comparison.json``, or ``config.yaml`` with ``summary.json`` / ``metrics.jsonl``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; expected a run, sweep, comparison or study folder")
    if (folder / "study.json").is_file():
        return "study"
    if (folder / "sweep.json").is_file():
        return "sweep"
    if (folder / "comparison.json").is_file():
        return "comparison"
    if (folder / "config.yaml").is_file() and ((folder / "summary.json").is_file() or (folder / "metrics.jsonl").is_file()):
        return "run"
    raise ReportError(
        f"{folder} holds no study, run, sweep or comparison: expected study.json (vaelab study), sweep.json "
        "(vaelab sweep), comparison.json (a comparison) or config.yaml with summary.json / metrics.jsonl (vaelab train)"
    )


def write_report(folder: str | Path, *, out: str | Path | None = None) -> Path:
    """Write the self-contained HTML report of ``folder`` to ``out`` (default ``folder/report.html``).

    Raises:
        ReportError: the folder is not a run, sweep, comparison or study folder (see ``folder_kind``).
    """
    folder = Path(folder)
    page = build_report(folder)
    out = Path(out) if out is not None else folder / REPORT_NAME
    write_text(out, page)
    return out


def build_report(folder: str | Path) -> str:
    """The report of ``folder`` as one HTML string (see the module docstring for what it holds): the headline
    first (a study's claims, a run's key numbers, each beside the key sample grid), then the sections; raw
    key/value dumps (a run's summary.json and eval.json, configs) folded away in ``<details>`` elements."""
    folder = Path(folder)
    kind = folder_kind(folder)
    headline, sections = {"run": _run_report, "sweep": _sweep_report, "comparison": _comparison_report,
                          "study": _study_report}[kind](folder)
    title = f"{kind} report: {folder.resolve().name}"
    nav = " ".join(f'<a href="#{_anchor(s.heading)}">{html.escape(s.heading)}</a>' for s in sections)
    top = _render(headline) if headline else ""
    body = "\n".join(_render(s) for s in sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
        f"<p class=\"meta\">folder <code>{html.escape(str(folder.resolve()))}</code> &middot; written {stamp} by "
        f"vaelab {html.escape(vaelab.__version__)}</p>\n{top}\n<nav>{nav}</nav>\n{body}\n</body></html>\n"
    )


@dataclass
class Section:
    """One part of a report: a heading and its HTML; ``folded`` ones (raw dumps) sit in a closed ``<details>``."""

    heading: str
    content: str
    folded: bool = False


def _render(section: Section, level: int = 2) -> str:
    anchor, heading = _anchor(section.heading), html.escape(section.heading)
    if section.folded:
        return f'<details id="{anchor}"><summary>{heading}</summary>\n{section.content}\n</details>'
    return f'<h{level} id="{anchor}">{heading}</h{level}>\n{section.content}'


def _beside(text: str, picture: str) -> str:
    """``text`` (a table) and ``picture`` (a figure) side by side, wrapping below each other on narrow screens."""
    return f'<div class="headline"><div class="headline-text">{text}</div>{picture}</div>'


# ---------------------------------------------------------------------------- sections per kind


def _run_report(folder: Path) -> tuple[Section | None, list[Section]]:
    from vaelab.run import Run

    run = Run(folder)  # every file is read through Run: a damaged one names the command that writes it again
    summary = run.summary() or {}
    others = {path.name: run.read_json(path.name) for path in _json_files(folder, exclude={"summary.json"})}
    rows = run.metrics()
    config = run.config
    ctx = _context(folder, summary, dataset=config.dataset)
    pictures = _pictures(folder)
    grid = next((p for name in KEY_GRIDS for p in pictures if p.relative_to(folder).as_posix() == name), None)
    evaluation = others.get("eval.json") if isinstance(others.get("eval.json"), dict) else {}
    headline = _run_headline(run.family, summary, evaluation, rows, ctx,
                             figure(grid, caption(grid, folder, ctx)) if grid else "")
    sections = []
    if rows:
        sections.append(Section("Training per epoch", _p("train_* = running means over the epoch on the train split; "
                                                         "val_* = the held-out validation part of the train split; loss "
                                                         "terms in nats per image.") + rows_table(rows)))
    rest = [p for p in pictures if p != grid]
    if rest:
        sections.append(Section("Pictures", "\n".join(figure(p, caption(p, folder, ctx)) for p in rest)))
    if summary:
        sections.append(Section("Numbers: summary.json", _p(f"Every field, measured on the {ctx['source']} test split "
                                                            f"({ctx['n_test']} images).") + json_tables(summary),
                                folded=True))
    for name, obj in others.items():
        sections.append(Section(f"Numbers: {name}", json_tables(obj), folded=True))
    sections.append(Section("Config", _p("config.yaml: the resolved training config of this run.")
                            + json_tables({k: v for k, v in config.to_dict().items() if k != "out"}), folded=True))
    return headline, sections


def _run_headline(family, summary: dict, evaluation: dict, rows: list[dict], ctx: dict, grid: str) -> Section:
    """The run's key numbers: the family's headline fields of summary.json, then FID (with its floor),
    precision/recall, confidence against real images and the likelihood bound from eval.json."""
    on_test = f"{ctx['source']} test split ({ctx['n_test']} images)"
    items = [(_label(key), key, summary[key], "", on_test if key.startswith("test_") else "")
             for key in family.HEADLINE if key in summary]
    if not summary:
        last = rows[-1] if rows else {}
        items.append(("training", "", "not finished", f"{len(rows)} epoch(s) in metrics.jsonl",
                      f"last validation loss {format_value(last.get('val_loss'))}" if last else ""))
    items += _evaluation_items(evaluation)
    head = "<tr><th>number</th><th>value</th><th>beside it</th></tr>"
    body, shown_on = [], None
    for what, key, value, beside, on in items:
        where = f'<div class="why">{html.escape(on)}</div>' if on and on != shown_on else ""  # once per run of rows
        shown_on = on
        title = f' title="{html.escape(key)}"' if key else ""
        body.append(f'<tr><td class="what"{title}>{html.escape(what)}{where}</td>{_td(value)}'
                    f"<td>{html.escape(beside)}</td></tr>")
    body = "".join(body)
    notes = "".join(f'<p class="warn">WARNING: {html.escape(str(w))}</p>' for w in evaluation.get("warnings") or [])
    source = _p("From summary.json" + (" and eval.json" if evaluation else " (no eval.json: run `vaelab evaluate "
                                                                          "--run` for FID, precision/recall and "
                                                                          "confidence)") + "; every field below.")
    return Section("Key numbers", _beside(_table(head + body, cls="key") + notes + source, grid))


def _evaluation_items(ev: dict) -> list[tuple[str, str, Any, str, str]]:
    """``(label, key, value, beside it, measured on)`` rows of the headline numbers of an ``eval.json``."""
    items = []
    spaces = (ev.get("settings") or {}).get("fid_features") or []
    for key, entry in ev.items():
        if not (key == "fid" or key.startswith("fid_")) or not isinstance(entry, dict) or "value" not in entry:
            continue
        suffix = key[len("fid"):]
        space = suffix.lstrip("_") or (spaces[0] if spaces else entry.get("feature_space", ""))
        n = entry.get("num_samples")
        on = (f"{n:,} samples vs {entry.get('real', 'the test split')}" if isinstance(n, int) else "")
        floor = _get(entry, "floor", "value") if isinstance(entry.get("floor"), dict) else entry.get("floor")
        items.append((f"FID [{space}]", f"{key}.value", entry["value"],
                      f"floor {format_value(floor)} (real train vs test)" if floor is not None else "", on))
        prdc = ev.get(f"prdc{suffix}")
        if isinstance(prdc, dict) and prdc.get("precision") is not None:
            fl = prdc.get("floor") or {}
            items.append((f"precision / recall [{space}]", f"prdc{suffix}",
                          f"{format_value(prdc['precision'])} / {format_value(prdc.get('recall'))}",
                          f"floor {format_value(fl.get('precision'))} / {format_value(fl.get('recall'))}" if fl else "",
                          f"k = {prdc.get('k_precision_recall', '?')} nearest neighbours"))
    conf = ev.get("confidence")
    if isinstance(conf, dict) and isinstance(conf.get("generated"), dict):
        g, r = conf["generated"], conf.get("real_test") or {}
        for name, label in (("mean_max_prob", "confidence (mean top-1 probability)"),
                            ("share_confident", f"share confident (top-1 ≥ {g.get('confidence_threshold', '?')})"),
                            ("class_balance", "class balance (entropy / log K)")):
            if g.get(name) is not None:
                items.append((label, f"confidence.generated.{name}", g[name],
                              f"real test images {format_value(r.get(name))}", "evaluator classifier on the samples"))
    nll = ev.get("nll")
    if isinstance(nll, dict) and nll.get("iwae_nll_nats") is not None:
        items.append((f"IWAE NLL (k = {nll.get('k', '?')}, nats/image)", "nll.iwae_nll_nats", nll["iwae_nll_nats"],
                      f"−ELBO {format_value(nll.get('neg_elbo_nats'))}", str(nll.get("split", ""))))
    dis = ev.get("disentanglement")
    if isinstance(dis, dict) and isinstance(dis.get("mig"), dict) and isinstance(dis.get("dci"), dict):
        names = ", ".join(dis.get("factor_names") or [])
        items.append(("MIG", "disentanglement.mig.mig", dis["mig"].get("mig"), f"factors: {names}",
                      str(dis.get("split", ""))))
        d = dis["dci"]
        items.append(("DCI disentanglement / completeness / informativeness", "disentanglement.dci",
                      " / ".join(format_value(d.get(k)) for k in ("disentanglement", "completeness", "informativeness")),
                      "informativeness: held-out accuracy", str(d.get("regressor", ""))))
    return items


def _get(d: Any, *path: str) -> Any:
    for part in path:
        d = d.get(part) if isinstance(d, dict) else None
    return d


LABEL_WORDS = [("neg_elbo", "−ELBO"), ("eps_mse", "ε-MSE"), ("images_per_s", "images/s"), ("per_pixel", "per pixel"),
               ("mse", "MSE"), ("kl", "KL"), ("recon", "reconstruction")]


def _label(key: str) -> str:
    """A summary.json key for people: ``test_neg_elbo_nats`` -> ``test −ELBO (nats/image)``."""
    text, unit = key, ""
    if text.endswith("_nats"):
        text, unit = text[: -len("_nats")], " (nats/image)"
    elif text.endswith("_time_s"):
        text, unit = text[: -len("_s")], " (s)"
    for word, shown in LABEL_WORDS:
        text = re.sub(rf"(^|_){word}(?=_|$)", lambda m: m[1] + shown, text)
    return text.replace("_", " ") + unit


def _sweep_report(folder: Path) -> tuple[Section | None, list[Section]]:
    sweep = _read_json(folder / "sweep.json")
    points = sweep.get("points", [])
    axes = sweep.get("axes", {})
    sections = [Section("Sweep", _p(sweep.get("description", "")) + _sweep_table(sweep))]
    pictures = [p for p in _pictures(folder, recursive=False) if p.name != "sweep_curves.png"]
    if (folder / "sweep_curves.png").is_file():
        ctx = {"source": sweep.get("dataset", "the dataset"), "n_test": "the"}
        sections.append(Section("Curves", figure(folder / "sweep_curves.png",
                                                 caption(folder / "sweep_curves.png", folder, ctx))))
    strips = []
    for point in points:
        strip = folder / point.get("samples", "")
        if point.get("samples") and strip.is_file():
            how = ", ".join(f"{k} {v}" for k, v in point.get("sampler", {"sampler": "prior"}).items())
            strips.append(figure(strip, f"Point {point['name']}: 16 samples ({how}), the same seed for every point "
                                        "(no test image involved)."))
    if strips:
        sections.append(Section("Samples per point", "\n".join(strips)))
    if pictures:
        sections.append(Section("Other pictures", "\n".join(figure(p, caption(p, folder, {})) for p in pictures)))
    for point in points:
        run_dir = folder / point.get("run_dir", point["name"])
        if (run_dir / "config.yaml").is_file():
            headline, parts = _run_report(run_dir)
            shown = [headline] if headline else []
            shown += [s for s in parts if s.heading != "Config"]
            sections.append(Section(f"Point {point['name']}", "\n".join(_render(s, level=3) for s in shown)))
    base = sweep.get("base_config")
    if base:
        sections.append(Section("Config", _p("Base config of every point; the swept fields "
                                             f"({', '.join(axes)}) replace its values.") + json_tables(base), folded=True))
    return None, sections


def _comparison_report(folder: Path) -> tuple[Section | None, list[Section]]:
    sections = []
    for path in _json_files(folder):
        sections.append(Section(f"Numbers: {path.name}", json_tables(_read_json(path))))
    for path in sorted(folder.glob("*.md")):
        sections.append(Section(f"Text: {path.name}", f"<pre>{html.escape(path.read_text())}</pre>"))
    pictures = _pictures(folder)
    if pictures:
        sections.append(Section("Pictures", "\n".join(figure(p, caption(p, folder, {})) for p in pictures)))
    if (folder / "config.yaml").is_file():
        sections.append(Section("Config", json_tables(_read_yaml(folder / "config.yaml")), folded=True))
    return None, sections


def _study_report(folder: Path) -> tuple[Section | None, list[Section]]:
    study = _read_json(folder / "study.json")
    claims = study["claims"]
    grid_dir, grid = _study_grid(folder, study)
    picture = ""
    if grid is not None:
        ctx = _context(grid_dir, _read_json(grid_dir / "summary.json") or {}, dataset=study.get("dataset"))
        picture = figure(grid, f"Stage {grid_dir.name}: {caption(grid, grid_dir, ctx)}")
    head = "<tr><th>claim</th><th>seed</th><th>ours</th><th>verdict</th></tr>"
    body = "".join(f"<tr><td>{html.escape(c['claim'])}</td><td>{html.escape(_seed_text(c))}</td>"
                   f"<td>{html.escape(_ours_text(c))}</td><td><b>{html.escape(c['verdict'])}</b>"
                   f"<div class=\"why\">{html.escape(c['why'])}</div></td></tr>" for c in claims)
    intro = _p(study.get("question", "")) + _p(f"Budget: {study['budget']}.")
    claims_table = _table(head + body, cls="key")
    tables = "".join(_study_table(t) for t in study.get("tables", []))
    # a study with tables opens with them (the claims, one per row, can run to a hundred rows)
    headline = Section("Results" if tables else "Claims", intro + _beside(tables or claims_table, picture))
    full_head = "".join(f"<th>{h}</th>" for h in ("claim", "seed", "ours", "seed's protocol", "our protocol"))
    full = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in (
        c["claim"], _seed_text(c), _ours_text(c), (c.get("seed") or {}).get("protocol", ""), c.get("protocol", "")))
        + "</tr>" for c in claims)
    sections = [Section("Claims", claims_table)] if tables else []
    sections.append(Section("Protocols", _p("How the seed measured each number, and how this study measured ours.")
                            + _table(f"<tr>{full_head}</tr>\n{full}")))
    stages = "".join(f"<li><code>{html.escape(s['name'])}</code> ({html.escape(s['kind'])})"
                     + (f", {s['seconds']:.0f} s" + (RESUMED_NOTE if s.get("resumed") else "") if "seconds" in s else "") + "</li>" for s in study["stages"])
    sections.append(Section("Stages", f"<ul>{stages}</ul>"))
    for s in study["stages"]:
        stage_dir = folder / s["name"]
        pictures = [p for p in _pictures(stage_dir, recursive=False) if p != grid] if stage_dir.is_dir() else []
        if pictures:
            ctx = _context(stage_dir, _read_json(stage_dir / "summary.json") or {}, dataset=study.get("dataset"))
            sections.append(Section(f"Stage {s['name']}", "\n".join(figure(p, caption(p, stage_dir, ctx)) for p in pictures)))
    for note in study.get("notes", []):
        sections.append(Section("Notes", _p(note)))
    return headline, sections


def _study_table(table: dict) -> str:
    """One of a study's ``tables`` (rows x columns of claims) as an HTML table under its title."""
    head = "<tr><th></th>" + "".join(f"<th>{html.escape(c)}</th>" for c in table["columns"]) + "</tr>"
    body = "".join("<tr><td>" + html.escape(row["label"]) + "</td>" + "".join(
        "<td>—</td>" if c is None else f"<td>{_number(c['ours'])}</td>" for c in row["cells"])
        + "</tr>" for row in table["rows"])
    return f"<h3>{html.escape(table['title'])}</h3>" + _table(head + body)


def _number(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4g}"


def _seed_text(claim: dict) -> str:
    seed = claim.get("seed") or {}
    return f"{seed['value']:.4g}{claim['unit']}" if seed.get("value") is not None else seed.get("text", "no number")


def _ours_text(claim: dict) -> str:
    ours = "not measured" if claim["ours"] is None else f"{claim['ours']:.4g}{claim['unit']}"
    return ours + (f" vs {claim['than']:.4g}{claim['unit']}" if claim.get("than") is not None else "")


def _study_grid(folder: Path, study: dict) -> tuple[Path | None, Path | None]:
    """``(stage folder, picture)``: the sample grid of the stage behind the first claim with a number, else the first
    stage with one (evaluation samples before training samples)."""
    stages = [c.get("stage") for c in study["claims"] if c.get("ours") is not None and c.get("stage")]
    stages += [s["name"] for s in study["stages"]]
    for name in KEY_GRIDS:
        for stage in dict.fromkeys(stages):
            if (folder / stage / name).is_file():
                return folder / stage, folder / stage / name
    return None, None


def _sweep_table(sweep: dict) -> str:
    columns = sweep.get("columns")
    points = sweep.get("points", [])
    if not columns or not points:
        return json_tables(sweep)
    header = "".join(f"<th>{html.escape(c['label'])}</th>" for c in columns)
    body = []
    for point in points:
        flat = {**point.get("values", {}), **point.get("metrics", {})}
        body.append("<tr>" + "".join(_td(flat.get(c["key"])) for c in columns) + "</tr>")
    return _table(f"<tr>{header}</tr>\n" + "\n".join(body))


# ---------------------------------------------------------------------------- building blocks


def figure(path: Path, text: str) -> str:
    """An ``<figure>`` with ``path`` embedded as a PNG data URI and ``text`` as its caption."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'
            f'<figcaption>{html.escape(text)} <span class="caption-file">[{html.escape(Path(path).name)}]</span>'
            "</figcaption></figure>")


def caption(path: Path, folder: Path, ctx: dict) -> str:
    """The caption of picture ``path``: a folder-provided caption, a known name, a name pattern, or generic."""
    name = path.name
    rel = path.relative_to(folder).as_posix()
    for own in _own_captions(folder):
        if rel in own or name in own:
            return str(own.get(rel, own.get(name)))
    ctx = {"source": ctx.get("source") or "the dataset", "n_test": ctx.get("n_test") or "the"}
    if name in CAPTIONS:
        return CAPTIONS[name].format(**ctx)
    for word, text in CAPTION_PATTERNS:
        if word in name:
            return text
    return f"Picture {rel} found in this folder; vaelab has no caption for this file name (see the tables above for its numbers)."


def json_tables(obj: Any) -> str:
    """Tables for any JSON value: a dict becomes key/value rows (nested keys dotted), lists of dicts
    become row tables, numeric matrices become grids; numbers are formatted to 4 significant digits."""
    if isinstance(obj, list) and obj and all(isinstance(r, dict) for r in obj):
        return rows_table(obj)
    if not isinstance(obj, dict):
        return f"<pre>{html.escape(json.dumps(obj, indent=1)[:2000])}</pre>"
    flat, extra = {}, []
    _flatten(obj, "", flat, extra)
    out = ""
    if flat:
        out += _table("<tr><th>field</th><th>value</th></tr>" + "".join(
            f"<tr><td>{html.escape(k)}</td>{_td(v)}</tr>" for k, v in flat.items()), cls="kv")
    for title, table in extra:
        out += f"<p><b>{html.escape(title)}</b></p>{table}"
    return out


def rows_table(rows: list[dict]) -> str:
    """A table with one row per dict and the union of keys (first-seen order) as columns."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys and not isinstance(r[k], (dict, list))]
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(_td(r.get(k)) for k in keys) + "</tr>" for r in rows)
    return _table(f"<tr>{head}</tr>{body}")


def _flatten(obj: dict, prefix: str, flat: dict, extra: list) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if key == "captions" and not prefix:
            continue
        if isinstance(value, dict):
            _flatten(value, f"{name}.", flat, extra)
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            extra.append((name, rows_table(value)))
        elif _is_matrix(value):
            extra.append((name, _matrix(value)))
        else:
            flat[name] = value


def _is_matrix(value: Any) -> bool:
    return (isinstance(value, list) and 1 < len(value) <= 100 and all(isinstance(r, list) and len(r) == len(value[0])
            and all(_is_number(v) for v in r) for r in value))


def _matrix(value: list[list]) -> str:
    head = "<tr><th></th>" + "".join(f"<th>{j}</th>" for j in range(len(value[0]))) + "</tr>"
    body = "".join(f"<tr><th>{i}</th>" + "".join(_td(v) for v in row) + "</tr>" for i, row in enumerate(value))
    return _table(head + body)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_value(v: Any) -> str:
    """Numbers to 4 significant digits (integers in full), lists of numbers inline or summarised."""
    if isinstance(v, bool) or v is None:
        return "—" if v is None else str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    if isinstance(v, list):
        if len(v) <= MAX_INLINE_LIST:
            return "[" + ", ".join(format_value(x) for x in v) + "]"
        if all(_is_number(x) for x in v):
            return f"{len(v)} numbers, min {format_value(min(v))}, mean {format_value(sum(v) / len(v))}, max {format_value(max(v))}"
        return f"list of {len(v)} items"
    return str(v)


def _table(rows: str, *, cls: str = "") -> str:
    """A table in a horizontally scrolling box, so a wide table never widens the page."""
    attr = f' class="{cls}"' if cls else ""
    return f'<div class="wide"><table{attr}>{rows}</table></div>'


def _td(v: Any) -> str:
    cls = ' class="num"' if _is_number(v) else ""
    return f"<td{cls}>{html.escape(format_value(v))}</td>"


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>" if text else ""


def _anchor(heading: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in heading.lower()).strip("-")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return read_json(path, remedy="restore it from a copy, or delete it and rerun the command that wrote it, then "
                                  "`vaelab report` again")


def _json_files(folder: Path, *, exclude: set[str] = frozenset()) -> list[Path]:
    return [p for p in sorted(folder.glob("*.json")) if p.name not in exclude and not p.name.startswith(".")]


def _own_captions(folder: Path) -> list[dict]:
    found = []
    for path in _json_files(folder):
        obj = _read_json(path)
        if isinstance(obj, dict) and isinstance(obj.get("captions"), dict):
            found.append(obj["captions"])
    return found


def _pictures(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Every PNG of ``folder`` (below it too unless ``recursive`` is false), known names first."""
    found = []
    candidates = folder.rglob("*.png") if recursive else folder.glob("*.png")
    for p in candidates:
        rel = p.relative_to(folder).parts
        if any(part.startswith(".") or part in SKIP_DIRS for part in rel):
            continue
        found.append(p)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(found, key=lambda p: (len(p.relative_to(folder).parts), rank.get(p.name, len(ORDER)), p.as_posix()))


def _context(folder: Path, summary: dict, *, dataset: str | None = None) -> dict:
    n = summary.get("num_test_images")
    source = summary.get("dataset") or dataset
    if source is None and (folder / "config.yaml").is_file():
        source = _read_yaml(folder / "config.yaml").get("dataset")
    return {"source": source or "the dataset", "n_test": f"{n:,}" if isinstance(n, int) else "the"}


def _read_yaml(path: Path) -> dict:
    values = read_checked(path, lambda p: yaml.safe_load(p.read_text()) or {},
                          remedy="restore it from a copy, then `vaelab report` again")
    return values if isinstance(values, dict) else {}


def report_command(folder: str | Path, *, out: str | Path | None = None, screenshot: str | Path | None = None) -> str:
    """``vaelab report``: write the report; with ``screenshot``, also open it in headless Chromium
    (network blocked, see ``vaelab.browser``) and write a full-page PNG. Returns lines to print.

    Raises:
        ReportError: bad folder. VaelabError: the browser check found a problem (each one listed).
    """
    path = write_report(folder, out=out)
    lines = [f"report: {path}"]
    if screenshot is not None:
        from vaelab.browser import check_page, problems

        result = check_page(path, screenshot)
        found = problems(result)
        if found:
            raise VaelabError(f"{path} failed the browser check:\n  " + "\n  ".join(found))
        lines.append(f"checked in headless Chromium: {result['images']} images decode, no console errors, "
                     f"no network requests; screenshot: {result['screenshot']}")
    return "\n".join(lines)
