"""A small report run written without any model: metrics, scores, features, ingest, captions
and objects folders as the stages lay them out, for the report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.evaluation.metrics import Scores, evaluate_scores
from pipeline.evaluation.shortcut import shortcut_audit
from pipeline.report import build_report
from pipeline.rows import store
from pipeline.rows.atomic import write_json_atomic
from tests.helpers import make_image

EVIL_CAPTION = '<script>alert("caption")</script> a dog & a "cat"'
EVIL_PHRASE = "<b>café ☕</b>"

# 12 images, real and generated alternating (so any prefix holds both): 6 real, 6 from three
# generators; 8 in test (4 real, 4 generated, every generator), 4 in train.
GENERATORS = ["real", "sd14", "real", "midjourney", "real", "dalle2"] * 2
SPLITS = ["test"] * 8 + ["train"] * 4


def make_run(
    root: Path,
    preset: str = "tiny",
    n_images: int = 12,
    first_phrase: str = EVIL_PHRASE,
    explained: bool = True,
) -> dict[str, Path]:
    """Every input of the report for `n_images` small images, as the pipeline writes them."""
    data = root / "data"
    dirs = {
        name: root / "cache" / name
        for name in ("ingest", "captions", "objects", "features", "scores")
    }
    dirs["metrics"] = root / "metrics"
    label = np.array([0 if g == "real" else 1 for g in GENERATORS[:n_images]], dtype=np.int8)
    generator = np.array(GENERATORS[:n_images], dtype=object)
    split = np.array(SPLITS[:n_images], dtype=object)
    ids = np.array([f"{k:064x}" for k in range(n_images)], dtype=object)
    paths = []
    for k in range(n_images):
        size = (64, 48) if k % 2 else (40, 80)
        make_image(data / generator[k] / f"img_{k}.png", seed=k, size=size)
        paths.append(f"{generator[k]}/img_{k}.png")
    rng = np.random.default_rng(0)
    # Object k of image i: image 0 gets the hostile phrase, odd images none, a reversed box.
    counts = np.array([2 if i % 2 == 0 else 0 for i in range(n_images)])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_obj = int(offsets[-1])
    boxes = np.tile(np.array([[4.0, 6.0, 30.0, 40.0], [35.0, 70.0, 2.0, 20.0]]), (n_obj // 2, 1))
    phrases = np.array([first_phrase if j == 0 else f"thing {j}" for j in range(n_obj)], object)
    captions = np.array(
        [EVIL_CAPTION if i == 0 else f"caption of image {i}" for i in range(n_images)], object
    )
    features = rng.normal(size=(n_images, 8)).astype(np.float32) + label[:, None] * 2.0
    # per-object misalignment, not in grounding order (the gallery sorts it)
    misalign = np.linspace(0.55, 0.95, n_obj)[::-1][np.argsort(np.arange(n_obj) % 3)]
    half = (n_images + 1) // 2
    for s, rows in enumerate((slice(0, half), slice(half, n_images))):
        base = {"ids": ids[rows]}
        ingest = {**base, "path": np.array(paths, object)[rows], "label": label[rows]}
        ingest |= {"generator": generator[rows], "split": split[rows]}
        common = {"dataset": "fixture", "model": "", "preset": preset}
        name = store.shard_name(s)
        store.write_shard(
            dirs["ingest"] / name,
            ingest,
            {**common, "stage": "ingest", "preset": "", "data_root": str(data)},
        )
        sources = np.array(["dataset"] * len(base["ids"]), dtype=object)
        store.write_shard(
            dirs["captions"] / name,
            {**base, "caption": captions[rows], "caption_source": sources},
            {**common, "stage": "captions"},
        )
        lo, hi = offsets[rows.start], offsets[rows.stop]
        store.write_shard(
            dirs["objects"] / name,
            {
                **base,
                "obj_offsets": offsets[rows.start : rows.stop + 1] - lo,
                "obj_boxes": boxes[lo:hi],
                "obj_phrase": phrases[lo:hi],
                "obj_score": np.linspace(0.3, 0.9, n_obj)[lo:hi],
            },
            {**common, "stage": "objects"},
        )
        store.write_shard(
            dirs["features"] / name,
            {
                **base,
                "label": label[rows],
                "generator": generator[rows],
                "split": split[rows],
                "family": generator[rows],
                "subset": np.full(len(ids[rows]), "", dtype=object),
                "D": features[rows],
                **(
                    {
                        "obj_offsets": offsets[rows.start : rows.stop + 1] - lo,
                        "obj_misalign": misalign[lo:hi].astype(np.float32),
                    }
                    if explained
                    else {}
                ),
            },
            {**common, "stage": "features"},
        )
        store.write_shard(
            root / "cache" / "clip" / name,
            {**base, "image_emb": features[rows]},
            {**common, "stage": "clip", "model": "tiny-clip"},
        )
    test = split == "test"
    p = 1 / (1 + np.exp(-(features[:, 0] - 1.0)))
    true_class = np.where(label == 1, generator, "real")
    pred_class = true_class.copy()
    pred_class[:2] = true_class[2:4][::-1]  # a couple of mistakes
    heads = {
        "mlp": Scores(ids, label, generator, split, p),
        "multitask": Scores(ids, label, generator, split, p[::-1].copy(), pred_class),
    }
    metrics = {}
    for head, scores in heads.items():
        scores = scores.take(test)
        scores.to_csv(dirs["scores"] / f"{head}.csv")
        metrics[head] = evaluate_scores(scores)
    write_json_atomic(dirs["metrics"] / "eval.json", metrics)
    heads_auc = {h: m["overall"]["auc"] for h, m in metrics.items()}
    audit = shortcut_audit(dirs["ingest"], head_auc=heads_auc)
    write_json_atomic(dirs["metrics"] / "shortcut.json", audit)
    for name, shift in (("noise_0.005", 0.9), ("jpeg_75", 0.8), ("jpeg_50", 0.6)):
        degraded = {h: _scaled(m, shift) for h, m in metrics.items()}
        write_json_atomic(dirs["metrics"] / f"eval_{name}.json", degraded)
    write_json_atomic(dirs["metrics"] / "eval_other_ds.json", {"mlp": _scaled(metrics["mlp"], 0.5)})
    qf = {
        h: {
            tr: {te: {"acc": 0.5 + 0.004 * float(te), "ap": None} for te in ("50", "75", "95")}
            for tr in ("raw", "75")
        }
        for h in metrics
    }
    write_json_atomic(dirs["metrics"] / "qf_matrix.json", qf)
    return dirs


def _scaled(block: dict[str, Any], factor: float) -> dict[str, Any]:
    out = {"overall": dict(block["overall"]), "per_generator": {}}
    for key in ("acc", "ap"):
        value = block["overall"][key]
        out["overall"][key] = None if value is None else value * factor
    return out


def build(dirs: dict[str, Path], out: Path, **kwargs: Any) -> Path:
    return build_report(
        out,
        metrics_dir=dirs["metrics"],
        scores_dir=dirs["scores"],
        features_dir=dirs["features"],
        ingest_dir=dirs["ingest"],
        captions_dir=dirs["captions"],
        objects_dir=dirs["objects"],
        **kwargs,
    )
