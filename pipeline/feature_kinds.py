"""The feature kinds a head can consume and the features-shard datasets each one concatenates.

Pure Python, so that the params check (pipeline.config) knows the kinds without importing
numpy or h5py; pipeline.features computes them.
"""

from __future__ import annotations

# features.kind -> datasets of a features shard, concatenated in this order.
KINDS: dict[str, tuple[str, ...]] = {
    "item": ("D",),
    "item_global": ("D_global",),
    "item_local": ("D_local",),
    "tidy": ("tidy",),
    "tidy_global": ("tidy_global",),
    # The same with the number of grounded objects as one more column (0 for an image with
    # none: its D_local is then features.empty_local's).
    "item_n_objects": ("D", "n_objects"),
    "tidy_n_objects": ("tidy", "n_objects"),
    "image": ("image",),
    "text": ("text",),
    "image_text": ("image", "text"),
    # The raw CLIP image embedding, as UniversalFakeDetect's linear probe takes it.
    "image_raw": ("image_raw",),
    # Optional encoders (encode.bert / encode.dinov2 / encode.color_bins must be on).
    "bert_image": ("bert_text", "image"),
    # CT2's exact inputs: BERT [CLS] and CLIP's vision output before projection (raw).
    "bert_image_pooled": ("bert_text", "image_pooled"),
    "image_pooled": ("image_pooled",),
    "dinov2": ("dinov2",),
    "image_dinov2": ("image", "dinov2"),
    "color": ("color_hist",),
    "image_color": ("image", "color_hist"),
}
