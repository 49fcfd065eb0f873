"""Studies on the cached features (`misalign study <name>`): each trains and scores heads on
groups of feature rows and writes one table, `metrics/study_<name>.json`, which the report
draws. The captioners and clip_arch studies first extract each setting's features in-process
(`extraction`); every study's fits go through the cell cache (`cells`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.studies.base import STUDY_FILE, Study, StudyInputs
from pipeline.studies.cells import CELLS_DIR, CellCache
from pipeline.studies.cross import LeaveOneOut, TrainSets
from pipeline.studies.distances import Distances
from pipeline.studies.extraction import Captioners, ClipArch, ExtractionStudy
from pipeline.studies.finetune import Finetune

STUDIES: dict[str, type[Study]] = {
    cls.name: cls for cls in (TrainSets, LeaveOneOut, Distances, Finetune, Captioners, ClipArch)
}

__all__ = ["STUDIES", "STUDY_FILE", "ExtractionStudy", "Study", "StudyInputs", "run_study"]

logger = logging.getLogger(__name__)


def run_study(name: str, inputs: StudyInputs, out_dir: Path) -> tuple[dict[str, Any], Path]:
    """Run study `name` and write its table to `out_dir`; the table records how many fits it
    made and how many it took from the cell cache (`cache`)."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    cells = inputs.dataset_cache()
    folder = cells / CELLS_DIR if cells is not None else None
    study = STUDIES[name](CellCache(folder, refit=inputs.refit))
    table = study.run(inputs)
    table["cache"] = study.cache.summary()
    logger.info(
        "study %s: %d fits made, %d reused from %s",
        name,
        study.cache.fitted,
        study.cache.reused,
        study.cache.folder,
    )
    return table, study.write(table, out_dir)
