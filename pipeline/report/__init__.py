"""One self-contained HTML report per run: metrics, curves, robustness, t-SNE and a gallery.

`build` assembles it from `inputs` (the metrics and scores read), `markup` (tables and the page),
`figures` (the matplotlib plots) and `gallery` (the image cards).
"""

from pipeline.report.build import build_report, report_for_dataset

__all__ = ["build_report", "report_for_dataset"]
