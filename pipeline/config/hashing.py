"""Plain-dict views and stable hashes of config dataclasses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-dict view of a config dataclass (for hashing and provenance attributes)."""
    return dataclasses.asdict(cfg)


def params_hash(*parts: Any) -> str:
    """Stable short hash of the configuration that shaped an output."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
