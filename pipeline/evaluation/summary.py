"""The compact metrics DVC shows: one small JSON per head and evaluation set.

`metrics/eval*.json` keeps every block (overall, per generator, mean); `dvc metrics show` reads
only these summaries, so that one line is one head on one evaluation set:

    Path                                  acc    ap     auc    mean.acc  mean.ap  n   preset
    metrics/summary/eval/mlp.json         0.85   0.91   0.9    0.83      0.9      40  paper
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from pipeline.rows.atomic import write_json_atomic

OVERALL_KEYS = ("acc", "ap", "auc")
MEAN_KEYS = ("acc", "ap")


def head_summary(block: dict[str, Any]) -> dict[str, Any]:
    """`{acc, ap, auc, mean: {acc, ap}, n, preset}` of one head's eval.json block.

    `mean` is the block's own `mean` (the papers' average over generators) when it has one,
    else the average over its `per_generator` blocks of the values that are defined.
    """
    overall = block.get("overall", {})
    out: dict[str, Any] = {k: overall.get(k) for k in OVERALL_KEYS}
    mean = block.get("mean")
    if not isinstance(mean, dict):
        per_gen = [b for b in block.get("per_generator", {}).values() if isinstance(b, dict)]
        mean = {k: _mean([b.get(k) for b in per_gen]) for k in MEAN_KEYS}
    out["mean"] = {k: mean.get(k) for k in MEAN_KEYS}
    out["n"] = overall.get("n")
    if "preset" in block:
        out["preset"] = block["preset"]
    if block.get("contaminated"):
        out["contaminated"] = True
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


def _mean(values: list[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(nums) / len(nums) if nums else None
