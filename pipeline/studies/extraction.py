"""The studies that extract anew: caption models (`captioners`, ITEM Fig. 7) and CLIP
architectures (`clip_arch`, ITEM Fig. 8).

Each setting (a captioner, an architecture) is the run's params with one change, checked whole
(ranges, names, every needed model's weights) for every setting before any work. Its stages run
in this process, with the extraction library the DVC stages call, into the setting's own
folders `<dataset cache>/studies/<study>/<setting>/{captions,objects,clip,features}`; the main
pipeline's ingest shards are read, never rewritten. Each stage reuses the rows of the main
pipeline's folder (and those retained beside it) under the usual row key, so the setting equal
to the params' own recomputes nothing, and a setting run before reuses its own folder. Then, per
setting, the head is fitted on its train rows and scored on its test rows: all of them and each
group's, through the cell cache.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from pipeline.config import ModelSpec, Params, check_names, check_ranges
from pipeline.config.schema import CAPTIONERS
from pipeline.errors import ConfigError, DataUnusable
from pipeline.features import run_features
from pipeline.provenance import needed_roles
from pipeline.rows import store
from pipeline.studies.base import Study, StudyInputs, fit_and_score, load_rows, prefixed

logger = logging.getLogger(__name__)

#: Under the dataset's cache folder: `studies/<study>/<setting>/<stage>`.
STUDY_DIR = Path("studies")
#: ITEM Fig. 8's CLIP architectures (open_clip names), each with OpenAI's weights.
CLIP_ARCHS = ("RN50", "ViT-B-16", "ViT-L-14")
CLIP_PRETRAINED = "openai"


@dataclass(frozen=True)
class Setting:
    """One setting of a study: its label, its params and its folder."""

    label: str
    params: Params
    folder: Path


class ExtractionStudy(Study):
    """A study whose settings change what extraction computes (see the module docstring)."""

    #: The setting labels, in table order.
    labels: ClassVar[tuple[str, ...]] = ()
    #: The cell key that names a setting.
    setting_key: ClassVar[str] = "setting"

    def apply(self, params: Params, label: str) -> Params:  # pragma: no cover - overridden
        """The run's params with setting `label` applied."""
        raise NotImplementedError

    def roles(self, params: Params) -> list[str]:  # pragma: no cover - overridden
        """The models the setting's stages load."""
        raise NotImplementedError

    def extract(self, setting: Setting, main: Path) -> dict[str, dict[str, Any]]:
        """Run the setting's stages into its folder; per stage, rows processed and reused."""
        raise NotImplementedError  # pragma: no cover - overridden

    def needs(self, params: Params, main: Path) -> None:
        """Refuse a run whose main pipeline lacks what the study reads."""
        _need_shards(main / "ingest", "ingest")

    def settings(self, inputs: StudyInputs) -> tuple[Params, Path, list[Setting]]:
        main = inputs.dataset_cache()
        if inputs.params is None or main is None:
            raise ConfigError(
                f"the {self.name} study extracts features: it needs the run's params and the "
                "dataset's cache folder (misalign study reads --params and --cache)"
            )
        params = inputs.params
        if inputs.by == "dataset":
            raise ConfigError(
                f"the {self.name} study compares settings on one dataset; group its test rows "
                "--by generator, family or subset"
            )
        chosen = list(inputs.options.get("settings") or self.labels)
        unknown = [s for s in chosen if s not in self.labels]
        if unknown:
            raise ConfigError(
                f"{self.name} has no setting {unknown[0]!r}; its settings: {', '.join(self.labels)}"
            )
        return (
            params,
            main,
            [
                Setting(s, self.apply(params, s), main / STUDY_DIR / self.name / s)
                for s in self.labels
                if s in chosen
            ],
        )

    def run(self, inputs: StudyInputs) -> dict[str, Any]:
        params, main, settings = self.settings(inputs)
        # Every setting's whole config and weights first: a missing model stops the study in
        # seconds, not after the first setting's hours of extraction.
        self.needs(params, main)
        missing: dict[str, None] = {}  # ordered and without repeats: settings share models
        for setting in settings:
            missing.update(dict.fromkeys(check_setting(setting.params, self.roles(setting.params))))
        if missing:
            from pipeline.models import WeightsMissing  # see check_setting

            raise WeightsMissing("; ".join(missing))
        extraction = {}
        for setting in settings:
            logger.info("study %s: extracting setting %s", self.name, setting.label)
            extraction[setting.label] = self.extract(setting, main)
            _forget_models()  # one setting's models at a time in memory
        cells = []
        for setting in settings:
            own = replace(inputs, features_dirs=[setting.folder / "features"])
            rows = load_rows(own, min_groups=1)
            _, names, _ = rows.usable()
            tr, va = rows.fs.where("train"), rows.fs.where("val")
            tests = {"all": rows.fs.where("test"), **{t: rows.of(t, "test") for t in names}}
            labels = {self.setting_key: setting.label}
            cells += self.cached(
                own,
                {"train": tr, "val": va, **prefixed(tests)},
                functools.partial(fit_and_score, own, tr, va, tests, labels),
                labels=labels,
            )
        header = self.header(
            replace(inputs, features_dirs=[s.folder / "features" for s in settings])
        )
        return {
            **header,
            "settings": [s.label for s in settings],
            "setting_key": self.setting_key,
            "extraction": extraction,
            "cells": cells,
        }


