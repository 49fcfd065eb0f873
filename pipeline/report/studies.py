"""The report's study pages: one section per `study_<name>.json` of the metrics folder, with
its table and a figure (a train × test heatmap, or bars per distance kind)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DataUnusable
from pipeline.report.figures import _figure, _percent, _png_uri
from pipeline.report.inputs import read_json
from pipeline.report.markup import esc, fmt, img, table

#: The metrics shown per cell (the figure draws the first one defined, AUC else accuracy).
SHOWN = ("auc", "ap", "acc")
#: Per study: the cell keys that name a cell (figure rows, then columns).
_KEYS = {
    "train_sets": ("train", "test"),
    "logo": ("held_out", "test"),
    "distances": ("kind", "test"),
    "finetune": ("train", "finetune", "test"),
    "captioners": ("captioner", "test"),
    "clip_arch": ("arch", "test"),
}


def study_sections(metrics_dir: Path, preset: str = "") -> list[tuple[str, str, str]]:
    """(id, title, html) of one report section per study table found in `metrics_dir`."""
    out = []
    for path in sorted(Path(metrics_dir).glob("study_*.json")) if metrics_dir.is_dir() else []:
        data = read_json(path)
        cells = data.get("cells") if isinstance(data, dict) else None
        if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
            raise DataUnusable(
                f"{path} is not a study table (no list of cells); rerun `misalign study`"
            )
        name = str(data.get("study", path.stem[len("study_") :]))
        out.append((f"study-{name}", f"Study: {name}", _section(name, data, cells, preset)))
    return out


def _section(name: str, data: dict[str, Any], cells: list[dict[str, Any]], preset: str) -> str:
    keys = _KEYS.get(name, tuple(k for k in cells[0] if isinstance(cells[0].get(k), str)))
    intro = (
        f"<p>{esc(data.get('summary', ''))}. Reproduces: {esc(data.get('reproduces', '—'))}. "
        f"Head <b>{esc(data.get('head', '?'))}</b> on features kind "
        f"{esc(data.get('kind', '?'))}, groups by {esc(data.get('by', '?'))}; "
        f"written by <code>misalign study {esc(name)}</code>.</p>"
    )
    metric = next((m for m in SHOWN if any(c.get(m) is not None for c in cells)), "acc")
    parts = [intro, _figure_of(name, cells, keys, metric, preset)]
    header = [*keys, *SHOWN]
    if name == "finetune":
        header += [f"{m} before" for m in SHOWN]
    rows = []
    for c in cells:
        row = [str(c.get(k, "")) for k in keys] + [fmt(m, c.get(m)) for m in SHOWN]
        if name == "finetune":
            row += [fmt(m, (c.get("before") or {}).get(m)) for m in SHOWN]
        rows.append(row)
    parts.append(table(header, rows, cls="study"))
    return "\n".join(parts)


def _figure_of(
    name: str, cells: list[dict[str, Any]], keys: tuple[str, ...], metric: str, preset: str
) -> str:
    """A heatmap of `metric` over (first key, last key); finetune's rows are 'A → B'."""

    def row_of(c: dict[str, Any]) -> str:
        return " → ".join(str(c.get(k, "")) for k in keys[:-1])

    rows = list(dict.fromkeys(row_of(c) for c in cells))
    cols = list(dict.fromkeys(str(c.get(keys[-1], "")) for c in cells))
    values = np.full((len(rows), len(cols)), math.nan)
    for c in cells:
        values[rows.index(row_of(c)), cols.index(str(c.get(keys[-1], "")))] = _percent(
            c.get(metric)
        )
    fig = _figure(max(5.0, 0.9 * len(cols) + 3), max(2.6, 0.45 * len(rows) + 1.6), preset)
    ax = fig.subplots()
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_facecolor("#e0e0e0")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            text = "—" if math.isnan(v) else f"{v:.1f}"
            ax.text(
                j, i, text, ha="center", va="center", fontsize=8, c="white" if v < 60 else "black"
            )
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set(xlabel=keys[-1], ylabel=" → ".join(keys[:-1]), title=f"{name}: {metric} (%)")
    fig.colorbar(im, ax=ax, shrink=0.8)
    return img(_png_uri(fig), f"{name} study: {metric} per cell")
