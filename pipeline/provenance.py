"""What made an output: the models preset and the id of every model a run uses (torch-free).

Every output a user reads (metrics, heads, score and prediction CSVs, plots) carries this
record, so that a number made by the `tiny` preset's random models can never pass for a real
result.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config.schema import CAPTIONERS
from pipeline.logs import warn_tiny

logger = logging.getLogger(__name__)

TINY = "tiny"

# Names the tiny preset's models go by in shards and outputs (the wrappers' `tiny_name`).
TINY_IDS = {
    "clip": "tiny-clip",
    "blip2": "tiny-blip2",
    "blip": "tiny-blip",
    "llava": "tiny-llava",
    "grounder": "tiny-grounding-dino",
    "bert": "tiny-bert",
    "dinov2": "tiny-dinov2",
}
# The captioner roles: each is a caption.model choice, named after its ModelsConfig field. In
# a provenance record whichever one ran is the "captioner".
CAPTIONER_ROLES = CAPTIONERS
CAPTIONER = "captioner"
# role -> ModelsConfig field
_FIELDS = {
    "clip": "clip",
    "blip2": "blip2",
    "blip": "blip",
    "llava": "llava",
    "grounder": "grounding",
    "bert": "bert",
    "dinov2": "dinov2",
}


def needed_roles(params: Any) -> list[str]:
    """Every model a full run with these params loads."""
    roles = ["clip"]
    if params.caption.source != "dataset":
        roles.append(params.caption.model)
    if params.ground.enabled:
        roles.append("grounder")
    roles += [r for r, on in (("bert", params.encode.bert), ("dinov2", params.encode.dinov2)) if on]
    return roles


def model_id(models: Any, role: str) -> str:
    """The id a role's model goes by: `tiny-*` under the tiny preset, else the upstream name
    (`ViT-L-14/openai` for CLIP), with the local path when one is given."""
    if models.preset == TINY:
        return TINY_IDS[role]
    spec = getattr(models, _FIELDS[role])
    name = f"{spec.id}/{spec.pretrained}" if role == "clip" else spec.id
    return f"{name} ({spec.path})" if spec.path else name


def run_provenance(params: Any, features_dir: str | Path | None = None) -> dict[str, Any]:
    """`{"preset": ..., "models": {role: id}}` of the models behind a run's features.

    The preset is read from the features shards when given (what actually made them), else
    from the params; a disagreement is logged, and the shards win.
    """
    preset = params.models.preset
    if features_dir is not None:
        shard_preset = features_preset(features_dir)
        if shard_preset and shard_preset != preset:
            logger.warning(
                "the features in %s were made with models.preset=%s, the params say %s; "
                "recording %s",
                features_dir,
                shard_preset,
                preset,
                shard_preset,
            )
            preset = shard_preset
    models = params.models
    if preset != models.preset:
        import dataclasses

        models = dataclasses.replace(models, preset=preset)
    return {
        "preset": preset,
        "models": {record_key(r): model_id(models, r) for r in needed_roles(params)},
    }


def record_key(role: str) -> str:
    """The key a role's model has in a provenance record: "captioner" for whichever captioner
    ran (its id names it), the role itself otherwise."""
    return CAPTIONER if role in CAPTIONER_ROLES else role


def recorded(info: dict[str, Any]) -> dict[str, Any]:
    """The provenance part (`preset`, `models`) of a head's train.json ({} for old heads)."""
    return {k: info[k] for k in ("preset", "models") if k in info}


def features_preset(features_dir: str | Path) -> str:
    """The `preset` attribute of the first features shard ('' when there is none)."""
    from pipeline.rows import store

    shards = store.list_shards(features_dir)
    return str(store.read_attrs(shards[0]).get("preset", "")) if shards else ""


def models_text(record: dict[str, Any]) -> str:
    """One-line form for CSV columns and titles: `clip=ViT-L-14/openai;captioner=...`."""
    return ";".join(f"{role}={mid}" for role, mid in sorted(record.get("models", {}).items()))


def label(record: dict[str, Any]) -> str:
    """Short form for plot titles: `preset=tiny (random models: meaningless)` or the models."""
    preset = record.get("preset", "?")
    if preset == TINY:
        return "preset=tiny (RANDOM models: meaningless)"
    clip = record.get("models", {}).get("clip", "")
    return f"preset={preset}, CLIP {clip}" if clip else f"preset={preset}"


def warn_if_tiny(record: dict[str, Any], what: str) -> None:
    if record.get("preset") == TINY:
        warn_tiny(
            logger,
            "%s was trained on features of the tiny preset's RANDOM models: its outputs are "
            "meaningless (retrain with models.preset=paper for real results)",
            what,
        )