class Captioners(ExtractionStudy):
    """One setting per caption model: captions and everything after them are recomputed."""

    name = "captioners"
    summary = "one setting per caption model: captions, objects, embeddings, features, head"
    reproduces = "ITEM Fig. 7"
    labels = CAPTIONERS
    setting_key = "captioner"

    def apply(self, params: Params, label: str) -> Params:
        return replace(params, caption=replace(params.caption, model=label))

    def roles(self, params: Params) -> list[str]:
        return needed_roles(params)

    def needs(self, params: Params, main: Path) -> None:
        if params.caption.source == "dataset":
            raise ConfigError(
                "the captioners study compares caption models, but caption.source=dataset "
                "captions nothing; set caption.source: blip2 (every image captioned, as ITEM)"
            )
        super().needs(params, main)

    def extract(self, setting: Setting, main: Path) -> dict[str, dict[str, Any]]:
        # The extraction library imports torch (seconds): only the extracting studies load it.
        from pipeline.extract.caption import run_caption
        from pipeline.extract.encode import run_encode
        from pipeline.extract.ground import run_ground

        p, f, name = setting.params, setting.folder, setting.params.data.name
        models, base = p.models, p.base
        counts = {
            "captions": run_caption(
                main / "ingest",
                f / "captions",
                cfg=p.caption,
                models=models,
                base=base,
                dataset=name,
                reuse_from=[main / "captions"],
            ),
            "objects": run_ground(
                main / "ingest",
                f / "captions",
                f / "objects",
                cfg=p.ground,
                models=models,
                base=base,
                dataset=name,
                reuse_from=[main / "objects"],
            ),
            "clip": run_encode(
                main / "ingest",
                f / "captions",
                f / "objects",
                f / "clip",
                cfg=p.encode,
                crop_padding=p.ground.crop_padding,
                models=models,
                base=base,
                dataset=name,
                reuse_from=[main / "clip"],
            ),
        }
        return {
            **{stage: _counts(t) for stage, t in counts.items()},
            "features": _features(p, main / "ingest", f / "clip", f, f / "captions"),
        }


class ClipArch(ExtractionStudy):
    """One setting per CLIP architecture: the main pipeline's captions and objects, embeddings
    and features recomputed."""

    name = "clip_arch"
    summary = "one setting per CLIP architecture: embeddings, features, head (captions and objects shared)"
    reproduces = "ITEM Fig. 8"
    labels = CLIP_ARCHS
    setting_key = "arch"

    def apply(self, params: Params, label: str) -> Params:
        # The params' own architecture keeps its spec (tag, local file): its rows are the main
        # pipeline's. Another is that architecture with OpenAI's weights from the usual caches.
        own = params.models.clip
        spec = own if own.id == label else ModelSpec(label, CLIP_PRETRAINED)
        return replace(params, models=replace(params.models, clip=spec))

    def roles(self, params: Params) -> list[str]:
        return [r for r in needed_roles(params) if r in ("clip", "bert", "dinov2")]

    def needs(self, params: Params, main: Path) -> None:
        super().needs(params, main)
        for stage in ("captions", "objects"):
            _need_shards(main / stage, stage)

    def extract(self, setting: Setting, main: Path) -> dict[str, dict[str, Any]]:
        from pipeline.extract.encode import run_encode  # see Captioners.extract

        p, f = setting.params, setting.folder
        timings = run_encode(
            main / "ingest",
            main / "captions",
            main / "objects",
            f / "clip",
            cfg=p.encode,
            crop_padding=p.ground.crop_padding,
            models=p.models,
            base=p.base,
            dataset=p.data.name,
            reuse_from=[main / "clip"],
        )
        return {
            "clip": _counts(timings),
            "features": _features(p, main / "ingest", f / "clip", f, main / "captions"),
        }


def check_setting(params: Params, roles: list[str]) -> list[str]:
    """The checks every stage makes of its params (ranges, names: raised), and what the
    weights check says of each model the setting loads that is missing (returned)."""
    from pipeline.models import WeightsMissing, check_weights  # the registry imports torch

    check_ranges(params)
    check_names(params)
    missing = []
    for role in roles:
        try:
            check_weights(params.models, [role])
        except WeightsMissing as err:
            missing.append(str(err))
    return missing


def _need_shards(folder: Path, stage: str) -> None:
    if not store.list_shards(folder):
        raise DataUnusable(
            f"no {stage} shards in {folder}: the study starts from the main pipeline's cache; "
            "run `dvc repro` first (or give --cache, --params of that run)"
        )


def _counts(timings: dict[str, Any]) -> dict[str, Any]:
    return {k: timings.get(k) for k in ("n_processed", "n_reused", "model_loads")}


def _features(p: Params, ingest: Path, clip: Path, folder: Path, captions: Path) -> dict[str, Any]:
    n = run_features(ingest, clip, folder / "features", p.features, p.data.name, captions)
    return {"n_processed": n, "n_reused": 0}


def _forget_models() -> None:
    from pipeline.extract.loaded import forget_loaded_models

    forget_loaded_models()
