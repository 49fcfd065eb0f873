"""Feature sets from cached embeddings (ITEM, TIDY, modality ablations) and the user-facing reader.

All formulas are pure numpy on the raw encoder outputs stored by the encode stage:

- ITEM global: ``D_global = I/‖I‖ − T/‖T‖`` (image vs caption).
- ITEM local: ``D_local = mean_i (I_i/‖I_i‖ − T_i/‖T_i‖)`` over grounded objects (crop vs phrase).
- ITEM: ``D = w1·D_global + w2·D_local``.
- TIDY (seed 004, its global-to-local scheme, eqs. 3-6), on raw, unnormalised embeddings:
  ``D_g = |I − T|``, ``D_l = mean_i |I_i − T_i|`` over grounded objects, ``D = w1·D_g + w2·D_l``
  (kind ``tidy``; its global-only ablation is kind ``tidy_global``).
- Ablations: image only (I/‖I‖), text only (T/‖T‖), both concatenated.
- UniversalFakeDetect's probe input: the raw CLIP image embedding (kind ``image_raw``).
- Per-object explanations: ``obj_misalign = 1 − cos(I_i, T_i)`` of each grounded object (crop
  vs phrase, the distance D_local averages), ragged by ``obj_offsets``; no head reads them.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import FeaturesConfig
from pipeline.errors import ConfigError, shown
from pipeline.feature_kinds import KINDS
from pipeline.rows import store
from pipeline.rows.key import params_hash
from pipeline.rows.store import Arrays

logger = logging.getLogger(__name__)

CLASS_PROMPTS = "class_prompts.h5"
# Version of the feature formulas below; recorded in the shards' provenance, which a trained
# head keeps and `misalign predict` compares. Bump it when a formula's output changes.
# 2: `tidy` is TIDY's global + local distance (was its global term, now `tidy_global`).
FEATURES_VERSION = 2
META = ("ids", "label", "generator", "split", "family", "subset")
_PASSTHROUGH = {
    "bert_text_emb": "bert_text",
    "dinov2_emb": "dinov2",
    "color_hist": "color_hist",
    "image_pooled_emb": "image_pooled",
}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def item_global(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    return (l2_normalise(image_emb) - l2_normalise(text_emb)).astype(np.float32)


def item_local(
    obj_image_emb: np.ndarray,
    obj_text_emb: np.ndarray,
    offsets: np.ndarray,
    fallback: np.ndarray,
) -> np.ndarray:
    """Per-image mean of object differences; rows without objects take `fallback`'s row."""
    diff = l2_normalise(obj_image_emb) - l2_normalise(obj_text_emb)
    return _mean_per_image(diff, offsets, fallback)


def object_misalignment(obj_image_emb: np.ndarray, obj_text_emb: np.ndarray) -> np.ndarray:
    """Each grounded object's misalignment, ``1 − cos(I_i, T_i)`` between the embeddings of
    its crop and of its phrase (0: aligned, 2: opposite); shape (M,)."""
    cos = np.sum(l2_normalise(obj_image_emb) * l2_normalise(obj_text_emb), axis=-1)
    return (1.0 - cos).astype(np.float32)


