"""The identity of a model's weights and the runtime it runs in, found without loading it.

Both are parts of the row key (`pipeline.rows.key`): rows made with other weights, another
dtype or another device class are never reused.
"""

from __future__ import annotations

import importlib

from pipeline.config import BaseConfig, ModelsConfig
from pipeline.models import hf_role, resolve_device
from pipeline.models.clip import checkpoint_weights_id, find_checkpoint
from pipeline.models.clip import tiny_weights_id as clip_tiny_id
from pipeline.models.hf import resolve_dtype, resolve_weights, tiny_weights_id


def weights_identity(role: str, models: ModelsConfig, seed: int) -> str:
    """The identity of the weights `load_model(role, ...)` loads, found without loading them:
    the hub commit of a cached snapshot, or a content hash of a local checkpoint (remembered by
    path, size, mtime, inode and ctime: see `pipeline.rows.digest`). A loaded model's `weights_id` equals it; rows are keyed by it."""
    if role == "clip":
        if models.preset == "tiny":
            return clip_tiny_id(seed, models.clip.id)
        spec = models.clip
        checkpoint = find_checkpoint(spec.id, spec.pretrained, spec.path)
        return checkpoint_weights_id(spec.id, spec.pretrained, checkpoint)
    field, module, cls_name = hf_role(role)
    if models.preset == "tiny":
        cls = getattr(importlib.import_module(module), cls_name)
        return tiny_weights_id(cls.tiny_name, seed)
    hf_spec = getattr(models, field)
    return resolve_weights(hf_spec.id, hf_spec.path or None, field).weights_id


def runtime_class(base: BaseConfig) -> dict[str, str]:
    """The dtype and device class (cpu, cuda, mps; not the card) models run with: both shape
    the numbers, so both are part of a row's key."""
    device = resolve_device(base.device)
    dtype = str(resolve_dtype(base.dtype, device)).removeprefix("torch.")
    return {"dtype": dtype, "device_class": device.split(":")[0]}
