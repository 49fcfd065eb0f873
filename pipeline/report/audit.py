"""The report's shortcut-audit section: the metadata-only baseline's AUC beside every head's,
under a loud banner when file metadata alone separates the classes."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import DataUnusable
from pipeline.report.inputs import read_json
from pipeline.report.markup import esc, fmt, note, table


def shortcut_section(path: Path) -> str:
    """The section from `metrics/shortcut.json` (the evaluate stage's audit), or a note."""
    if not path.is_file():
        return note(f"no {path}: the evaluate stage ran without the shortcut audit (--ingest)")
    audit = read_json(path)
    if not isinstance(audit, dict) or "heads" not in audit:
        raise DataUnusable(f"{path} is not a shortcut audit; rerun the evaluate stage")
    baseline = audit.get("metadata_baseline") or {}
    rows = [[head, fmt("auc", auc)] for head, auc in sorted(audit["heads"].items())]
    rows.append(
        ["metadata only (format, JPEG quality, size, EXIF)", fmt("auc", baseline.get("auc"))]
    )
    banner = ""
    if audit.get("warning"):
        banner = (
            f'<div class="banner" id="shortcut-banner" role="alert">{esc(audit["message"])}</div>'
        )
    return "\n".join(
        [
            banner,
            "<p>A logistic regression on file metadata only, trained on the same train rows "
            f"and scored on the same split as the heads. {esc(audit.get('message', ''))}.</p>",
            table(["model", "AUC"], rows),
        ]
    )
