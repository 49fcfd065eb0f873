"""The row key: a row is reused only when its upstream content, the step's params, the weights'
identity, the dtype/device class and the step's code version are all the same.

Everything that decides whether a cached row may be reused lives here:

- **upstream content**: `content_id` (sha256 of an image file's bytes) is the id every stage
  keys its rows by, and `check_unchanged` refuses a file that no longer has the id ingest
  recorded (ingest keeps its `file_stamp`: a file of the same size and mtime is not
  re-hashed); `row_hash` hashes a row's upstream inputs (its caption, boxes, phrases) into
  the row's `input_hash`, and `decoding_hash` folds in how the pixels are decoded;
- **params**: `params_hash` of the settings that shape the rows (each step picks them: not
  batch sizes), which also carries the `runtime_key`;
- **weights' identity**: the hub commit of a cached snapshot or a content hash of a local
  checkpoint, found without loading the model (`pipeline.models.identity.weights_identity`:
  only the models package knows each model's files, and this module must not import it, so
  that the features, train and evaluate stages do not depend on the model wrappers);
- **dtype and device class**: cpu, cuda or mps, not which card
  (`pipeline.models.identity.runtime_class`); `runtime_key` puts them together;
- **code version**: `STEP_VERSIONS`, bumped when a step's output changes.

`reuse_index` and `matches` apply the key to the shards already on disk (see `runner`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DatasetError
from pipeline.rows import store
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

# Version of the code that shapes each step's rows: the step's `compute` (pipeline/extract/)
# and the model wrapper it calls (models/blip2.py, models/grounding.py, models/clip.py,
# bert.py, dinov2.py). It is part of every row's key, so bumping it recomputes that step's rows
# (and downstream rows only where their inputs then change). tests/test_cache_key.py pins each
# step's output on a fixed fixture: a change of output without a bump here fails it; a refactor
# that keeps the output passes and invalidates nothing.
# objects 2: per-phrase NMS at ground.nms_iou (GLIP's 0.6) after the grounder's post-processing.
# clip 2: encode.image_transform (issue 19), default center_crop.
# clip 3: the tiny preset's CLIP follows models.clip.id (issue 22; ViT-L-14's tiny has patch 14).
STEP_VERSIONS: dict[str, int] = {"captions": 1, "objects": 2, "clip": 3}


def content_id(path: str | Path) -> str:
    """sha256 of the file's bytes: the id every stage keys its rows by."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(size, mtime_ns) of a file, (-1, -1) when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (int(st.st_size), int(st.st_mtime_ns))


def check_unchanged(
    paths: Sequence[str], ids: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int]
) -> None:
    """Refuse files that are no longer what ingest recorded: same size and mtime pass at once,
    any other file is hashed again and must still have its content id.

    Raises:
        DatasetError: naming the first changed or missing file and the fix (rerun ingest, which
            gives a changed file its new id; `dvc repro` reruns it).
    """
    for path, cid, size, mtime in zip(paths, ids, sizes, mtimes):
        if file_stamp(path) == (int(size), int(mtime)):
            continue
        if not os.path.isfile(path):
            raise DatasetError(
                f"image {path} was ingested but is gone or no longer a file; restore it or rerun "
                "ingest (`dvc repro` reruns it)"
            )
        try:
            now = content_id(path)
        except OSError as err:
            raise DatasetError(
                f"image {path} cannot be read: {err.strerror or err}; make it readable or rerun "
                "ingest (`dvc repro` reruns it)"
            ) from err
        if now != cid:
            raise DatasetError(
                f"image {path} changed since ingest (its content is no longer id {cid[:12]}…); "
                "rerun ingest so that it gets its new id (`dvc repro` reruns it)"
            )


def row_hash(*values: Any) -> str:
    """Hash of a row's upstream inputs: a row is recomputed when this changes."""
    blob = json.dumps(values, sort_keys=True, default=lambda v: np.asarray(v).tolist())
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def decoding_hash(rows: Arrays, decoder: str = "pil") -> np.ndarray:
    """Row input hashes that also change when the pixels are decoded differently (EXIF
    orientation off, or a decoder other than PIL: `base.decode: gpu`'s nvJPEG); with the
    default decoding they are the hashes as computed."""
    flags = rows.get("exif_transpose")
    hashes = rows["input_hash"]
    if flags is not None:
        hashes = np.array(
            [h if f else row_hash(h, "exif_transpose=false") for h, f in zip(hashes, flags)],
            dtype=object,
        )
    if decoder != "pil":
        hashes = np.array([row_hash(h, f"decoder={decoder}") for h in hashes], dtype=object)
    return hashes


def params_hash(*parts: Any) -> str:
    """Stable short hash of the configuration that shaped an output."""
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _plain(part: Any) -> Any:
    """A config dataclass as a dict (what `params_hash` hashes); anything else as it is."""
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return dataclasses.asdict(part)
    return part


def runtime_key(
    stage: str, *, weights: Mapping[str, str], runtime: Mapping[str, str]
) -> dict[str, Any]:
    """What, besides params and upstream content, shapes a step's rows: its code version, the
    identity of the weights of each model it runs (`weights`: role -> identity, from
    `pipeline.models.identity.weights_identity`), and the dtype and device class they run in
    (`runtime`, from `pipeline.models.identity.runtime_class`); a step without a model passes
    neither."""
    key: dict[str, Any] = {"step_version": STEP_VERSIONS[stage]}
    if weights:
        key["weights"] = dict(weights)
        key.update(runtime)
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
    so in its attributes (an upstream provenance that changed is rewritten), and every dataset
    still matches its checksum (a damaged shard, or one written before checksums, is rebuilt)."""
    if not path.exists():
        return False
    try:
        done = store.read_shard(path, ["ids", "input_hash"])
        old = store.read_attrs(path)
        if not (
            old.get("params_hash") == phash
            and all(old.get(k) == v for k, v in attrs.items())
            and list(done["ids"]) == ids
            and list(done["input_hash"]) == hashes
        ):
            return False
        if store.CHECKSUMS not in old:
            logger.info("rewriting %s to add checksums (its rows are reused)", path)
            return False
        store.verify_shard(path)
        return True
    except store.ShardError as err:
        logger.warning("%s; recomputing its rows", err)
        return False
