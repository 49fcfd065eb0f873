"""The report's gallery: a seeded choice of images, each a card with its thumbnail, grounded
boxes coloured by their misalignment, caption, objects (most misaligned first) and scores."""

from __future__ import annotations

import base64
import functools
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.images import load_rgb
from pipeline.errors import DatasetError
from pipeline.evaluation.metrics import Scores
from pipeline.report.markup import esc, img, note, table
from pipeline.rows import store

logger = logging.getLogger(__name__)


#: Longer side of gallery thumbnails, in pixels.
THUMB_SIZE = 320


_BOX_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6")
# Misalignment colour scale, from the dataset's least (blue) to its most misaligned object (red).
_SCALE = ((0x2C, 0x7B, 0xB6), (0xAB, 0xD9, 0xE9), (0xFD, 0xAE, 0x61), (0xD7, 0x19, 0x1C))


# Fonts tried, in order, for labels drawn into thumbnails (object phrases may be CJK); the first
# installed one that covers every character of a label is used.
_LABEL_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK KR",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "DejaVu Sans",
)


def _jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_stage(directory: Path, reference: Path, keys: Sequence[str]) -> store.Arrays | None:
    """All rows of a stage folder, checked row-aligned with `reference`; None when absent."""
    shards = store.list_shards(directory)
    if not shards:
        return None
    store.check_aligned(directory, reference)
    return store.concat_rows([store.read_shard(p, ["ids", *keys]) for p in shards])


class _Explained(NamedTuple):
    """Per-object misalignment (`features` shards' `obj_misalign`) and its range in the data."""

    offsets: np.ndarray
    misalign: np.ndarray
    lo: float
    hi: float


def misalign_colour(score: float, lo: float, hi: float) -> str:
    """`score`'s colour on the scale from `lo` (blue) to `hi` (red), as #rrggbb."""
    t = 0.5 if hi <= lo else min(max((score - lo) / (hi - lo), 0.0), 1.0)
    x = t * (len(_SCALE) - 1)
    k = min(int(x), len(_SCALE) - 2)
    a, b = _SCALE[k], _SCALE[k + 1]
    rgb = (round(u + (v - u) * (x - k)) for u, v in zip(a, b))
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _read_explained(features_dir: Path | None, ingest_dir: Path) -> _Explained | None:
    """The features shards' per-object misalignment; None when absent (older features)."""
    if features_dir is None:
        return None
    try:
        rows = _read_stage(features_dir, ingest_dir, [store.OFFSETS, "obj_misalign"])
    except store.ShardError as err:
        logger.info("report: no per-object misalignment in %s (%s)", features_dir, err)
        return None
    if rows is None:
        return None
    values = np.asarray(rows["obj_misalign"], dtype=np.float64)
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
    return _Explained(np.asarray(rows[store.OFFSETS]), values, lo, hi)


def gallery_section(
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    *,
    scores: dict[str, Scores],
    n_gallery: int,
    seed: int,
    features_dir: Path | None = None,
) -> str:
    shards = store.list_shards(ingest_dir)
    if not shards:
        return note(f"no ingest shards in {ingest_dir}: run the ingest stage for a gallery")
    if n_gallery == 0:
        return note("n_gallery=0: no gallery")
    blocks = []
    for path in shards:
        rows = store.read_shard(path, ["ids", "path", "label", "generator", "split"])
        root = Path(str(store.read_attrs(path).get("data_root", "")))
        rows["path"] = np.array([str(root / p) for p in rows["path"]], dtype=object)
        blocks.append(rows)
    ingest = store.concat_rows(blocks)
    captions = _read_stage(captions_dir, ingest_dir, ["caption", "caption_source"])
    objects = _read_stage(
        objects_dir, ingest_dir, [store.OFFSETS, "obj_boxes", "obj_phrase", "obj_score"]
    )
    explained = _read_explained(features_dir, ingest_dir) if objects is not None else None
    if explained is not None and objects is not None:
        if not np.array_equal(explained.offsets, objects[store.OFFSETS]):
            logger.warning("report: %s and %s disagree on objects", features_dir, objects_dir)
            explained = None
    chosen = _pick_gallery(ingest["label"], ingest["split"], ingest["generator"], n_gallery, seed)
    lookup = {head: {str(i): k for k, i in enumerate(s.ids)} for head, s in scores.items()}
    cards = []
    for i in chosen:
        cards.append(
            _card(
                i,
                ingest=ingest,
                captions=captions,
                objects=objects,
                explained=explained,
                scores=scores,
                lookup=lookup,
            )
        )
    parts = []
    notes = []
    if captions is None:
        notes.append(f"no caption shards in {captions_dir}")
    if objects is None:
        notes.append(f"no object shards in {objects_dir}")
    if notes:
        parts.append(note("; ".join(notes)))
    intro = (
        f"<p>{len(chosen)} of {len(ingest['ids'])} images, chosen with seed {seed} "
        "(test split first, real and generated mixed, spread over generators). Boxes are the "
        "grounded objects of the caption"
    )
    if explained is None:
        intro += ", with their phrase and grounding score.</p>"
    else:
        swatches = "".join(
            f'<span class="swatch" style="background:{misalign_colour(v, 0.0, 1.0)}"></span>'
            for v in np.linspace(0.0, 1.0, 5)
        )
        intro += (
            ", each with its phrase and misalignment, 1 − cos(crop, phrase) of their CLIP "
            "embeddings, and coloured by it from the least misaligned object of the dataset "
            f"({explained.lo:.3f}, blue) to the most ({explained.hi:.3f}, red) {swatches}; each "
            "card lists its objects from the most misaligned.</p>"
        )
    parts.append(intro)
    parts.append('<div class="gallery">\n' + "\n".join(cards) + "\n</div>")
    return "\n".join(parts)


