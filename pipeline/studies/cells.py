"""The cell cache: a study's cells stored under the key of everything that made them, so that a
rerun with unchanged feature rows and head settings refits nothing.

A key covers one fit and the cells scored with it: the content of every feature row used (ids,
labels and values of the train, val and each test block), the head's name, the train params
(every head's section, calibration, ...: a meta head fits the others' sections), the seed, the
features kind, the threshold, the grouping, the groups' names and the study's own options. The
head's code is not in the key: after changing a head's code, rerun with `--refit`
(`StudyInputs.refit`). Entries live in `<dataset cache>/studies/cells/<key>.json`, each written
atomically; an unreadable entry is refitted and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.features import FeatureSet
from pipeline.rows.atomic import write_json_atomic
from pipeline.rows.key import params_hash

logger = logging.getLogger(__name__)

CELLS_DIR = Path("studies") / "cells"
#: Bump when fitting or scoring a cell changes its numbers: every cached cell is refitted.
CELLS_VERSION = 1


def rows_digest(fs: FeatureSet) -> str:
    """sha256 of a block of feature rows: their ids, labels and values, in order."""
    digest = hashlib.sha256()
    x = np.ascontiguousarray(fs.X)
    digest.update(json.dumps([str(x.dtype), list(x.shape)]).encode())
    digest.update("\0".join(map(str, fs.ids)).encode())
    digest.update(np.ascontiguousarray(fs.y, dtype=np.int64).tobytes())
    digest.update(x.tobytes())
    return digest.hexdigest()


def train_settings(cfg: Any) -> dict[str, Any]:
    """The train params that shape a fitted head (all but the list of heads the train stage
    trains)."""
    return {k: v for k, v in asdict(cfg).items() if k != "heads"}


@dataclass
class CellCache:
    """Cells by key under `folder` (None: nothing cached); counts fits made and fits reused.
    With `refit`, cached cells are not read (the new ones replace them)."""

    folder: Path | None = None
    refit: bool = False
    fitted: int = 0
    reused: int = 0

    def cells(
        self, key: Mapping[str, Any], compute: Callable[[], list[dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """The cells of `key`: cached ones, else `compute()`'s (one fit), then stored."""
        full = {"cells_version": CELLS_VERSION, **key}
        path = self.folder / f"{params_hash(full)}.json" if self.folder is not None else None
        if path is not None and not self.refit and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if stored.get("key") == json.loads(json.dumps(full, default=str)):
                    self.reused += 1
                    return list(stored["cells"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                logger.warning("ignoring unreadable cached cells %s (%s); refitting", path, err)
        cells = compute()
        self.fitted += 1
        if path is not None:
            write_json_atomic(path, {"key": full, "cells": cells}, ndigits=None)
        return cells

    def summary(self) -> dict[str, Any]:
        return {
            "fitted": self.fitted,
            "reused": self.reused,
            "folder": str(self.folder) if self.folder is not None else None,
        }
