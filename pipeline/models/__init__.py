"""Model registry: upstream names → loaders, device rules, and one weights check for a run."""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.config import BaseConfig, ModelsConfig
from pipeline.models.hf import ModelWeightsMissing, resolve_dtype, resolve_weights
from pipeline.provenance import needed_roles

__all__ = [
    "ROLES",
    "WeightsMissing",
    "check_weights",
    "hf_role",
    "load_model",
    "needed_roles",
]

# role -> (ModelsConfig field, module, class) of the transformers wrappers.
_HF_ROLES = {
    "blip2": ("blip2", "pipeline.models.blip2", "Blip2Captioner"),
    "blip": ("blip", "pipeline.models.blip", "BlipCaptioner"),
    "llava": ("llava", "pipeline.models.llava", "LlavaCaptioner"),
    "grounder": ("grounding", "pipeline.models.grounding", "GroundingDinoGrounder"),
    "bert": ("bert", "pipeline.models.bert", "BertTextEncoder"),
    "dinov2": ("dinov2", "pipeline.models.dinov2", "Dinov2ImageEncoder"),
}
ROLES = ("clip", *_HF_ROLES)


class WeightsMissing(ModelWeightsMissing):
    """Weights of one or more models are absent; the message says where we looked and the fix."""

    def __init__(self, message: str) -> None:
        RuntimeError.__init__(self, message)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(role: str, models: ModelsConfig, base: BaseConfig) -> Any:
    """Load the model playing `role` ("clip", a captioner ("blip2", "blip", "llava"),
    "grounder", "bert", "dinov2")."""
    device = resolve_device(base.device)
    if role == "clip":
        from pipeline.models.clip import ClipEncoder

        return ClipEncoder.load(
            name=models.clip.id,
            pretrained=models.clip.pretrained,
            path=models.clip.path,
            preset=models.preset,
            device=device,
            dtype=resolve_dtype(base.dtype, device),
            seed=base.seed,
        )
    field, module, cls_name = hf_role(role)
    spec = getattr(models, field)
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.load(
        model_id=spec.id,
        path=spec.path or None,
        preset=models.preset,
        device=device,
        dtype=base.dtype,
        seed=base.seed,
    )


def hf_role(role: str) -> tuple[str, str, str]:
    """The ModelsConfig field, module and class name of a transformers wrapper's role."""
    if role not in _HF_ROLES:
        raise ValueError(f"unknown model role {role!r}; known roles: {', '.join(ROLES)}")
    return _HF_ROLES[role]


def check_weights(models: ModelsConfig, roles: list[str] | tuple[str, ...]) -> None:
    """Raise `WeightsMissing` listing every needed model whose weights are absent.

    Looks without loading and without any network call, so a run that cannot finish stops in
    seconds rather than after hours of captioning.
    """
    from pipeline.models.clip import find_checkpoint, tiny_config

    if models.preset == "tiny":
        if "clip" in roles:
            tiny_config(models.clip.id)  # refuses an architecture the tiny preset cannot build
        return
    problems = []
    for role in roles:
        try:
            if role == "clip":
                find_checkpoint(models.clip.id, models.clip.pretrained, models.clip.path)
            else:
                field = _HF_ROLES[role][0]
                spec = getattr(models, field)
                resolve_weights(spec.id, spec.path or None, field)
        except ModelWeightsMissing as err:
            problems.append(str(err))
    if problems:
        raise WeightsMissing("; ".join(problems))
