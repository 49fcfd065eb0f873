"""Caption provenance: where each image's caption came from, counted per class, and a loud
warning when the sources tell the label (a shortcut no deployed detector has)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from pipeline.evaluation.metrics import as_binary_label

logger = logging.getLogger(__name__)

#: Largest difference, between real and generated images, of the share of any one caption
#: source before captions count as class-correlated: a caption's *style* (a human COCO caption
#: for real photos, a generator prompt or a model caption for generated images) then tells the
#: label, a clue no deployed detector has.
PROVENANCE_MAX_GAP = 0.1


def caption_provenance(label: ArrayLike, source: ArrayLike) -> dict[str, Any]:
    """Caption sources counted per class, and whether they are class-correlated.

    Returns:
        ``{"real": {source: n}, "generated": {source: n}, "max_gap": g,
        "class_correlated": g > PROVENANCE_MAX_GAP}``, where ``g`` is the largest
        ``|share among real − share among generated|`` over the sources (0 when a class is
        absent).
    """
    y = as_binary_label(label)
    src = np.asarray(source, dtype=str)
    out: dict[str, Any] = {}
    shares: dict[str, dict[str, float]] = {}
    for name, cls in (("real", 0), ("generated", 1)):
        values, counts = np.unique(src[y == cls], return_counts=True)
        out[name] = {str(v): int(c) for v, c in zip(values, counts)}
        total = max(1, int(counts.sum()))
        shares[name] = {str(v): int(c) / total for v, c in zip(values, counts)}
    gap = 0.0
    if out["real"] and out["generated"]:
        for s in set(shares["real"]) | set(shares["generated"]):
            gap = max(gap, abs(shares["real"].get(s, 0.0) - shares["generated"].get(s, 0.0)))
    out["max_gap"] = float(gap)
    out["class_correlated"] = bool(gap > PROVENANCE_MAX_GAP)
    return out


def format_counts(counts: dict[str, int]) -> str:
    """`{"a": 3, "b": 1}` as `a 3, b 1` for a log line (`none` when empty)."""
    return ", ".join(f"{key} {n}" for key, n in counts.items()) or "none"


def describe_provenance(provenance: dict[str, Any]) -> str:
    """One readable line for :func:`caption_provenance`'s result."""
    return (
        f"real: {format_counts(provenance['real'])}; "
        f"generated: {format_counts(provenance['generated'])}; "
        f"largest share gap {provenance['max_gap']:.2f}"
    )


def warn_if_correlated(provenance: dict[str, Any], where: str) -> None:
    """Log a loud warning when :func:`caption_provenance` found class-correlated captions."""
    if provenance.get("class_correlated"):
        logger.warning(
            "CAPTION SHORTCUT in %s: caption sources differ between real and generated images "
            "(%s > %.2f). The caption's style then tells the label, which no deployed detector "
            "can rely on; set caption.source=blip2 to caption every image with the same model",
            where,
            describe_provenance(provenance),
            PROVENANCE_MAX_GAP,
        )
