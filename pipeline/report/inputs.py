"""Read the report's inputs: the evaluate stage's metrics and scores, and the stages' shard
attributes; malformed files raise, naming the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import DataUnusable
from pipeline.evaluation.metrics import Scores
from pipeline.perturb import parse_perturbation
from pipeline.rows import store
from pipeline.rows.runner import timings_path


def read_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise DataUnusable(
            f"{path} is not valid JSON ({err}); rerun the stage that writes it"
        ) from err


def read_eval(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("overall"), dict) for v in data.values()
    ):
        raise DataUnusable(
            f"{path} is not an evaluate-stage metrics file: expected "
            '{head: {"overall": {...}, "per_generator": {...}}}; rerun the evaluate stage'
        )
    return data


def extra_eval_sets(
    metrics_dir: Path,
) -> tuple[dict[str, dict[float, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """`eval_<name>.json` files: perturbations by kind and severity, and other datasets."""
    perturbed: dict[str, dict[float, dict[str, Any]]] = {}
    others: dict[str, dict[str, Any]] = {}
    if not metrics_dir.is_dir():
        return perturbed, others
    for path in sorted(metrics_dir.glob("eval_*.json")):
        name = path.stem[len("eval_") :]
        data = read_eval(path)
        assert data is not None  # the glob found it
        try:
            kind, severity = parse_perturbation(name)
        except ValueError:
            others[name] = data
        else:
            perturbed.setdefault(kind, {})[float(severity)] = data
    return perturbed, others


def read_scores(scores_dir: Path) -> dict[str, Scores]:
    if not scores_dir.is_dir():
        return {}
    return {p.stem: Scores.from_csv(p) for p in sorted(scores_dir.glob("*.csv"))}


def stage_attrs(dirs: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
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
