"""What every study shares: its inputs, the rows of a group, one fit-and-score, the table file.

A study trains heads on groups of cached feature rows and scores them on other groups; it
never re-extracts. Groups are generators or families (each one's generated rows with every real row), subsets
(dataset folders, with their own reals) or datasets (features folders). A group without
both classes in its train rows cannot be trained on, one without generated test rows cannot
be tested on; the table lists such groups under `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.config import ConfigError, Params, TrainConfig
from pipeline.errors import DataUnusable
from pipeline.evaluation.calibration import apply_calibration
from pipeline.evaluation.metrics import binary_metrics, own_decision, p_generated
from pipeline.features import FeatureSet, concat_features, load_features
from pipeline.rows.atomic import write_json_atomic
from pipeline.studies.cells import CellCache, rows_digest, train_settings
from pipeline.train import calibrate_on_val, fit_configured_head

logger = logging.getLogger(__name__)

GROUPINGS = ("generator", "family", "subset", "dataset")
#: Groupings whose groups are the generated rows of a source, sharing every real row.
_SOURCE_GROUPS = ("generator", "family")
STUDY_FILE = "study_{name}.json"


@dataclass
class StudyInputs:
    """What a study reads: the features folders, the train params and which head to study.

    Attributes:
        features_dirs: features shards folders (several for `by="dataset"`).
        cfg: the train section of the params (the head's hyperparameters, calibration).
        kind: features kind the head reads (`pipeline.feature_kinds.KINDS`).
        seed: seeds the head.
        head: registry name of the head trained in every cell.
        by: what a group is: "generator", "family", "subset" or "dataset".
        threshold: decision threshold of the accuracies.
        options: study-specific settings (e.g. finetune's `train`, `finetune`, `epochs`).
        params: the whole params of the run (the studies that extract: captioners, clip_arch).
        cache_dir: the dataset's cache folder (`cache/<data.name>`), home of the cell cache and
            of the extracting studies' folders; default: the folder above the first features
            folder.
        refit: refit every cell, ignoring (and replacing) the cached ones.
    """

    features_dirs: list[Path]
    cfg: TrainConfig
    kind: str = "item"
    seed: int = 0
    head: str = "mlp"
    by: str = "generator"
    threshold: float = 0.5
    options: dict[str, Any] = field(default_factory=dict)
    params: Params | None = None
    cache_dir: Path | None = None
    refit: bool = False

    def dataset_cache(self) -> Path | None:
        """`cache_dir`, else the folder above the first features folder."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        return Path(self.features_dirs[0]).parent if self.features_dirs else None


@dataclass
class Rows:
    """Feature rows of every folder with each row's group (its generator, subset or folder)."""

    fs: FeatureSet
    group: np.ndarray  # per row; "" for the real rows of generator groups (in every group)
    by: str

    def names(self) -> list[str]:
        """The groups, sorted; for generator (family) groups those of the generated rows."""
        return sorted({str(g) for g in self.group.tolist()} - {""})

    def of(self, groups: list[str] | str, split: str) -> FeatureSet:
        """The rows of `groups` in `split`; generator and family groups take every real row
        of the split too."""
        wanted = [groups] if isinstance(groups, str) else list(groups)
        keep = np.isin(self.group, wanted) & (self.fs.split == split)
        if self.by in _SOURCE_GROUPS:
            keep |= (self.fs.y == 0) & (self.fs.split == split)
        return self.fs.take(keep)

    def trainable(self, groups: list[str] | str) -> bool:
        """Whether the train rows of `groups` hold both classes."""
        return len(np.unique(self.of(groups, "train").y)) == 2

    def testable(self, group: str) -> bool:
        """Whether `group` has generated test rows (and so a block to score)."""
        return bool((self.of(group, "test").y == 1).any())

    def usable(self) -> tuple[list[str], list[str], dict[str, str]]:
        """The groups that can be trained on, those that can be tested on, and why any
        other group is left out."""
        names = self.names()
        train = [g for g in names if self.trainable(g)]
        test = [g for g in names if self.testable(g)]
        skipped = {
            g: "no test rows of generated images"
            if g in train
            else "train rows lack a class"
            if g in test
            else "train rows lack a class; no generated test rows"
            for g in names
            if g not in train or g not in test
        }
        return train, test, skipped


def load_rows(inputs: StudyInputs, kind: str | None = None, *, min_groups: int = 2) -> Rows:
    """The train, val and test rows of every folder of `inputs`, grouped by `inputs.by`; fewer
    than `min_groups` groups is refused."""
    if inputs.by not in GROUPINGS:
        raise ConfigError(f"--by {inputs.by!r} is unknown; choose one of {', '.join(GROUPINGS)}")
    if not inputs.features_dirs:
        raise ConfigError("a study needs at least one features folder (--features)")
    if inputs.by == "dataset" and len(inputs.features_dirs) < 2:
        raise ConfigError("--by dataset compares features folders; give two or more --features")
    if inputs.by == "dataset":
        named = [dataset_name(d) for d in inputs.features_dirs]
        if len(set(named)) < len(named):
            raise ConfigError(
                f"--by dataset names each features folder by the folder above it, and "
                f"{named} repeat a name; give folders of different datasets (cache/<name>/features)"
            )
    parts, groups = [], []
    for d in inputs.features_dirs:
        fs = load_features(d, kind or inputs.kind, splits=("train", "val", "test"))
        parts.append(fs)
        if inputs.by == "dataset":
            groups.append(np.full(len(fs.y), dataset_name(d), dtype=object))
        elif inputs.by == "subset":
            groups.append(fs.subset.astype(object))
        else:
            source = fs.family if inputs.by == "family" else fs.generator
            groups.append(np.where(fs.y == 0, "", source).astype(object))
    rows = Rows(concat_features(parts), np.concatenate(groups), inputs.by)
    if len(rows.names()) < min_groups:
        raise DataUnusable(
            f"the features have {len(rows.names())} {inputs.by} group(s) ({rows.names()}); a "
            f"study compares two or more: pick another --by"
        )
    return rows


def dataset_name(features_dir: Path) -> str:
    """The group name of a features folder under `--by dataset`: the folder above it."""
    return Path(features_dir).resolve().parent.name or str(features_dir)


def fit_head(
    inputs: StudyInputs,
    train: FeatureSet,
    val: FeatureSet,
    *,
    kind: str | None = None,
    params: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """`inputs.head` fitted as the train stage fits it (`fit_configured_head`, then the
    calibration on val), with `params` overriding its configured hyperparameters; the head and
    its calibration."""
    cfg = inputs.cfg
    if params:
        merged: dict[str, Any] = {inputs.head: {**(getattr(cfg, inputs.head, {}) or {}), **params}}
        cfg = replace(cfg, **merged)
    head, _ = fit_configured_head(
        inputs.head,
        cfg,
        train,
        val,
        kind=kind or inputs.kind,
        seed=inputs.seed,
        features_dir=inputs.features_dirs[0],
    )
    calibration, _ = calibrate_on_val(inputs.head, cfg, head, val)
    return head, calibration


Blocks = dict[str, FeatureSet]


def prefixed(tests: Blocks) -> Blocks:
    """Test blocks named apart from the train and val blocks (for `Study.cached`)."""
    return {f"test:{name}": fs for name, fs in tests.items()}


def fit_and_score(
    inputs: StudyInputs,
    train: FeatureSet,
    val: FeatureSet,
    tests: Blocks,
    labels: dict[str, Any],
    kind: str | None = None,
) -> list[dict[str, Any]]:
    """One fit (`fit_head` on `train`, calibrated on `val`) scored on each test block: a cell
    per block, named by `labels` and `test` (the block's name)."""
    head, cal = fit_head(inputs, train, val, kind=kind)
    return [
        {**labels, "test": name, **score(head, cal, fs, inputs.threshold)}
        for name, fs in tests.items()
    ]


def score(
    head: Any, calibration: dict[str, Any], test: FeatureSet, threshold: float
) -> dict[str, Any]:
    """The evaluate stage's metrics of `head` (calibrated) on the rows of `test`."""
    if not len(test.y):
        raise DataUnusable("a study cell has no test rows; every group needs test rows")
    p = np.clip(apply_calibration(calibration, p_generated(head, test.X)), 0.0, 1.0)
    return dict(binary_metrics(test.y, p, threshold, decision=own_decision(head, test.X)))


class Study:
    """One study: `run` returns its table (JSON-able); `write` puts it in `study_<name>.json`.
    Its fits go through `cached` (the cell cache, see `cells`)."""

    name: ClassVar[str] = ""
    #: One line for `misalign study --list` and the report.
    summary: ClassVar[str] = ""
    #: The seed figure or table it reproduces.
    reproduces: ClassVar[str] = ""

    def __init__(self, cache: CellCache | None = None) -> None:
        self.cache = cache if cache is not None else CellCache()

    def run(self, inputs: StudyInputs) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    def cached(
        self,
        inputs: StudyInputs,
        blocks: dict[str, FeatureSet],
        compute: Callable[[], list[dict[str, Any]]],
        *,
        kind: str | None = None,
        labels: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """The cells one fit makes (`compute`), from the cell cache when the same rows
        (`blocks`: train, val and each test block by name), head, train params, seed, kind,
        threshold, grouping and `labels` (the cells' names, the study's options) made them."""
        key = {
            "study": self.name,
            "head": inputs.head,
            "train": train_settings(inputs.cfg),
            "seed": inputs.seed,
            "kind": kind or inputs.kind,
            "threshold": inputs.threshold,
            "by": inputs.by,
            "labels": labels or {},
            "rows": {name: rows_digest(fs) for name, fs in blocks.items()},
        }
        return self.cache.cells(key, compute)

    def header(self, inputs: StudyInputs, rows: Rows | None = None) -> dict[str, Any]:
        """The table's description: study, head, kind, grouping, folders, groups."""
        out: dict[str, Any] = {
            "study": self.name,
            "summary": self.summary,
            "reproduces": self.reproduces,
            "head": inputs.head,
            "kind": inputs.kind,
            "by": inputs.by,
            "seed": inputs.seed,
            "threshold": inputs.threshold,
            "features_dirs": [str(d) for d in inputs.features_dirs],
        }
        if rows is not None:
            train, test, skipped = rows.usable()
            out.update(groups=rows.names(), train_groups=train, test_groups=test, skipped=skipped)
        return out

    def write(self, table: dict[str, Any], out_dir: Path) -> Path:
        path = Path(out_dir) / STUDY_FILE.format(name=self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, table, ndigits=None)
        logger.info("study %s: %d cells -> %s", self.name, len(table.get("cells", [])), path)
        return path
