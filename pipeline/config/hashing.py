"""Plain-dict views of config dataclasses (hashes of them live in `pipeline.rows.key`)."""

from __future__ import annotations

import dataclasses
from typing import Any


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain-dict view of a config dataclass (for hashing and provenance attributes)."""
    return dataclasses.asdict(cfg)
