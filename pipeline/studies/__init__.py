"""Studies on the cached features (`misalign study <name>`): each trains and scores heads on
groups of feature rows and writes one table, `metrics/study_<name>.json`, which the report
draws. Studies needing new extraction print their `dvc exp run` commands instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.studies.base import STUDY_FILE, Study, StudyInputs
from pipeline.studies.cross import LeaveOneOut, TrainSets
from pipeline.studies.distances import Distances
from pipeline.studies.finetune import Finetune
from pipeline.studies.recipes import Captioners, ClipArch, Recipe

STUDIES: dict[str, type[Study]] = {
    cls.name: cls for cls in (TrainSets, LeaveOneOut, Distances, Finetune, Captioners, ClipArch)
}

__all__ = ["STUDIES", "STUDY_FILE", "Recipe", "Study", "StudyInputs", "run_study"]


def run_study(name: str, inputs: StudyInputs, out_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """Run study `name` and write its table to `out_dir` (a recipe writes nothing)."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    study = STUDIES[name]()
    table = study.run(inputs)
    if isinstance(study, Recipe):
        return table, None
    return table, study.write(table, out_dir)
