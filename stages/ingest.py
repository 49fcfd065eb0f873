"""DVC stage ingest: dataset folder or manifest -> checked, de-duplicated, split ingest shards."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    ap.add_argument("--out", required=True, help="output folder (cache/<dataset>/ingest)")
    ap.add_argument("--name", required=True, help="dataset name recorded in the shards")

    def body(args, params):
        from pipeline.data.ingest import run_ingest

        run_ingest(
            args.data,
            args.out,
            cfg=params.ingest,
            base=params.base,
            dataset=args.name,
            layout=params.data.layout,
        )

    return run("ingest", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
