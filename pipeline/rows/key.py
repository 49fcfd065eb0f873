"""The row key: a row is reused only when its upstream content, the step's params, the weights'
identity, the dtype/device class and the step's code version are all the same.

Everything that decides whether a cached row may be reused lives here:

- **upstream content**: `content_id` (sha256 of an image file's bytes) is the id every stage
  keys its rows by; `row_hash` hashes a row's upstream inputs (its caption, boxes, phrases)
  into the row's `input_hash`, and `decoding_hash` folds in how the pixels are decoded;
- **params**: `params_hash` of the settings that shape the rows (each step picks them: not
  batch sizes), which also carries the `runtime_key`;
- **weights' identity**: `weights_identity`, the hub commit of a cached snapshot or a content
  hash of a local checkpoint, found without loading the model;
- **dtype and device class**: `runtime_class` (cpu, cuda, mps; not which card);
- **code version**: `STEP_VERSIONS`, bumped when a step's output changes.

`reuse_index` and `matches` apply the key to the shards already on disk (see `runner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BaseConfig, ModelsConfig
from pipeline.rows import store
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

# Version of the code that shapes each step's rows: the step's `compute` (pipeline/extract/)
# and the model wrapper it calls (models/blip2.py, models/grounding.py, models/clip.py,
# bert.py, dinov2.py). It is part of every row's key, so bumping it recomputes that step's rows
# (and downstream rows only where their inputs then change). tests/test_cache_key.py pins each
# step's output on a fixed fixture: a change of output without a bump here fails it; a refactor
# that keeps the output passes and invalidates nothing.
# clip 2: encode.image_transform (issue 19), default center_crop.
STEP_VERSIONS: dict[str, int] = {"captions": 1, "objects": 1, "clip": 2}


def content_id(path: str | Path) -> str:
    """sha256 of the file's bytes: the id every stage keys its rows by."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def row_hash(*values: Any) -> str:
    """Hash of a row's upstream inputs: a row is recomputed when this changes."""
    blob = json.dumps(values, sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def decoding_hash(rows: Arrays) -> np.ndarray:
    """Row input hashes that also change when the pixels are decoded differently (EXIF
    orientation off); with the default decoding they are the hashes as computed."""
    flags = rows.get("exif_transpose")
    if flags is None:
        return rows["input_hash"]
    return np.array(
        [
            h if f else row_hash(h, "exif_transpose=false")
            for h, f in zip(rows["input_hash"], flags)
        ],
        dtype=object,
    )


def params_hash(*parts: Any) -> str:
    """Stable short hash of the configuration that shaped an output."""
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(part: Any) -> Any:
    """A config dataclass as a dict (what `params_hash` hashes); anything else as it is."""
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return dataclasses.asdict(part)
    return part


def weights_identity(role: str, models: ModelsConfig, seed: int) -> str:
    """The identity of the weights `load_model(role, ...)` loads, found without loading them:
    the hub commit of a cached snapshot, or a content hash of a local checkpoint (remembered by
    path, size and mtime). A loaded model's `weights_id` equals it; rows are keyed by it."""
    # pipeline.models imports torch: only steps that run a model pay for it, not ingest.
    from pipeline.models import hf_role
    from pipeline.models.clip import checkpoint_weights_id, find_checkpoint
    from pipeline.models.clip import tiny_weights_id as clip_tiny_id
    from pipeline.models.hf import resolve_weights, tiny_weights_id

    if role == "clip":
        if models.preset == "tiny":
            return clip_tiny_id(seed)
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
    # pipeline.models imports torch (see weights_identity).
    from pipeline.models import resolve_device
    from pipeline.models.hf import resolve_dtype

    device = resolve_device(base.device)
    dtype = str(resolve_dtype(base.dtype, device)).removeprefix("torch.")
    return {"dtype": dtype, "device_class": device.split(":")[0]}


def runtime_key(
    stage: str, roles: Sequence[str], models: ModelsConfig, base: BaseConfig
) -> dict[str, Any]:
    """What, besides params and upstream content, shapes a step's rows: its code version, the
    identity of the weights of each model it runs, and the dtype and device class they run in."""
    key: dict[str, Any] = {"step_version": STEP_VERSIONS[stage]}
    if roles:
        key["weights"] = {r: weights_identity(r, models, base.seed) for r in roles}
        key.update(runtime_class(base))
    return key


def reuse_index(directories: Sequence[Path], phash: str) -> dict[str, tuple[str, int, str]]:
    """id -> (shard path, row, input_hash) for the rows in `directories` made with the same
    params (`phash`); a row is reused when its input hash is also the same."""
    index: dict[str, tuple[str, int, str]] = {}
    for directory in directories:
        for path in store.list_shards(directory):
            try:
                if store.read_attrs(path).get("params_hash") != phash:
                    continue
                data = store.read_shard(path, ["ids", "input_hash"])
            except store.ShardError as err:
                logger.warning("ignoring unreadable shard %s (%s); it will be rebuilt", path, err)
                continue
            for row, (cid, ihash) in enumerate(zip(data["ids"], data["input_hash"])):
                index[str(cid)] = (str(path), row, str(ihash))
    return index


def matches(
    path: Path, phash: str, ids: list[str], hashes: list[str], attrs: dict[str, Any]
) -> bool:
    """Whether the shard at `path` holds exactly these rows made with these params, and says
    so in its attributes (an upstream provenance that changed is rewritten)."""
    if not path.exists():
        return False
    try:
        done = store.read_shard(path, ["ids", "input_hash"])
        old = store.read_attrs(path)
        return bool(
            old.get("params_hash") == phash
            and all(old.get(k) == v for k, v in attrs.items())
            and list(done["ids"]) == ids
            and list(done["input_hash"]) == hashes
        )
    except store.ShardError:
        return False
