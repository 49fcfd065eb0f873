"""The report's figures: ROC/PR curves, confusion matrices, robustness curves, the QF matrix
and the t-SNE of the features, drawn with matplotlib and embedded as PNG."""

from __future__ import annotations

import base64
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.metrics import REAL_CLASS, Scores, confusion, pr_points, roc_points
from pipeline.features import load_features
from pipeline.perturb import KINDS as PERTURBATION_KINDS
from pipeline.report.inputs import read_json
from pipeline.report.markup import esc, fmt, img, note, table
from pipeline.rows import store

logger = logging.getLogger(__name__)


#: Above this many feature rows t-SNE runs on a seeded subsample (a few seconds on 2 cores).
TSNE_MAX_POINTS = 2000


_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


_LINESTYLES = ("-", "--", "-.", ":")


_AXIS = {
    "noise": "noise σ ([0, 1] pixel scale)",
    "blur": "blur σ (pixels)",
    "jpeg": "JPEG quality (lower is harsher)",
}


_SHORT = {"noise": "σ", "blur": "σ", "jpeg": "q"}


def _figure(width: float, height: float, preset: str) -> Figure:
    """A figure titled with the models preset, so that a picture taken out of the report still
    says whether random models made it."""
    # Figure + Agg canvas, not pyplot: no global backend switch and no figure registry to leak.
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    tiny = preset == "tiny"
    fig.suptitle(
        f"models.preset={preset or '?'}" + (": RANDOM models, meaningless" if tiny else ""),
        fontsize=9,
        color="#b00020" if tiny else "#555555",
        x=0.99,
        ha="right",
    )
    return fig


def _png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _percent(value: Any) -> float:
    return 100 * float(value) if isinstance(value, int | float) else math.nan


def curves_section(scores: dict[str, Scores], scores_dir: Path, preset: str = "") -> str:
    if not scores:
        return note(f"no scores in {scores_dir}: run the evaluate stage for ROC and PR curves")
    fig = _figure(10, 4.6, preset)
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
        # below the axes, never over a curve
        for ax in (roc_ax, pr_ax):
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
        parts.append(img(_png_uri(fig), "ROC and precision-recall curves per head"))
        parts.append(
            "<p>Generated is the positive class; one curve per head, each with its own line "
            "style and width, so that heads with identical curves stay visible.</p>"
        )
    if skipped:
        parts.append(note(f"no curve for {', '.join(skipped)}: the scores hold only one class"))
    for head, s in scores.items():
        if s.pred_class is None:
            continue
        labels, matrix = confusion(s.true_class, s.pred_class)
        parts.append(f"<h3>Attribution confusion matrix: {esc(head)}</h3>")
        parts.append(
            img(_png_uri(_confusion_figure(head, labels, matrix, preset)), f"{head} confusion")
        )
    return "\n".join(parts)


def _confusion_figure(head: str, labels: list[str], matrix: np.ndarray, preset: str) -> Figure:
    k = len(labels)
    side = max(3.5, 0.38 * k + 2)
    fig = _figure(side + 1, side, preset)
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


def robustness_section(
    clean: dict[str, Any] | None,
    perturbed: dict[str, dict[float, dict[str, Any]]],
    metrics_dir: Path,
    preset: str = "",
) -> str:
    if not perturbed:
        return note(
            f"no perturbation metrics (eval_noise_*.json, eval_blur_*.json, eval_jpeg_*.json) "
            f"in {metrics_dir}"
        )
    parts = []
    if clean is None:
        parts.append(note("no eval.json: the curves have no clean point"))
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
        fig = _figure(10, 3.8, preset)
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
        parts.append(f"<h3>{esc(kind)}</h3>")
        parts.append(img(_png_uri(fig), f"{kind} robustness: acc and AP vs severity per head"))
        rows = []
        for head in heads:
            for metric in ("acc", "ap"):
                rows.append(
                    [
                        f"{head} {metric}",
                        *(
                            fmt(metric, d.get(head, {}).get("overall", {}).get(metric))
                            for _, _, d in points
                        ),
                    ]
                )
        parts.append(table(["head", *(lab for _, lab, _ in points)], rows, "robustness"))
    return "\n".join(parts)


def qf_section(path: Path, preset: str = "") -> str:
    if not path.is_file():
        return note(f"no {path}: no train-QF x test-QF study in this run")
    data = read_json(path)
    bad = ValueError(
        f"{path} is not a QF matrix: expected "
        '{head: {"<train_qf>": {"<test_qf>": {"acc": .., "ap": ..}}}}'
    )
    if not isinstance(data, dict):
        raise bad
    if not any(data.values()):
        return note("the QF matrix is empty (evaluate.qf_matrix is [])")
    parts = [
        "<p>Rows: JPEG quality factor of the training images; columns: of the test images.</p>"
    ]
    for head, block in data.items():
        # `preset` and `models` (what made the features) sit beside the train-QF rows
        grid = (
            {k: v for k, v in block.items() if k not in ("preset", "models")}
            if isinstance(block, dict)
            else block
        )
        if not isinstance(grid, dict) or not all(
            isinstance(row, dict) and all(isinstance(c, dict) for c in row.values())
            for row in grid.values()
        ):
            raise bad
        train_qf = sorted(grid, key=_qf_key)
        test_qf = sorted({t for row in grid.values() for t in row}, key=_qf_key)
        fig = _figure(
            max(6.0, 1.1 * len(test_qf) * 2 + 2), max(3.0, 0.55 * len(train_qf) + 1.8), preset
        )
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
        parts.append(f"<h3>{esc(head)}</h3>")
        parts.append(img(_png_uri(fig), f"{head} QF matrix of acc and AP"))
    return "\n".join(parts)


def _qf_key(name: str) -> tuple[int, float, str]:
    """Non-numeric QFs (e.g. `raw`) first, then numbers ascending."""
    try:
        return (1, float(name), name)
    except ValueError:
        return (0, 0.0, name)


def tsne_section(features_dir: Path, kind: str, seed: int, preset: str = "") -> str:
    # scikit-learn's manifold module takes a second to import; only a t-SNE plot needs it.
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    if not store.list_shards(features_dir):
        return note(f"no feature shards in {features_dir}: run the features stage for t-SNE")
    fs = load_features(features_dir, kind)
    n_total = len(fs.y)
    if n_total < 5:
        return note(f"t-SNE needs at least 5 images; {features_dir} holds {n_total}")
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
    fig = _figure(9, 6.5, preset)
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
            img(_png_uri(fig), f"t-SNE of {kind} features coloured by generator"),
            f"<p>{esc(sample)} images, all splits; perplexity {perplexity:.1f}, seed {seed}. "
            "Real images are grey.</p>",
        ]
    )


def _cmap_colours(name: str) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return [to_hex(c) for c in colormaps[name].colors]  # type: ignore[attr-defined]
