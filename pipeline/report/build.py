"""Assemble the report: read the inputs, build every section and write one self-contained
HTML file."""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.report.audit import shortcut_section
from pipeline.report.figures import curves_section, qf_section, robustness_section, tsne_section
from pipeline.report.gallery import gallery_section
from pipeline.report.inputs import extra_eval_sets, read_eval, read_scores, stage_attrs
from pipeline.report.markup import page, summary_section
from pipeline.report.studies import study_sections
from pipeline.rows.atomic import write_text

logger = logging.getLogger(__name__)


def build_report(
    out_dir: Path,
    *,
    metrics_dir: Path,
    scores_dir: Path,
    features_dir: Path,
    ingest_dir: Path,
    captions_dir: Path,
    objects_dir: Path,
    kind: str = "item",
    n_gallery: int = 12,
    seed: int = 0,
    title: str = "misalign report",
    clip_dir: Path | None = None,
) -> Path:
    """Write `out_dir/index.html`: one HTML file with every picture embedded, openable offline.

    A section whose inputs are absent is replaced by a short note saying what is missing;
    inputs that are present but malformed raise, naming the file.

    Args:
        out_dir: folder of the report (created if needed).
        metrics_dir: holds `eval.json`, optional `eval_<name>.json` (perturbations such as
            `jpeg_75`, or other datasets), optional `qf_matrix.json` and optional study
            tables `study_<name>.json` (one section each) and `shortcut.json` (the
            shortcut audit).
        scores_dir: per-image scores, one `<head>.csv` per head.
        features_dir: features shards, for the t-SNE plot and the objects' misalignment.
        ingest_dir, captions_dir, objects_dir: row-aligned shards, for the gallery.
        clip_dir: encode shards, for the Run table (default: `clip/` beside `ingest_dir`).
        kind: feature kind of the t-SNE plot (`pipeline.feature_kinds.KINDS`).
        n_gallery: number of gallery images.
        seed: seeds the gallery choice, the t-SNE subsample and t-SNE itself.
        title: page title.

    Returns:
        The path of the written `index.html`.
    """
    if n_gallery < 0:
        raise ValueError(f"n_gallery must be >= 0, got {n_gallery}")
    out_dir = Path(out_dir)
    metrics_dir = Path(metrics_dir)
    attrs = stage_attrs(
        {
            "ingest": Path(ingest_dir),
            "captions": Path(captions_dir),
            "objects": Path(objects_dir),
            "encode": Path(clip_dir) if clip_dir is not None else Path(ingest_dir).parent / "clip",
            "features": Path(features_dir),
        }
    )
    clean = read_eval(metrics_dir / "eval.json")
    perturbed, others = extra_eval_sets(metrics_dir)
    scores = read_scores(Path(scores_dir))
    presets = {str(a.get("preset", "")) for shards in attrs.values() for a in shards} - {""}
    if not presets and clean:
        presets = {str(b.get("preset", "")) for b in clean.values() if isinstance(b, dict)} - {""}
    preset = ", ".join(sorted(presets))
    sections = [
        ("summary", "Summary", summary_section(clean, others, metrics_dir)),
        ("shortcut", "Shortcut audit", shortcut_section(metrics_dir / "shortcut.json")),
        ("curves", "ROC and PR curves", curves_section(scores, Path(scores_dir), preset)),
        ("robustness", "Robustness", robustness_section(clean, perturbed, metrics_dir, preset)),
        ("qf-matrix", "QF matrix", qf_section(metrics_dir / "qf_matrix.json", preset)),
        ("tsne", "t-SNE of the features", tsne_section(Path(features_dir), kind, seed, preset)),
        (
            "gallery",
            "Gallery",
            gallery_section(
                Path(ingest_dir),
                Path(captions_dir),
                Path(objects_dir),
                scores=scores,
                n_gallery=n_gallery,
                seed=seed,
                features_dir=Path(features_dir),
            ),
        ),
    ]
    # One page section per study table (`misalign study <name>` writes study_<name>.json).
    sections += study_sections(metrics_dir, preset)
    document = page(title, attrs, sections)
    path = out_dir / "index.html"
    write_text(path, document)
    logger.info("report: wrote %s (%.1f kB)", path, len(document.encode()) / 1e3)
    return path


def report_for_dataset(
    cache: Path, metrics_dir: Path, out_dir: Path, *, kind: str = "item", seed: int = 0
) -> Path:
    """`build_report` for the stage folders of one dataset under `cache` (cache/<data>)."""
    return build_report(
        out_dir,
        metrics_dir=metrics_dir,
        scores_dir=cache / "scores",
        features_dir=cache / "features",
        ingest_dir=cache / "ingest",
        captions_dir=cache / "captions",
        objects_dir=cache / "objects",
        kind=kind,
        seed=seed,
    )
