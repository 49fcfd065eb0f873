"""One self-contained HTML report per run: metrics, curves, robustness, t-SNE and a gallery."""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline import store
from pipeline.atomic import write_text
from pipeline.data import load_rgb
from pipeline.errors import DataUnusable
from pipeline.metrics import REAL_CLASS, Scores, confusion, pr_points, roc_points
from pipeline.perturb import KINDS as PERTURBATION_KINDS
from pipeline.perturb import parse_perturbation
from pipeline.runner import timings_path

logger = logging.getLogger(__name__)

#: Metrics shown as percentages, in column order; other keys follow, sorted.
FRACTIONS = ("acc", "r_acc", "f_acc", "ap", "auc", "f1", "f1_macro", "f1_weighted")
COUNTS = ("n", "n_real", "n_generated")
_HEADINGS = {
    "acc": "acc",
    "r_acc": "real acc",
    "f_acc": "generated acc",
    "ap": "AP",
    "auc": "AUC",
    "f1": "F1",
    "f1_macro": "F1 macro",
    "f1_weighted": "F1 weighted",
    "n": "n",
    "n_real": "n real",
    "n_generated": "n generated",
    "val_threshold": "threshold (val)",
    "acc_at_val_threshold": "acc @ val thr.",
    "r_acc_at_val_threshold": "real acc @ val thr.",
    "f_acc_at_val_threshold": "generated acc @ val thr.",
}
#: Above this many feature rows t-SNE runs on a seeded subsample (a few seconds on 2 cores).
TSNE_MAX_POINTS = 2000
#: Longer side of gallery thumbnails, in pixels.
THUMB_SIZE = 320
_BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", "-.", ":")
# Fonts tried, in order, for labels drawn into thumbnails (object phrases may be CJK); the first
# installed one that covers every character of a label is used.
_LABEL_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "DejaVu Sans",
)
_AXIS = {
    "noise": "noise σ ([0, 1] pixel scale)",
    "blur": "blur σ (pixels)",
    "jpeg": "JPEG quality (lower is harsher)",
}
_SHORT = {"noise": "σ", "blur": "σ", "jpeg": "q"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK SC",
"Noto Sans CJK JP","WenQuanYi Zen Hei","Droid Sans Fallback",sans-serif;margin:0 auto;
max-width:1200px;padding:0 16px 48px;color:#1d1d1f;background:#fff}
h1{margin:24px 0 4px}h2{margin-top:40px;border-bottom:2px solid #ddd;padding-bottom:4px}
nav a{margin-right:14px}
.banner{background:#b00020;color:#fff;font-weight:600;padding:14px 18px;border-radius:6px;
margin:16px 0;font-size:16px}
.note{color:#555;font-style:italic}
table{border-collapse:collapse;margin:8px 0 16px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}
img.plot{max-width:100%;height:auto;display:block;margin:8px 0}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:16px}
.card{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa}
.card img{display:block;max-width:100%;height:auto;margin:0 auto}
.card p{margin:4px 0}.card table{margin:4px 0;font-size:12px}
.tag{display:inline-block;padding:1px 6px;border-radius:4px;color:#fff;font-size:12px}
.tag.real{background:#2e7d32}.tag.generated{background:#c62828}
.missing{padding:40px 8px;text-align:center;background:#eee;color:#555}
.caption{font-style:italic}.meta{color:#666;font-size:12px;word-break:break-all}
ol.objects{margin:4px 0;padding-left:18px;font-size:12px}
"""


def build_report(
    out_dir: Path,
    *,
    metrics_dir: Path,
    scores_dir: Path,
    features_dir: Path,
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    kind: str = "item",
    n_gallery: int = 12,
    seed: int = 0,
    title: str = "misalign report",
    clip_dir: Path | None = None,
) -> Path:
    """Write `out_dir/index.html`: one HTML file with every picture embedded, openable offline.

    A section whose inputs are absent is replaced by a short note saying what is missing;
    inputs that are present but malformed raise, naming the file.

    Args:
        out_dir: folder of the report (created if needed).
        metrics_dir: holds `eval.json`, optional `eval_<name>.json` (perturbations such as
            `jpeg_75`, or other datasets) and optional `qf_matrix.json`.
        scores_dir: per-image scores, one `<head>.csv` per head.
        features_dir: features shards, for the t-SNE plot.
        ingest_dir, captions_dir, objects_dir: row-aligned shards, for the gallery.
        clip_dir: encode shards, for the Run table (default: `clip/` beside `ingest_dir`).
        kind: feature kind of the t-SNE plot (`pipeline.features.KINDS`).
        n_gallery: number of gallery images.
        seed: seeds the gallery choice, the t-SNE subsample and t-SNE itself.
        title: page title.

    Returns:
        The path of the written `index.html`.
    """
    if n_gallery < 0:
        raise ValueError(f"n_gallery must be >= 0, got {n_gallery}")
    out_dir = Path(out_dir)
    metrics_dir = Path(metrics_dir)
    attrs = _stage_attrs(
        {
            "ingest": Path(ingest_dir),
            "captions": Path(captions_dir),
            "objects": Path(objects_dir),
            "encode": Path(clip_dir) if clip_dir is not None else Path(ingest_dir).parent / "clip",
            "features": Path(features_dir),
        }
    )
    clean = _read_eval(metrics_dir / "eval.json")
    perturbed, others = _extra_eval_sets(metrics_dir)
    scores = _read_scores(Path(scores_dir))
    sections = [
        ("summary", "Summary", _summary_section(clean, others, metrics_dir)),
        ("curves", "ROC and PR curves", _curves_section(scores, Path(scores_dir))),
        ("robustness", "Robustness", _robustness_section(clean, perturbed, metrics_dir)),
        ("qf-matrix", "QF matrix", _qf_section(metrics_dir / "qf_matrix.json")),
        ("tsne", "t-SNE of the features", _tsne_section(Path(features_dir), kind, seed)),
        (
            "gallery",
            "Gallery",
            _gallery_section(
                Path(ingest_dir), Path(captions_dir), Path(objects_dir), scores, n_gallery, seed
            ),
        ),
    ]
    page = _page(title, attrs, sections)
    path = out_dir / "index.html"
    write_text(path, page)
    logger.info("report: wrote %s (%.1f kB)", path, len(page.encode()) / 1e3)
    return path


# ------------------------------------------------------------------------------------- inputs


def _read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataUnusable(
            f"{path} is not valid JSON ({err}); rerun the stage that writes it"
        ) from err


def _read_eval(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = _read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("overall"), dict) for v in data.values()
    ):
        raise DataUnusable(
            f"{path} is not an evaluate-stage metrics file: expected "
            '{head: {"overall": {...}, "per_generator": {...}}}; rerun the evaluate stage'
        )
    return data


def _extra_eval_sets(
    metrics_dir: Path,
) -> tuple[dict[str, dict[float, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """`eval_<name>.json` files: perturbations by kind and severity, and other datasets."""
    perturbed: dict[str, dict[float, dict[str, Any]]] = {}
    others: dict[str, dict[str, Any]] = {}
    if not metrics_dir.is_dir():
        return perturbed, others
    for path in sorted(metrics_dir.glob("eval_*.json")):
        name = path.stem[len("eval_") :]
        data = _read_eval(path)
        assert data is not None  # the glob found it
        try:
            kind, severity = parse_perturbation(name)
        except ValueError:
            others[name] = data
        else:
            perturbed.setdefault(kind, {})[float(severity)] = data
    return perturbed, others


def _read_scores(scores_dir: Path) -> dict[str, Scores]:
    if not scores_dir.is_dir():
        return {}
    return {p.stem: Scores.from_csv(p) for p in sorted(scores_dir.glob("*.csv"))}


def _stage_attrs(dirs: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Root attributes of every shard of each stage folder (absent folders are left out); the
    first also carries `finished_utc` from the stage's timings file, since shards hold no time."""
    out = {
        stage: [store.read_attrs(p) for p in store.list_shards(d)]
        for stage, d in dirs.items()
        if store.list_shards(d)
    }
    for stage, shards in out.items():
        try:
            timings = json.loads(timings_path(dirs[stage]).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(timings, dict):
            shards[0]["finished_utc"] = timings.get("finished_utc", "")
    return out


# ------------------------------------------------------------------------------------- HTML


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{_esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_esc(alt)}">'


def _fmt(key: str, value: Any) -> str:
    """A metric for a table: fractions as percentages with one decimal, counts as integers."""
    if value is None or isinstance(value, bool):
        return "—" if value is None else str(value)
    if isinstance(value, int | float):
        if not math.isfinite(value):
            return "—"
        if key in COUNTS or key.startswith("n_"):
            return str(int(value))
        if key in FRACTIONS or key.startswith("f1") or key.endswith("_at_val_threshold"):
            return f"{100 * value:.1f}%"
        return f"{value:.4g}"
    return str(value)


def _columns(blocks: Sequence[dict[str, Any]]) -> list[str]:
    keys = {k for b in blocks for k in b}
    known = [k for k in (*FRACTIONS, *COUNTS) if k in keys]
    return known + sorted(keys - set(known))


def _provenance_table(provenance: dict[str, Any]) -> str:
    """Who wrote the captions of the scored images, per class, and a warning when it differs."""
    sources = sorted(set(provenance.get("real", {})) | set(provenance.get("generated", {})))
    rows = [
        [cls, *(str(provenance.get(cls, {}).get(s, 0)) for s in sources)]
        for cls in ("real", "generated")
    ]
    html = "<h3>Caption provenance (test set)</h3>" + _table(["class", *sources], rows, "metrics")
    if provenance.get("class_correlated"):
        html += (
            '<p class="warning" role="alert"><strong>Caption shortcut:</strong> real and '
            "generated images got their captions from different sources (share gap "
            f"{100 * float(provenance.get('max_gap', 0)):.0f} points), so a caption's style "
            "tells the label. Run with caption.source=blip2 for comparable numbers.</p>"
        )
    return html


def _metrics_table(first: str, blocks: dict[str, dict[str, Any]]) -> str:
    columns = _columns(list(blocks.values()))
    rows = [[name, *(_fmt(c, block.get(c)) for c in columns)] for name, block in blocks.items()]
    return _table([first, *(_HEADINGS.get(c, c) for c in columns)], rows, "metrics")


def _page(
    title: str, attrs: dict[str, list[dict[str, Any]]], sections: list[tuple[str, str, str]]
) -> str:
    presets = sorted({str(a.get("preset", "")) for shards in attrs.values() for a in shards})
    banner = ""
    if "tiny" in presets:
        banner = (
            '<div class="banner" id="tiny-banner" role="alert">preset=tiny: these results are '
            "MEANINGLESS. The models are small networks with random weights, used for offline "
            "smoke runs; no number or picture below says anything about real detectors.</div>"
        )
    run_rows = []
    for stage, shards in attrs.items():
        first = shards[0]
        run_rows.append(
            [
                stage,
                str(first.get("dataset", "")),
                ", ".join(sorted({str(a.get("preset", "")) for a in shards} - {""})) or "—",
                str(first.get("model", "")) or "—",
                str(len(shards)),
                str(first.get("finished_utc", "")) or "—",
            ]
        )
    run = (
        _table(["stage", "dataset", "preset", "model", "shards", "finished (UTC)"], run_rows)
        if run_rows
        else _note("no shards found: run information is unavailable")
    )
    nav = "".join(f'<a href="#{sid}">{_esc(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{_esc(name)}</h2>\n{content}\n</section>'
        for sid, name, content in sections
    )
    # The CSP makes the browser refuse anything that is not embedded, so a page that renders
    # here renders the same offline.
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n{banner}\n<nav>{nav}</nav>\n"
        f'<section id="run">\n<h2>Run</h2>\n{run}\n</section>\n{body}\n</body>\n</html>\n'
    )


# ------------------------------------------------------------------------------------ figures


def _figure(width: float, height: float) -> Figure:
    # Figure + Agg canvas, not pyplot: no global backend switch and no figure registry to leak.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _percent(value: Any) -> float:
    return 100 * float(value) if isinstance(value, int | float) else math.nan


# ------------------------------------------------------------------------------------ sections


def _summary_section(
    clean: dict[str, Any] | None, others: dict[str, dict[str, Any]], metrics_dir: Path
) -> str:
    if clean is None and not others:
        return _note(f"no {metrics_dir / 'eval.json'}: run the evaluate stage for metrics")
    parts = []
    if clean is None:
        parts.append(_note(f"no {metrics_dir / 'eval.json'}: the main test set is not scored"))
    else:
        parts.append("<h3>Test set, overall</h3>")
        parts.append(_metrics_table("head", {h: m["overall"] for h, m in clean.items()}))
        parts.append(
            "<p>Fractions are percentages. A generator's row scores its images together with "
            "the real images of its own folder (reals: own, as UniversalFakeDetect and ITEM "
            "do) or, when its folder has none, with all real images (reals: all). The mean "
            "row is the unweighted mean over the generators (the papers' Avg.).</p>"
        )
        provenance = next(
            (m["caption_provenance"] for m in clean.values() if m.get("caption_provenance")), None
        )
        if provenance:
            parts.append(_provenance_table(provenance))
        for head, m in clean.items():
            per = dict(m.get("per_generator") or {})
            if per and m.get("mean"):
                per["Avg. (mean)"] = m["mean"]
            parts.append(f"<h3>Per generator: {_esc(head)}</h3>")
            parts.append(_metrics_table("generator", per) if per else _note("no generator"))
    for name, data in others.items():
        parts.append(f"<h3>Evaluation set {_esc(name)}, overall</h3>")
        parts.append(_metrics_table("head", {h: m["overall"] for h, m in data.items()}))
    return "\n".join(parts)


def _curves_section(scores: dict[str, Scores], scores_dir: Path) -> str:
    if not scores:
        return _note(f"no scores in {scores_dir}: run the evaluate stage for ROC and PR curves")
    fig = _figure(10, 4.2)
    roc_ax, pr_ax = fig.subplots(1, 2)
    drawn, skipped = 0, []
    for head, s in scores.items():
        if not ((s.label == 0).any() and (s.label == 1).any()):
            skipped.append(head)
            continue
        roc = roc_points(s.label, s.p_generated)
        pr = pr_points(s.label, s.p_generated)
        auc = roc_auc_score(s.label, s.p_generated)
        ap = average_precision_score(s.label, s.p_generated)
        style = {"ls": _LINESTYLES[drawn % len(_LINESTYLES)], "lw": 2.2 - 0.3 * (drawn % 4)}
        roc_ax.plot(
            [r["fpr"] for r in roc], [r["tpr"] for r in roc], label=f"{head} ({auc:.3f})", **style
        )
        pr_ax.step(
            [r["recall"] for r in pr],
            [r["precision"] for r in pr],
            where="post",
            label=f"{head} ({ap:.3f})",
            **style,
        )
        drawn += 1
    parts = []
    if drawn:
        roc_ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (AUC)")
        pr_ax.set(
            xlabel="recall", ylabel="precision", title="precision-recall (AP)", ylim=(0, 1.02)
        )
        roc_ax.legend(fontsize=8, loc="lower right")
        pr_ax.legend(fontsize=8, loc="lower left")
        parts.append(_img(_png_uri(fig), "ROC and precision-recall curves per head"))
        parts.append(
            "<p>Generated is the positive class; one curve per head, each with its own line "
            "style and width, so that heads with identical curves stay visible.</p>"
        )
    if skipped:
        parts.append(_note(f"no curve for {', '.join(skipped)}: the scores hold only one class"))
    for head, s in scores.items():
        if s.pred_class is None:
            continue
        labels, matrix = confusion(s.true_class, s.pred_class)
        parts.append(f"<h3>Attribution confusion matrix: {_esc(head)}</h3>")
        parts.append(_img(_png_uri(_confusion_figure(head, labels, matrix)), f"{head} confusion"))
    return "\n".join(parts)


def _confusion_figure(head: str, labels: list[str], matrix: np.ndarray) -> Figure:
    k = len(labels)
    side = max(3.5, 0.38 * k + 2)
    fig = _figure(side + 1, side)
    ax = fig.subplots()
    # Colour by row share (recall per true class), so rare classes are as readable as common ones.
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                colour = "white" if share[i, j] > 0.6 else "black"
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=7, c=colour)
    ax.set_xticks(range(k), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set(
        xlabel="predicted class", ylabel="true class", title=f"{head}: counts, colour = row share"
    )
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _robustness_section(
    clean: dict[str, Any] | None,
    perturbed: dict[str, dict[float, dict[str, Any]]],
    metrics_dir: Path,
) -> str:
    if not perturbed:
        return _note(
            f"no perturbation metrics (eval_noise_*.json, eval_blur_*.json, eval_jpeg_*.json) "
            f"in {metrics_dir}"
        )
    parts = []
    if clean is None:
        parts.append(_note("no eval.json: the curves have no clean point"))
    else:
        parts.append(
            "<p>The clean test set is the first point of each curve, then the severities from "
            "mild to harsh, evenly spaced. Heads are drawn side by side within each point, with "
            "their own marker, so that curves with the same values do not hide each other.</p>"
        )
    for kind in PERTURBATION_KINDS:
        if kind not in perturbed:
            continue
        by_severity = perturbed[kind]
        # Left to right from clean to most damaged: lower JPEG quality is more damage.
        severities = sorted(by_severity, reverse=kind == "jpeg")
        points: list[tuple[float, str, dict[str, Any]]] = []
        if clean is not None:
            points.append((100.0 if kind == "jpeg" else 0.0, "clean", clean))
        points += [(s, f"{_SHORT[kind]} {s:g}", by_severity[s]) for s in severities]
        heads = sorted({h for _, _, data in points for h in data})
        fig = _figure(10, 3.8)
        axes = fig.subplots(1, 2)
        # Severities as evenly spaced categories (clean, then from mild to harsh): on a linear
        # axis "clean" (0) and "σ 0.001" would print on top of each other.
        xs = np.arange(len(points), dtype=float)
        spread = 0.1 if len(heads) > 1 else 0.0  # total sideways spread of the heads
        for ax, metric in zip(axes, ("acc", "ap")):
            for k, head in enumerate(heads):
                ys = [
                    _percent(d.get(head, {}).get("overall", {}).get(metric)) for _, _, d in points
                ]
                # Heads side by side within each category, each with its own marker and line
                # style, so that identical curves stay visible instead of hiding each other.
                offset = spread * (k - (len(heads) - 1) / 2) / max(1, len(heads) - 1)
                ax.plot(
                    xs + offset,
                    ys,
                    marker=_MARKERS[k % len(_MARKERS)],
                    ls=_LINESTYLES[k % len(_LINESTYLES)],
                    label=head,
                )
            ax.set_xticks(xs, [lab for _, lab, _ in points], fontsize=8)
            ax.set(xlabel=_AXIS[kind], ylabel=f"{metric} (%)", title=f"{kind}: {metric}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        parts.append(f"<h3>{_esc(kind)}</h3>")
        parts.append(_img(_png_uri(fig), f"{kind} robustness: acc and AP vs severity per head"))
        rows = []
        for head in heads:
            for metric in ("acc", "ap"):
                rows.append(
                    [
                        f"{head} {metric}",
                        *(
                            _fmt(metric, d.get(head, {}).get("overall", {}).get(metric))
                            for _, _, d in points
                        ),
                    ]
                )
        parts.append(_table(["head", *(lab for _, lab, _ in points)], rows, "robustness"))
    return "\n".join(parts)


def _qf_section(path: Path) -> str:
    if not path.is_file():
        return _note(f"no {path}: no train-QF x test-QF study in this run")
    data = _read_json(path)
    bad = ValueError(
        f"{path} is not a QF matrix: expected "
        '{head: {"<train_qf>": {"<test_qf>": {"acc": .., "ap": ..}}}}'
    )
    if not isinstance(data, dict):
        raise bad
    if not any(data.values()):
        return _note("the QF matrix is empty (evaluate.qf_matrix is [])")
    parts = [
        "<p>Rows: JPEG quality factor of the training images; columns: of the test images.</p>"
    ]
    for head, grid in data.items():
        if not isinstance(grid, dict) or not all(
            isinstance(row, dict) and all(isinstance(c, dict) for c in row.values())
            for row in grid.values()
        ):
            raise bad
        train_qf = sorted(grid, key=_qf_key)
        test_qf = sorted({t for row in grid.values() for t in row}, key=_qf_key)
        fig = _figure(max(6.0, 1.1 * len(test_qf) * 2 + 2), max(3.0, 0.55 * len(train_qf) + 1.8))
        for ax, metric in zip(fig.subplots(1, 2), ("acc", "ap")):
            values = np.array(
                [[_percent(grid[r].get(c, {}).get(metric)) for c in test_qf] for r in train_qf]
            )
            im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100)
            ax.set_facecolor("#e0e0e0")  # undefined (null) cells
            for i in range(len(train_qf)):
                for j in range(len(test_qf)):
                    v = values[i, j]
                    text = "—" if math.isnan(v) else f"{v:.1f}"
                    colour = "white" if v < 60 else "black"  # the dark end of viridis; NaN: black
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, c=colour)
            ax.set_xticks(range(len(test_qf)), test_qf)
            ax.set_yticks(range(len(train_qf)), train_qf)
            ax.set(xlabel="test QF", ylabel="train QF", title=f"{head}: {metric} (%)")
            fig.colorbar(im, ax=ax, shrink=0.8)
        parts.append(f"<h3>{_esc(head)}</h3>")
        parts.append(_img(_png_uri(fig), f"{head} QF matrix of acc and AP"))
    return "\n".join(parts)


def _qf_key(name: str) -> tuple[int, float, str]:
    """Non-numeric QFs (e.g. `raw`) first, then numbers ascending."""
    try:
        return (1, float(name), name)
    except ValueError:
        return (0, 0.0, name)


def _tsne_section(features_dir: Path, kind: str, seed: int) -> str:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    from pipeline.features import load_features

    if not store.list_shards(features_dir):
        return _note(f"no feature shards in {features_dir}: run the features stage for t-SNE")
    fs = load_features(features_dir, kind)
    n_total = len(fs.y)
    if n_total < 5:
        return _note(f"t-SNE needs at least 5 images; {features_dir} holds {n_total}")
    rng = np.random.default_rng(seed)
    index = np.arange(n_total)
    if n_total > TSNE_MAX_POINTS:
        index = np.sort(rng.choice(n_total, TSNE_MAX_POINTS, replace=False))
    x = fs.X[index].astype(np.float64)
    n = len(index)
    perplexity = min(30.0, (n - 1) / 3)
    tsne = TSNE(
        n_components=2,
        perplexity=perplexity,
        init="pca" if x.shape[1] >= 2 else "random",
        learning_rate="auto",
        random_state=seed,
    )
    # One thread: on a busy 2-core machine OpenMP's spinning threads made 2000 points take 44 s
    # instead of 11 s, and 12 points take seconds instead of 0.1 s.
    with threadpool_limits(limits=1):
        embedding = tsne.fit_transform(x)
    logger.info(
        "report: t-SNE of %d of %d %s features, perplexity %.1f", n, n_total, kind, perplexity
    )
    classes = np.where(fs.y[index] == 1, fs.generator[index], REAL_CLASS)
    names = [REAL_CLASS] * bool((classes == REAL_CLASS).any()) + sorted(set(classes) - {REAL_CLASS})
    fig = _figure(9, 6.5)
    ax = fig.subplots()
    markers = "os^Dv<>pPX*"
    colours = [c for m in ("tab10", "Dark2", "Set1") for c in _cmap_colours(m)]
    for k, name in enumerate(names):
        mask = classes == name
        if name == REAL_CLASS:
            colour, marker, alpha = "#9e9e9e", "o", 0.6
        else:
            colour, marker, alpha = colours[(k - 1) % len(colours)], markers[(k - 1) % 11], 0.9
        ax.scatter(
            embedding[mask, 0],
            embedding[mask, 1],
            s=18,
            c=[colour],
            marker=marker,
            alpha=alpha,
            label=name,
        )
    ax.set(xticks=[], yticks=[], title=f"t-SNE of {kind} features, coloured by generator")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(names) // 26)
    sample = f"a seeded sample of {n} of {n_total}" if n < n_total else f"all {n}"
    return "\n".join(
        [
            _img(_png_uri(fig), f"t-SNE of {kind} features coloured by generator"),
            f"<p>{_esc(sample)} images, all splits; perplexity {perplexity:.1f}, seed {seed}. "
            "Real images are grey.</p>",
        ]
    )


def _cmap_colours(name: str) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return [to_hex(c) for c in colormaps[name].colors]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------ gallery


def _read_stage(directory: Path, reference: Path, keys: Sequence[str]) -> store.Arrays | None:
    """All rows of a stage folder, checked row-aligned with `reference`; None when absent."""
    shards = store.list_shards(directory)
    if not shards:
        return None
    store.check_aligned(directory, reference)
    return store.concat_rows([store.read_shard(p, ["ids", *keys]) for p in shards])


def _gallery_section(
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    scores: dict[str, Scores],
    n_gallery: int,
    seed: int,
) -> str:
    shards = store.list_shards(ingest_dir)
    if not shards:
        return _note(f"no ingest shards in {ingest_dir}: run the ingest stage for a gallery")
    if n_gallery == 0:
        return _note("n_gallery=0: no gallery")
    blocks = []
    for path in shards:
        rows = store.read_shard(path, ["ids", "path", "label", "generator", "split"])
        root = Path(str(store.read_attrs(path).get("data_root", "")))
        rows["path"] = np.array([str(root / p) for p in rows["path"]], dtype=object)
        blocks.append(rows)
    ingest = store.concat_rows(blocks)
    captions = _read_stage(captions_dir, ingest_dir, ["caption", "caption_source"])
    objects = _read_stage(
        objects_dir, ingest_dir, [store.OFFSETS, "obj_boxes", "obj_phrase", "obj_score"]
    )
    chosen = _pick_gallery(ingest["label"], ingest["split"], ingest["generator"], n_gallery, seed)
    lookup = {head: {str(i): k for k, i in enumerate(s.ids)} for head, s in scores.items()}
    cards = []
    for i in chosen:
        cards.append(_card(i, ingest, captions, objects, scores, lookup))
    parts = []
    notes = []
    if captions is None:
        notes.append(f"no caption shards in {captions_dir}")
    if objects is None:
        notes.append(f"no object shards in {objects_dir}")
    if notes:
        parts.append(_note("; ".join(notes)))
    parts.append(
        f"<p>{len(chosen)} of {len(ingest['ids'])} images, chosen with seed {seed} "
        "(test split first, real and generated mixed, spread over generators). Boxes are the "
        "grounded objects of the caption, with their phrase and score.</p>"
    )
    parts.append('<div class="gallery">\n' + "\n".join(cards) + "\n</div>")
    return "\n".join(parts)


def _pick_gallery(
    label: np.ndarray, split: np.ndarray, generator: np.ndarray, n: int, seed: int
) -> list[int]:
    """Row indices of a seeded gallery: half real and half generated (filled from the other
    class when one runs short), test split first, generated images spread over generators."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(label))
    is_test = np.asarray(split)[order] == "test"
    order = np.concatenate([order[is_test], order[~is_test]])
    real = [int(i) for i in order if label[i] == 0]
    test_gen = [int(i) for i in order if label[i] == 1 and split[i] == "test"]
    rest_gen = [int(i) for i in order if label[i] == 1 and split[i] != "test"]
    gen = _round_robin(test_gen, generator) + _round_robin(rest_gen, generator)
    n_gen = min(len(gen), n - min(len(real), n // 2))
    n_real = min(len(real), n - n_gen)
    picked_real, picked_gen = real[:n_real], gen[:n_gen]
    out = []
    for k in range(max(n_real, n_gen)):
        out += picked_real[k : k + 1] + picked_gen[k : k + 1]
    return out


def _round_robin(rows: list[int], generator: np.ndarray) -> list[int]:
    queues: dict[str, list[int]] = {}
    for i in rows:
        queues.setdefault(str(generator[i]), []).append(i)
    out: list[int] = []
    while queues:
        for name in list(queues):
            out.append(queues[name].pop(0))
            if not queues[name]:
                del queues[name]
    return out


def _card(
    i: int,
    ingest: store.Arrays,
    captions: store.Arrays | None,
    objects: store.Arrays | None,
    scores: dict[str, Scores],
    lookup: dict[str, dict[str, int]],
) -> str:
    path = str(ingest["path"][i])
    boxes, phrases, obj_scores = np.zeros((0, 4)), np.array([], dtype=object), np.zeros(0)
    if objects is not None:
        lo, hi = int(objects[store.OFFSETS][i]), int(objects[store.OFFSETS][i + 1])
        boxes = objects["obj_boxes"][lo:hi]
        phrases, obj_scores = objects["obj_phrase"][lo:hi], objects["obj_score"][lo:hi]
    labels = [_box_label(k, str(p), float(s)) for k, (p, s) in enumerate(zip(phrases, obj_scores))]
    try:
        thumb = _thumbnail(load_rgb(path), boxes, labels)
        picture = _img(_jpeg_uri(thumb), f"image {Path(path).name}", cls="thumb")
    except OSError as err:
        logger.warning("report: cannot show %s in the gallery: %s", path, err)
        picture = f'<div class="missing">cannot open {_esc(path)}: {_esc(err)}</div>'
    generated = int(ingest["label"][i]) == 1
    tag = (
        f'<span class="tag generated">generated · {_esc(ingest["generator"][i])}</span>'
        if generated
        else '<span class="tag real">real</span>'
    )
    lines = [
        f"<p>{tag} <span class='meta'>split {_esc(ingest['split'][i])}</span></p>",
        f'<p class="meta">{_esc(Path(path).name)} · id {_esc(str(ingest["ids"][i])[:12])}</p>',
    ]
    if captions is not None:
        lines.append(f'<p class="caption">“{_esc(captions["caption"][i])}”</p>')
        lines.append(f'<p class="meta">caption source: {_esc(captions["caption_source"][i])}</p>')
    if objects is not None:
        if len(phrases):
            items = []
            for phrase, score, label in zip(phrases, obj_scores, labels):
                note = (
                    f' <span class="meta">(drawn as “{_esc(label.text)}”: no installed font '
                    "has its characters)</span>"
                    if label.numbered
                    else ""
                )
                items.append(f"<li>{_esc(phrase)} ({float(score):.2f}){note}</li>")
            # Numbered as in the thumbnail, where a phrase no font can draw is labelled "#k".
            lines.append(f'<ol class="objects">{"".join(items)}</ol>')
        else:
            lines.append('<p class="meta">no grounded object</p>')
    rows = []
    for head, s in scores.items():
        k = lookup[head].get(str(ingest["ids"][i]))
        if k is None:
            continue
        pred = "" if s.pred_class is None else str(s.pred_class[k])
        rows.append([head, f"{s.p_generated[k]:.3f}", pred])
    if rows:
        has_pred = any(r[2] for r in rows)
        header = ["head", "p_generated", *(["predicted class"] if has_pred else [])]
        lines.append(_table(header, [r if has_pred else r[:2] for r in rows], "scores"))
    return f'<figure class="card">{picture}<figcaption>{"".join(lines)}</figcaption></figure>'


class _BoxLabel(NamedTuple):
    font: Any
    text: str
    numbered: bool  # drawn as "#k" because no installed font covers the phrase


def _thumbnail(image: Image.Image, boxes: np.ndarray, labels: list[_BoxLabel]) -> Image.Image:
    """`image` resized to THUMB_SIZE on its longer side, with the boxes (original pixels) drawn."""
    w, h = image.size
    scale = THUMB_SIZE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    thumb = image.resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(thumb)
    for k, (box, label) in enumerate(zip(boxes, labels)):
        colour = _BOX_COLOURS[k % len(_BOX_COLOURS)]
        x0, x1 = sorted(min(max(float(v) * scale, 0.0), size[0] - 1.0) for v in box[0::2])
        y0, y1 = sorted(min(max(float(v) * scale, 0.0), size[1] - 1.0) for v in box[1::2])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        _label(draw, (x0, y0), label.text, colour, label.font)
    return thumb


@functools.lru_cache(maxsize=1)
def _label_fonts() -> tuple[tuple[str, frozenset[int]], ...]:
    """(file, covered code points) of the installed fonts of `_LABEL_FONTS`, in that order."""
    from matplotlib import font_manager, ft2font

    files = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    found = []
    for family in _LABEL_FONTS:
        path = files.get(family)
        if not path:
            continue
        try:
            found.append((path, frozenset(ft2font.FT2Font(path).get_charmap())))
        except (OSError, RuntimeError):
            continue
    return tuple(found)


@functools.lru_cache(maxsize=256)
def _font_for(text: str) -> Any | None:
    """The first label font that covers every character of `text`; None when none does."""
    needed = {ord(c) for c in text if not c.isspace()}
    for path, covered in _label_fonts():
        if needed <= covered:
            return ImageFont.truetype(path, 11)
    return None


def _box_label(k: int, phrase: str, score: float) -> _BoxLabel:
    """What the label of object `k` draws: its phrase and score or, when no installed font
    covers the phrase (CJK without `fonts-noto-cjk`), its number in the card's list of objects,
    which shows the phrase as HTML text in the browser's own fonts. Never tofu boxes or '?'."""
    text = f"{phrase} {score:.2f}"
    font = _font_for(text)
    if font is not None:
        return _BoxLabel(font, text, False)
    text = f"#{k + 1} {score:.2f}"
    return _BoxLabel(_font_for(text) or ImageFont.load_default(), text, True)


def _label(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: str, font: Any
) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    height = bottom - top
    y = xy[1] - height - 2 if xy[1] >= height + 2 else xy[1]  # above the box when it fits
    draw.rectangle((left, y, right + 2, y + height + 2), fill=colour)
    draw.text((xy[0] + 1, y + 1 - (top - xy[1])), text, fill="white", font=font)


def report_for_dataset(
    cache: Path, metrics_dir: Path, out_dir: Path, kind: str = "item", seed: int = 0
) -> Path:
    """`build_report` for the stage folders of one dataset under `cache` (cache/<data>)."""
    return build_report(
        out_dir,
        metrics_dir=metrics_dir,
        scores_dir=cache / "scores",
        features_dir=cache / "features",
        ingest_dir=cache / "ingest",
        captions_dir=cache / "captions",
        objects_dir=cache / "objects",
        kind=kind,
        seed=seed,
    )
