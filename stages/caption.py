"""DVC stage caption: one caption per image (dataset's, BLIP-2's, or dataset's else BLIP-2's)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--ingest", required=True, help="ingest shards folder")
    ap.add_argument("--out", required=True, help="output folder (cache/<dataset>/captions)")
    ap.add_argument("--name", required=True, help="dataset name recorded in the shards")

    def body(args, params):
        from pipeline.extract.caption import run_caption

        run_caption(
            args.ingest,
            args.out,
            cfg=params.caption,
            models=params.models,
            base=params.base,
            dataset=args.name,
        )

    return run("caption", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
