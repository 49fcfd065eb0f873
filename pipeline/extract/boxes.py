"""Per-phrase non-maximum suppression of grounded boxes, as GLIP's post-processing does.

GLIP (ITEM's grounder) ends its inference with non-maximum suppression per label at IoU 0.6
(`MODEL.ATSS.NMS_TH`), a label being one phrase of the caption: of two boxes of one phrase that
overlap by more than 0.6 IoU, only the higher-scoring one is kept (torchvision's `nms`
convention: IoU strictly above the threshold suppresses). ITEM's D_local averages over the
objects, so a phrase found ten times over would weigh ten times. GroundingDINO's own demo keeps
every box; the ground step applies this after the grounder's post-processing
(`ground.nms_iou`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np


class _Box(Protocol):
    @property
    def box(self) -> tuple[float, float, float, float]: ...
    @property
    def phrase(self) -> str: ...
    @property
    def score(self) -> float: ...


B = TypeVar("B", bound=_Box)


def _iou(one: np.ndarray, many: np.ndarray) -> np.ndarray:
    """IoU of the xyxy box `one` with each row of `many`."""
    w = np.clip(np.minimum(one[2], many[:, 2]) - np.maximum(one[0], many[:, 0]), 0, None)
    h = np.clip(np.minimum(one[3], many[:, 3]) - np.maximum(one[1], many[:, 1]), 0, None)
    inter = w * h
    area = (one[2] - one[0]) * (one[3] - one[1])
    areas = (many[:, 2] - many[:, 0]) * (many[:, 3] - many[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def phrase_nms(objects: Sequence[B], iou: float) -> list[B]:
    """The objects kept by greedy non-maximum suppression within each phrase: highest score
    first (ties in the given order), a box is dropped when its IoU with a kept box of the same
    phrase exceeds `iou`. Boxes of different phrases never suppress each other; `iou=1` keeps
    every box. The kept objects stay in their given order."""
    if iou >= 1.0 or len(objects) < 2:
        return list(objects)
    by_phrase: dict[str, list[int]] = defaultdict(list)
    for i, obj in enumerate(objects):
        by_phrase[obj.phrase].append(i)
    keep: set[int] = set()
    for members in by_phrase.values():
        order = sorted(members, key=lambda i: (-objects[i].score, i))
        boxes = np.array([objects[i].box for i in order], dtype=np.float64)
        alive = np.ones(len(order), bool)
        for k in range(len(order)):
            if not alive[k]:
                continue
            keep.add(order[k])
            later = np.arange(k + 1, len(order))
            alive[later[_iou(boxes[k], boxes[k + 1 :]) > iou]] = False
    return [obj for i, obj in enumerate(objects) if i in keep]
