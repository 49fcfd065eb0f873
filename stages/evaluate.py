"""DVC stage evaluate: per-image scores, metrics/eval.json (overall and per generator), plots."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--features", required=True, help="features shards folder")
    ap.add_argument("--heads", required=True, help="trained heads folder (models/)")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--scores", required=True, help="folder for per-image score CSVs")
    ap.add_argument("--plots", required=True, help="folder for ROC / PR plot data")
    ap.add_argument("--summary", default="", help="folder for the per-head DVC summaries")
    ap.add_argument("--headline", default="", help="JSON of every head's AUC, for dvc exp show")
    ap.add_argument("--split", default="", help="split to score: evaluate.split, or all")
    ap.add_argument("--ingest", default="", help="ingest shards, for the shortcut audit")
    ap.add_argument("--shortcut", default="", help="shortcut audit JSON to write (with --ingest)")

    def body(args, params):
        from pipeline.evaluation.evaluate import run_evaluate

        run_evaluate(
            args.features,
            args.heads,
            args.metrics,
            args.scores,
            args.plots,
            cfg=params.evaluate,
            split=args.split or None,
            summary_dir=args.summary or None,
            ingest_dir=args.ingest or None,
            shortcut_path=args.shortcut or None,
            headline_path=args.headline or None,
        )

    return run("evaluate", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
