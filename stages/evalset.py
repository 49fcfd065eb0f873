"""DVC stage evalset@<name>: another dataset, extracted and scored by the trained heads."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    ap.add_argument("--cache", required=True, help="cache folder of this dataset")
    ap.add_argument("--heads", required=True, help="trained heads folder (models/)")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="folder for ROC / PR plot data")
    ap.add_argument("--split", default="all", help="split to score (default: every image)")

    def body(args, params):
        from pipeline.evalsets import extract_dataset
        from pipeline.evaluate import run_evaluate

        cache = Path(args.cache)
        features = extract_dataset(args.data, cache, cache.name, params)
        run_evaluate(
            features,
            args.heads,
            args.metrics,
            cache / "scores",
            args.plots,
            params.evaluate,
            split=args.split,
        )

    return run("evalset", argv, ap, body, needs_models=True)


if __name__ == "__main__":
    sys.exit(main())
