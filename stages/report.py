"""DVC stage report: one self-contained HTML page of the run (report/index.html)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--cache", required=True, help="cache folder of the dataset (cache/<data>)")
    ap.add_argument("--metrics", required=True, help="metrics folder")
    ap.add_argument("--out", required=True, help="output folder (index.html)")

    def body(args, params):
        from pipeline.report import report_for_dataset

        report_for_dataset(
            Path(args.cache),
            Path(args.metrics),
            Path(args.out),
            kind=params.features.kind,
            seed=params.base.seed,
        )

    return run("report", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
