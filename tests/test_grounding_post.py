"""GroundingDINO post-processing, vectorised, gives the boxes and phrases of a per-box loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.grounding import GroundedObject, GroundingDinoGrounder, merge_duplicates


@pytest.fixture(scope="module")
def grounder():
    return GroundingDinoGrounder.load(preset="tiny", device="cpu", dtype="float32", seed=0)


def _per_box(g, probs, ids, mask, boxes, scores, size, text_threshold, min_side, query):
    """The straightforward reading: each box, each token, one at a time."""
    tok = g.processor.tokenizer
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(".")}
    owner, words = g._token_words(ids, mask, query)
    height, width = size
    out = []
    for prob, box, score in zip(probs, boxes.tolist(), scores.tolist()):
        chosen = sorted(
            {
                owner[t]
                for t in range(len(ids))
                if bool(mask[t]) and int(ids[t]) not in special and prob[t] > text_threshold
            }
        )
        phrase = " ".join(words[k] for k in chosen if k >= 0).strip()
        x0, x1 = (float(min(max(v, 0.0), width)) for v in (box[0], box[2]))
        y0, y1 = (float(min(max(v, 0.0), height)) for v in (box[1], box[3]))
        if phrase and x1 > x0 and y1 > y0 and min(x1 - x0, y1 - y0) >= min_side:
            out.append(GroundedObject((x0, y0, x1, y1), phrase, min(max(score, 0.0), 1.0)))
    out.sort(key=lambda o: o.score, reverse=True)
    return merge_duplicates(out, 0.8)


@pytest.mark.parametrize("query", ["a red car next to a tree and a man on a bicycle.", "dog."])
def test_vectorised_objects_equal_the_per_box_loop(grounder, query):
    enc = grounder.processor.tokenizer(query, return_tensors="pt")
    n = 32
    ids = torch.zeros(n, dtype=torch.long)
    mask = torch.zeros(n, dtype=torch.long)
    length = enc["input_ids"].shape[1]
    ids[:length], mask[:length] = enc["input_ids"][0], 1
    rng = np.random.default_rng(0)
    n_boxes, size = 300, (240, 320)
    probs = torch.tensor(rng.uniform(0, 1, (n_boxes, n)), dtype=torch.float32)
    corners = rng.uniform(-40, 360, (n_boxes, 4)).astype(np.float32)
    boxes = torch.tensor(
        np.concatenate([corners[:, :2], corners[:, :2] + np.abs(corners[:, 2:]) / 3], 1)
    )
    scores = probs.max(dim=-1).values
    got = grounder._objects(
        {"scores": scores, "boxes": boxes},
        probs,
        ids,
        mask,
        size,
        0.0,
        0.7,
        1000,
        query=query,
        iou_threshold=0.8,
        min_box_side=8.0,
    )
    expected = _per_box(grounder, probs, ids, mask, boxes, scores, size, 0.7, 8.0, query)
    assert len(expected) > 20
    assert got == expected
