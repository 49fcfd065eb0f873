"""DVC stages evalset@<name>: ingest, caption, ground and encode another dataset (its
features are the features stage's work, so a feature param reruns only that)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    ap.add_argument("--cache", required=True, help="cache folder of this dataset")
    ap.add_argument("--layout", default="auto", help="dataset layout ")
    ap.add_argument(
        "--evaluation-set",
        action="store_true",
        help="a dataset of evaluate.datasets: drawn by evaluate.max_per_class",
    )

    def body(args, params):
        from pipeline.evalsets import extract_dataset

        cache = Path(args.cache)
        draw = params.evaluate.max_per_class if args.evaluation_set else None
        extract_dataset(
            args.data,
            cache,
            cache.name,
            params,
            args.layout,
            with_features=False,
            max_per_class=draw,
        )

    return run("evalset", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