def most_misaligned(
    offsets: np.ndarray, misalign: np.ndarray, phrases: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Per image, the phrase and misalignment of its most misaligned object ("" and NaN for
    an image without objects)."""
    top_phrase, top_score = [], np.full(len(offsets) - 1, np.nan, dtype=np.float32)
    for i in range(len(offsets) - 1):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        if hi == lo:
            top_phrase.append("")
            continue
        k = lo + int(np.argmax(misalign[lo:hi]))
        top_phrase.append(str(phrases[k]))
        top_score[i] = misalign[k]
    return top_phrase, top_score


def _mean_per_image(diff: np.ndarray, offsets: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Mean of each image's object rows of `diff` (`offsets` delimit them); `fallback`'s row
    for an image without objects."""
    counts = np.diff(offsets)
    sums = np.zeros_like(fallback, dtype=np.float64)
    owner = np.repeat(np.arange(len(counts)), counts)
    np.add.at(sums, owner, diff)
    out = fallback.astype(np.float64).copy()
    has = counts > 0
    out[has] = sums[has] / counts[has, None]
    return out.astype(np.float32)


def tidy(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """TIDY's global distance ``D_g = |I − T|`` (its eq. 3), on raw CLIP embeddings."""
    return np.abs(image_emb - text_emb).astype(np.float32)


def tidy_local(
    obj_image_emb: np.ndarray,
    obj_text_emb: np.ndarray,
    offsets: np.ndarray,
    fallback: np.ndarray,
) -> np.ndarray:
    """TIDY's local distance ``D_l = (1/n) Σ_i |I_i − T_i|`` (its eqs. 4-5): per image, the
    mean over its n grounded objects of the absolute difference between the raw CLIP
    embeddings of the object's crop and of its phrase. Rows without objects take
    `fallback`'s row (`features.empty_local`: zeros, or the global distance)."""
    return _mean_per_image(np.abs(obj_image_emb - obj_text_emb), offsets, fallback)


def tidy_features(clip: Arrays, cfg: FeaturesConfig) -> tuple[np.ndarray, np.ndarray]:
    """TIDY's global distance and its global-to-local distance ``D = w1·D_g + w2·D_l``
    (eq. 6; the paper sets w1 = w2 = 1, the weights ITEM shares: `features.w1`/`w2`)."""
    d_global = tidy(clip["image_emb"], clip["text_emb"])
    offsets = np.asarray(clip["obj_offsets"], dtype=np.int64)
    fallback = d_global if cfg.empty_local == "global" else np.zeros_like(d_global)
    d_local = tidy_local(clip["obj_image_emb"], clip["obj_text_emb"], offsets, fallback)
    return d_global, (cfg.w1 * d_global + cfg.w2 * d_local).astype(np.float32)


# The datasets of an encode shard that every feature kind reads.
CLIP_KEYS = ("image_emb", "text_emb", "obj_image_emb", "obj_text_emb", "obj_offsets")


def compute_features(clip: Arrays, cfg: FeaturesConfig) -> Arrays:
    """Every feature set of one shard, from its encode-stage arrays."""
    d_global = item_global(clip["image_emb"], clip["text_emb"])
    offsets = np.asarray(clip["obj_offsets"], dtype=np.int64)
    fallback = d_global if cfg.empty_local == "global" else np.zeros_like(d_global)
    d_local = item_local(clip["obj_image_emb"], clip["obj_text_emb"], offsets, fallback)
    tidy_global, tidy_both = tidy_features(clip, cfg)
    out: Arrays = {
        "D_global": d_global,
        "D_local": d_local,
        "D": (cfg.w1 * d_global + cfg.w2 * d_local).astype(np.float32),
        "tidy": tidy_both,
        "tidy_global": tidy_global,
        "image_raw": np.asarray(clip["image_emb"], dtype=np.float32),
        "image": l2_normalise(clip["image_emb"]).astype(np.float32),
        "text": l2_normalise(clip["text_emb"]).astype(np.float32),
        "n_objects": np.diff(offsets).astype(np.int32),
        store.OFFSETS: offsets,
        "obj_misalign": object_misalignment(clip["obj_image_emb"], clip["obj_text_emb"]),
    }
    for source, name in _PASSTHROUGH.items():
        if source in clip:
            out[name] = np.asarray(clip[source], dtype=np.float32)
    return out


def run_features(
    ingest_dir: Path,
    clip_dir: Path,
    out_dir: Path,
    cfg: FeaturesConfig,
    dataset: str,
    captions_dir: Path | None = None,
) -> int:
    """Write one features shard per encode shard. Returns the number of images.

    With `captions_dir`, each row also keeps its `caption_source` (who wrote its caption), so
    that evaluation can count caption provenance per class on the rows it scores.
    """
    if cfg.kind not in KINDS:
        raise ConfigError(
            f"features.kind={shown(cfg.kind)} is unknown; choose one of {sorted(KINDS)}"
        )
    out_dir = Path(out_dir)
    store.check_aligned(clip_dir, ingest_dir)
    clip_shards = store.list_shards(clip_dir)
    if not clip_shards:
        raise store.ShardError(f"no encode shards in {clip_dir}; run the encode stage first")
    clip_attrs = store.dataset_attrs(clip_dir)  # refuses shards of different runs
    chain = json.loads(str(clip_attrs.get("provenance") or "{}"))
    fparams = params_hash(cfg, clip_attrs.get("params_hash", ""))
    chain.update(planned_feature_provenance(cfg))
    total = 0
    for i, path in enumerate(clip_shards):
        clip = store.read_shard(path)
        # Checked here too for shards written before checksums, whose loss read_shard cannot see.
        lost = [k for k in CLIP_KEYS if k not in clip]
        if lost:
            raise store.ShardError(f"shard {path} has no dataset {lost[0]!r}; {store.REBUILD}")
        meta = store.read_shard(Path(ingest_dir) / store.shard_name(i), list(META))
        if captions_dir is not None:
            caps = store.read_shard(
                Path(captions_dir) / store.shard_name(i), ["ids", "caption_source"]
            )
            if not np.array_equal(caps["ids"], meta["ids"]):
                raise store.ShardError(
                    f"{captions_dir} is not row-aligned with {ingest_dir}; rerun the caption stage"
                )
            meta["caption_source"] = caps["caption_source"]
        feats = compute_features(clip, cfg)
        missing = [k for k in KINDS[cfg.kind] if k not in feats]
        if missing:
            raise ConfigError(
                f"features.kind={shown(cfg.kind)} needs {missing}, which the encode stage did not "
                "store; turn on encode.bert / encode.dinov2 / encode.color_bins / "
                "encode.clip_pooled"
            )
        store.write_shard(
            out_dir / store.shard_name(i),
            {**meta, **feats},
            {
                "stage": "features",
                "dataset": dataset,
                "model": clip_attrs.get("model", ""),
                "preset": clip_attrs.get("preset", ""),
                "dtype": clip_attrs.get("dtype", ""),
                "device_class": clip_attrs.get("device_class", ""),
                "step_version": FEATURES_VERSION,
                "provenance": json.dumps(chain, sort_keys=True),
                "params_hash": fparams,
                "kind": cfg.kind,
            },
        )
        total += len(meta["ids"])
    for stale in store.list_shards(out_dir)[len(clip_shards) :]:
        stale.unlink()
    prompts = Path(clip_dir) / CLASS_PROMPTS
    if prompts.exists():
        # Heads with a zero-shot term (Tip-Adapter) read the class prompts next to the features.
        shutil.copyfile(prompts, out_dir / CLASS_PROMPTS)
    logger.info("features: %d images in %d shards -> %s", total, len(clip_shards), out_dir)
    return total


def planned_feature_provenance(cfg: FeaturesConfig) -> dict[str, Any]:
    """The features stage's entry of the provenance chain for `cfg`."""
    # features.kind only picks what heads read; every kind is in the shards.
    shaping = {k: v for k, v in asdict(cfg).items() if k != "kind"}
    return {"features": {"step_version": FEATURES_VERSION, "params_hash": params_hash(shaping)}}


def feature_settings(features_dir: str | Path) -> dict[str, Any]:
    """What made a features folder, stage by stage (weights, dtype, device class, step
    versions, feature params): a trained head keeps it, `misalign predict` compares it."""
    attrs = store.dataset_attrs(features_dir)
    return {
        "preset": attrs.get("preset", ""),
        "provenance": json.loads(str(attrs.get("provenance") or "{}")),
    }


# Compared between a head's training features and the features `predict` builds. The device
# class is not: a head trained on GPU features serves CPU ones of the same dtype.
_COMPARED = ("model", "dtype", "step_version", "params_hash")


def settings_differences(trained: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`stage.field: trained with X, these features Y` for every difference that matters."""
    out = []
    if trained.get("preset") != now.get("preset"):
        out.append(
            f"models.preset: trained with {shown(trained.get('preset'))}, now {shown(now.get('preset'))}"
        )
    a, b = trained.get("provenance", {}), now.get("provenance", {})
    for stage in sorted(set(a) | set(b)):
        for key in _COMPARED:
            x, y = a.get(stage, {}).get(key), b.get(stage, {}).get(key)
            if x != y:
                out.append(f"{stage}.{key}: trained with {shown(x)}, these features {shown(y)}")
    return out


@dataclass
class FeatureSet:
    """Features of one dataset and kind, with per-row metadata."""

    X: np.ndarray
    y: np.ndarray  # 0 real, 1 generated
    ids: np.ndarray
    generator: np.ndarray
    split: np.ndarray
    family: np.ndarray
    subset: np.ndarray  # dataset folder of each row ("" when the dataset has none)

    def take(self, mask: np.ndarray) -> FeatureSet:
        """Rows where `mask` holds; a contiguous run of rows is a view, not a copy."""
        index = np.flatnonzero(mask)
        if len(index) and index[-1] - index[0] + 1 == len(index):
            rows: Any = slice(int(index[0]), int(index[-1]) + 1)
        else:
            rows = index
        return FeatureSet(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    def where(self, split: str) -> FeatureSet:
        return self.take(self.split == split)


def load_features(
    features_dir: str | Path, kind: str = "item", splits: tuple[str, ...] | None = None
) -> FeatureSet:
    """Read `X`, `y` and per-row metadata straight from the features shards.

    Only the datasets the kind needs are read. Example::

        from pipeline.features import load_features
        fs = load_features("cache/sample/features", kind="item")
        train = fs.where("train")   # train.X, train.y, train.generator, ...
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown feature kind {shown(kind)}; choose one of {sorted(KINDS)}")
    shards = store.list_shards(features_dir)
    if not shards:
        raise store.ShardError(f"no feature shards in {features_dir}; run `dvc repro` first")
    store.dataset_attrs(features_dir)  # refuses shards of different runs
    # Metadata first (small), then X written straight into one float32 matrix: no per-shard
    # blocks concatenated, no float64 copy, no full matrix subset afterwards.
    metas = [store.read_shard(path, list(META)) for path in shards]
    keeps = [
        np.isin(m["split"], splits) if splits is not None else np.ones(len(m["ids"]), bool)
        for m in metas
    ]
    meta = {k: np.concatenate([m[k][keep] for m, keep in zip(metas, keeps)]) for k in META}
    n = len(meta["ids"])
    # With `splits`, rows are grouped by split in that order (file order within a split), so
    # that `where(split)` is a view of X.
    order = (
        np.concatenate([np.flatnonzero(meta["split"] == s) for s in dict.fromkeys(splits)])
        if splits is not None
        else np.arange(n)
    )
    dest = np.empty(n, np.int64)
    dest[order] = np.arange(n)
    X: np.ndarray | None = None
    start = 0
    for path, keep in zip(shards, keeps):
        data = store.read_shard(path, list(KINDS[kind]))
        blocks = [np.asarray(data[k]).reshape(len(keep), -1)[keep] for k in KINDS[kind]]
        if X is None:
            X = np.empty((n, sum(b.shape[1] for b in blocks)), np.float32)
        rows = dest[start : start + int(keep.sum())]
        col = 0
        for b in blocks:
            X[rows, col : col + b.shape[1]] = b
            col += b.shape[1]
        start += len(rows)
    assert X is not None
    return FeatureSet(
        X=X,
        y=meta["label"][order].astype(np.int64),
        ids=meta["ids"][order],
        generator=meta["generator"][order],
        split=meta["split"][order],
        family=meta["family"][order],
        subset=meta["subset"][order],
    )


def concat_features(sets: Sequence[FeatureSet]) -> FeatureSet:
    """The union of the rows of several feature sets of one kind (several datasets trained
    on at once), in the given order; rows of each split stay grouped by split."""
    if not sets:
        raise ValueError("concat_features needs at least one feature set")
    widths = {fs.X.shape[1] for fs in sets}
    if len(widths) > 1:
        raise ConfigError(
            f"the feature sets have different widths {sorted(widths)}; train on datasets "
            "encoded with the same model and features kind"
        )
    if len(sets) == 1:
        return sets[0]
    fields = FeatureSet.__dataclass_fields__
    return FeatureSet(*(np.concatenate([getattr(fs, f) for fs in sets]) for f in fields))


def load_feature_union(
    features_dirs: Sequence[str | Path], kind: str = "item", splits: tuple[str, ...] | None = None
) -> FeatureSet:
    """`load_features` of each folder, their rows joined (`concat_features`); rows are grouped
    by split across folders, so that `where(split)` takes each split's rows of every folder.
    The folders must have been made with the same models (`check_same_models`)."""
    check_same_models(features_dirs)
    parts = [load_features(d, kind, splits=splits) for d in features_dirs]
    if splits is None or len(parts) == 1:
        return concat_features(parts)
    return concat_features([p.where(s) for s in dict.fromkeys(splits) for p in parts])


def check_same_models(features_dirs: Sequence[str | Path]) -> None:
    """Refuse folders whose features come from different models, dtypes or step versions:
    their rows would not be comparable (params hashes may differ: they name the dataset)."""
    first = feature_settings(features_dirs[0])
    for other in features_dirs[1:]:
        diff = [
            d
            for d in settings_differences(first, feature_settings(other))
            if ".params_hash:" not in d
        ]
        if diff:
            raise ConfigError(
                f"{features_dirs[0]} and {other} were made differently ({'; '.join(diff)}); "
                "train on several datasets only with features of the same models and settings"
            )


def object_explanations(
    features_dir: str | Path, objects_dir: str | Path
) -> dict[str, tuple[str, float]]:
    """id -> (phrase, misalignment) of each image's most misaligned grounded object, from the
    features shards' `obj_misalign` and the row-aligned objects shards' phrases (("", NaN) for
    an image without objects)."""
    out: dict[str, tuple[str, float]] = {}
    for path in store.list_shards(features_dir):
        feats = store.read_shard(path, ["ids", store.OFFSETS, "obj_misalign"])
        objs = store.read_shard(Path(objects_dir) / path.name, ["ids", store.OFFSETS, "obj_phrase"])
        if not (
            np.array_equal(feats["ids"], objs["ids"])
            and np.array_equal(feats[store.OFFSETS], objs[store.OFFSETS])
        ):
            raise store.ShardError(
                f"{objects_dir} is not row-aligned with {features_dir}; rerun the stages in order"
            )
        phrases, scores = most_misaligned(
            feats[store.OFFSETS], feats["obj_misalign"], objs["obj_phrase"]
        )
        out.update(zip((str(i) for i in feats["ids"]), zip(phrases, scores.tolist())))
    return out


def caption_provenance_of(features_dir: str | Path, split: str | None) -> dict[str, Any] | None:
    """Caption sources per class of the rows of `split` ("all" or None: every row), from the
    features shards (`caption_sources.caption_provenance`); None when the shards do not record them."""
    from pipeline.evaluation.caption_sources import caption_provenance

    labels, sources = [], []
    for path in store.list_shards(features_dir):
        try:
            data = store.read_shard(path, ["label", "split", "caption_source"])
        except store.ShardError:
            return None
        keep = (
            np.ones(len(data["label"]), bool) if split in (None, "all") else data["split"] == split
        )
        labels.append(data["label"][keep])
        sources.append(data["caption_source"][keep])
    if not labels:
        return None
    return caption_provenance(np.concatenate(labels), np.concatenate(sources))


def color_histograms(image: Any, bins: int) -> np.ndarray:
    """Normalised per-channel histograms in RGB, HSV and YCbCr (9 × bins values)."""
    hists = []
    for mode in ("RGB", "HSV", "YCbCr"):
        arr = np.asarray(image.convert(mode))
        for c in range(3):
            h, _ = np.histogram(arr[..., c], bins=bins, range=(0, 256))
            hists.append(h / max(1, h.sum()))
    return np.concatenate(hists).astype(np.float32)