def _pick_gallery(
    label: np.ndarray, split: np.ndarray, generator: np.ndarray, n: int, seed: int
) -> list[int]:
    """Row indices of a seeded gallery: half real and half generated (filled from the other
    class when one runs short), test split first, generated images spread over generators."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(label))
    is_test = np.asarray(split)[order] == "test"
    order = np.concatenate([order[is_test], order[~is_test]])
    real = [int(i) for i in order if label[i] == 0]
    test_gen = [int(i) for i in order if label[i] == 1 and split[i] == "test"]
    rest_gen = [int(i) for i in order if label[i] == 1 and split[i] != "test"]
    gen = _round_robin(test_gen, generator) + _round_robin(rest_gen, generator)
    n_gen = min(len(gen), n - min(len(real), n // 2))
    n_real = min(len(real), n - n_gen)
    picked_real, picked_gen = real[:n_real], gen[:n_gen]
    out = []
    for k in range(max(n_real, n_gen)):
        out += picked_real[k : k + 1] + picked_gen[k : k + 1]
    return out


def _round_robin(rows: list[int], generator: np.ndarray) -> list[int]:
    queues: dict[str, list[int]] = {}
    for i in rows:
        queues.setdefault(str(generator[i]), []).append(i)
    out: list[int] = []
    while queues:
        for name in list(queues):
            out.append(queues[name].pop(0))
            if not queues[name]:
                del queues[name]
    return out


def _card(
    i: int,
    *,
    ingest: store.Arrays,
    captions: store.Arrays | None,
    objects: store.Arrays | None,
    explained: _Explained | None,
    scores: dict[str, Scores],
    lookup: dict[str, dict[str, int]],
) -> str:
    path = str(ingest["path"][i])
    boxes, phrases, obj_scores = np.zeros((0, 4)), np.array([], dtype=object), np.zeros(0)
    misalign: np.ndarray | None = None
    colours: list[str] = []
    if objects is not None:
        lo, hi = int(objects[store.OFFSETS][i]), int(objects[store.OFFSETS][i + 1])
        boxes = objects["obj_boxes"][lo:hi]
        phrases, obj_scores = objects["obj_phrase"][lo:hi], objects["obj_score"][lo:hi]
        if explained is not None:
            # Most misaligned first, in the list and in the labels' numbers.
            misalign = explained.misalign[lo:hi]
            order = np.argsort(-misalign, kind="stable")
            boxes, phrases, obj_scores = boxes[order], phrases[order], obj_scores[order]
            misalign = misalign[order]
            colours = [misalign_colour(float(m), explained.lo, explained.hi) for m in misalign]
    shown = obj_scores if misalign is None else misalign
    labels = [_box_label(k, str(p), float(s)) for k, (p, s) in enumerate(zip(phrases, shown))]
    try:
        thumb = _thumbnail(load_rgb(path), boxes, labels, colours)
        picture = img(_jpeg_uri(thumb), f"image {Path(path).name}", cls="thumb")
    except (OSError, DatasetError) as err:  # a file gone or no longer decodable
        logger.warning("report: cannot show %s in the gallery: %s", path, err)
        picture = f'<div class="missing">cannot open {esc(path)}: {esc(err)}</div>'
    generated = int(ingest["label"][i]) == 1
    tag = (
        f'<span class="tag generated">generated · {esc(ingest["generator"][i])}</span>'
        if generated
        else '<span class="tag real">real</span>'
    )
    lines = [
        f"<p>{tag} <span class='meta'>split {esc(ingest['split'][i])}</span></p>",
        f'<p class="meta">{esc(Path(path).name)} · id {esc(str(ingest["ids"][i])[:12])}</p>',
    ]
    if captions is not None:
        lines.append(f'<p class="caption">“{esc(captions["caption"][i])}”</p>')
        lines.append(f'<p class="meta">caption source: {esc(captions["caption_source"][i])}</p>')
    if objects is not None:
        if len(phrases):
            items = []
            for j, (phrase, score, label) in enumerate(zip(phrases, obj_scores, labels)):
                drawn_as = (
                    f' <span class="meta">(drawn as “{esc(label.text)}”: no installed font '
                    "has its characters)</span>"
                    if label.numbered
                    else ""
                )
                if misalign is None:
                    items.append(f"<li>{esc(phrase)} ({float(score):.2f}){drawn_as}</li>")
                    continue
                items.append(
                    f'<li data-misalign="{float(misalign[j]):.6f}"><span class="swatch" '
                    f'style="background:{colours[j]}"></span>{esc(phrase)} — misalignment '
                    f"{float(misalign[j]):.3f} (grounding {float(score):.2f}){drawn_as}</li>"
                )
            # Numbered as in the thumbnail, where a phrase no font can draw is labelled "#k".
            lines.append(f'<ol class="objects">{"".join(items)}</ol>')
        else:
            lines.append('<p class="meta">no grounded object</p>')
    rows = []
    for head, s in scores.items():
        k = lookup[head].get(str(ingest["ids"][i]))
        if k is None:
            continue
        pred = "" if s.pred_class is None else str(s.pred_class[k])
        rows.append([head, f"{s.p_generated[k]:.3f}", pred])
    if rows:
        has_pred = any(r[2] for r in rows)
        header = ["head", "p_generated", *(["predicted class"] if has_pred else [])]
        lines.append(table(header, [r if has_pred else r[:2] for r in rows], "scores"))
    return f'<figure class="card">{picture}<figcaption>{"".join(lines)}</figcaption></figure>'


class _BoxLabel(NamedTuple):
    font: Any
    text: str
    numbered: bool  # drawn as "#k" because no installed font covers the phrase


def _thumbnail(
    image: Image.Image,
    boxes: np.ndarray,
    labels: list[_BoxLabel],
    colours: Sequence[str] = (),
) -> Image.Image:
    """`image` resized to THUMB_SIZE on its longer side, with the boxes (original pixels) drawn
    in `colours` (one per box; a fixed palette when empty)."""
    w, h = image.size
    scale = THUMB_SIZE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    thumb = image.resize(size, Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(thumb)
    for k, (box, label) in enumerate(zip(boxes, labels)):
        colour = colours[k] if colours else _BOX_COLOURS[k % len(_BOX_COLOURS)]
        x0, x1 = sorted(min(max(float(v) * scale, 0.0), size[0] - 1.0) for v in box[0::2])
        y0, y1 = sorted(min(max(float(v) * scale, 0.0), size[1] - 1.0) for v in box[1::2])
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        _label(draw, (x0, y0), label.text, colour, label.font)
    return thumb


@functools.lru_cache(maxsize=1)
def _label_fonts() -> tuple[tuple[str, frozenset[int]], ...]:
    """(file, covered code points) of the installed fonts of `_LABEL_FONTS`, in that order."""
    from matplotlib import font_manager, ft2font

    files = {f.name: f.fname for f in font_manager.fontManager.ttflist}
    found = []
    for family in _LABEL_FONTS:
        path = files.get(family)
        if not path:
            continue
        try:
            found.append((path, frozenset(ft2font.FT2Font(path).get_charmap())))
        except (OSError, RuntimeError):
            continue
    return tuple(found)


@functools.lru_cache(maxsize=256)
def _font_for(text: str) -> Any | None:
    """The first label font that covers every character of `text`; None when none does."""
    needed = {ord(c) for c in text if not c.isspace()}
    for path, covered in _label_fonts():
        if needed <= covered:
            return ImageFont.truetype(path, 11)
    return None


def _box_label(k: int, phrase: str, score: float) -> _BoxLabel:
    """What the label of object `k` draws: its phrase and score or, when no installed font
    covers the phrase (CJK without `fonts-noto-cjk`), its number in the card's list of objects,
    which shows the phrase as HTML text in the browser's own fonts. Never tofu boxes or '?'."""
    text = f"{phrase} {score:.2f}"
    font = _font_for(text)
    if font is not None:
        return _BoxLabel(font, text, False)
    text = f"#{k + 1} {score:.2f}"
    return _BoxLabel(_font_for(text) or ImageFont.load_default(), text, True)


def _label(
    draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: str, font: Any
) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    height = bottom - top
    y = xy[1] - height - 2 if xy[1] >= height + 2 else xy[1]  # above the box when it fits
    draw.rectangle((left, y, right + 2, y + height + 2), fill=colour)
    draw.text((xy[0] + 1, y + 1 - (top - xy[1])), text, fill="white", font=font)
