"""The report's HTML: escaping, tables of metrics, the summary section and the page around
the sections, with its style sheet."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
.card{margin:0;border:1px solid #ddd;border-radius:6px;padding:8px;background:#fafafa;
min-width:0;overflow-wrap:anywhere}
.card img{display:block;max-width:100%;height:auto;margin:0 auto}
.card p{margin:4px 0}.card table{margin:4px 0;font-size:12px}
.tag{display:inline-block;padding:1px 6px;border-radius:4px;color:#fff;font-size:12px}
.tag.real{background:#2e7d32}.tag.generated{background:#c62828}
.missing{padding:40px 8px;text-align:center;background:#eee;color:#555}
.caption{font-style:italic}.meta{color:#666;font-size:12px;word-break:break-all}
ol.objects{margin:4px 0;padding-left:18px;font-size:12px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #888;
vertical-align:middle}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def fmt(key: str, value: Any) -> str:
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
    html = "<h3>Caption provenance (test set)</h3>" + table(["class", *sources], rows, "metrics")
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
    rows = [[name, *(fmt(c, block.get(c)) for c in columns)] for name, block in blocks.items()]
    return table([first, *(_HEADINGS.get(c, c) for c in columns)], rows, "metrics")


def page(
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
        table(["stage", "dataset", "preset", "model", "shards", "finished (UTC)"], run_rows)
        if run_rows
        else note("no shards found: run information is unavailable")
    )
    nav = "".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(
        f'<section id="{sid}">\n<h2>{esc(name)}</h2>\n{content}\n</section>'
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
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{banner}\n<nav>{nav}</nav>\n"
        f'<section id="run">\n<h2>Run</h2>\n{run}\n</section>\n{body}\n</body>\n</html>\n'
    )


def summary_section(
    clean: dict[str, Any] | None, others: dict[str, dict[str, Any]], metrics_dir: Path
) -> str:
    if clean is None and not others:
        return note(f"no {metrics_dir / 'eval.json'}: run the evaluate stage for metrics")
    parts = []
    if clean is None:
        parts.append(note(f"no {metrics_dir / 'eval.json'}: the main test set is not scored"))
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
            parts.append(f"<h3>Per generator: {esc(head)}</h3>")
            parts.append(_metrics_table("generator", per) if per else note("no generator"))
    for name, data in others.items():
        parts.append(f"<h3>Evaluation set {esc(name)}, overall</h3>")
        parts.append(_metrics_table("head", {h: m["overall"] for h, m in data.items()}))
    return "\n".join(parts)
