r"""The compact metrics DVC shows: one small JSON per head and evaluation set.

`metrics/eval*.json` keeps every block (overall, per generator, mean); `dvc metrics show` reads
only these summaries, so that one line is one head on one evaluation set:

    Path                           acc   ap    auc   bacc  mean.acc  mean.ap  mean.bacc  mean.n_all  n
    metrics/summary/eval/mlp.json  0.85  0.91  0.9   0.84  0.83      0.88     0.82       0           40

`bacc` is the balanced accuracy, the mean of `r_acc` and `f_acc` (both in `metrics/eval*.json`):
unlike `acc` it does not reward calling everything real when reals outnumber generated images,
as they do in the `all` blocks (`mean.n_all` of them). The columns are few on purpose, so that
`dvc metrics show` and `dvc exp show` stay readable on a terminal.

`metrics/headline.json` (the evaluate stage's `--headline`) is the experiments table's line:
`{"auc": {<head>: auc, ...}, "preset": ...}` for the main evaluation set. Its names (`auc.mlp`,
...) occur in no other metrics file, so `dvc exp show` prints them as they are rather than
prefixed by a file's path, and a table of every experiment fits 120 columns:

    dvc exp show --only-changed --keep '^auc\.' --drop '.*/|models$|metrics$|params\.yaml$|Created'
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.rows.atomic import write_json_atomic

OVERALL_KEYS = ("acc", "ap", "auc")
MEAN_KEYS = ("acc", "ap")
#: Block counts of the `mean` block copied as they are (`metrics.mean_block`): how many
#: per-generator blocks pool every real image of the set.
MEAN_COUNTS = ("n_all",)


def balanced_accuracy(block: dict[str, Any]) -> float | None:
    """The mean of a block's `r_acc` and `f_acc`; None unless both are defined."""
    r_acc, f_acc = block.get("r_acc"), block.get("f_acc")
    if r_acc is None or f_acc is None:
        return None
    return (float(r_acc) + float(f_acc)) / 2


def head_summary(block: dict[str, Any]) -> dict[str, Any]:
    """`{acc, ap, auc, bacc, mean: {acc, ap, bacc, n_all}, n, preset}` of one head's eval.json
    block (`n_all` only when the block's `mean` counts it).

    `mean` is the block's own `mean` (the papers' average over generators) when it has one,
    else the average over its `per_generator` blocks of the values that are defined. Its
    `bacc` is the mean of its `r_acc` and `f_acc`.
    """
    overall = block.get("overall", {})
    out: dict[str, Any] = {k: overall.get(k) for k in OVERALL_KEYS}
    out["bacc"] = balanced_accuracy(overall)
    mean = block.get("mean")
    if not isinstance(mean, dict):
        per_gen = [b for b in block.get("per_generator", {}).values() if isinstance(b, dict)]
        mean = {k: _mean([b.get(k) for b in per_gen]) for k in (*MEAN_KEYS, "r_acc", "f_acc")}
    out["mean"] = {k: mean.get(k) for k in MEAN_KEYS}
    out["mean"]["bacc"] = balanced_accuracy(mean)
    out["mean"].update({k: mean[k] for k in MEAN_COUNTS if k in mean})
    out["n"] = overall.get("n")
    if "preset" in block:
        out["preset"] = block["preset"]
    if block.get("contaminated"):
        out["contaminated"] = True
    if "metadata_baseline_auc" in block:  # the shortcut audit's, beside the head's auc
        out["metadata_auc"] = block["metadata_baseline_auc"]
    return out


def write_summaries(metrics: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Replace `out_dir` by one `<head>.json` summary per head of `metrics`."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    paths = []
    for head, block in metrics.items():
        if not isinstance(block, dict) or "overall" not in block:
            continue
        path = out_dir / f"{head}.json"
        write_json_atomic(path, head_summary(block), ndigits=4)
        paths.append(path)
    return paths


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """`{"auc": {head: overall auc}, "preset": ...}` of the heads in `metrics` (an eval.json)."""
    heads = {
        head: block
        for head, block in metrics.items()
        if isinstance(block, dict) and "overall" in block
    }
    out: dict[str, Any] = {"auc": {head: b["overall"].get("auc") for head, b in heads.items()}}
    presets = {b["preset"] for b in heads.values() if "preset" in b}
    if presets:
        out["preset"] = "+".join(sorted(presets))
    return out


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(nums) / len(nums) if nums else None
