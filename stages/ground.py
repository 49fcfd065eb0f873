"""DVC stage ground: the caption's objects found in the image (boxes, phrases, scores)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--ingest", required=True, help="ingest shards folder")
    ap.add_argument("--captions", required=True, help="captions shards folder")
    ap.add_argument("--out", required=True, help="output folder (cache/<dataset>/objects)")
    ap.add_argument("--name", required=True, help="dataset name recorded in the shards")

    def body(args, params):
        from pipeline.extract.ground import run_ground

        run_ground(
            args.ingest,
            args.captions,
            args.out,
            cfg=params.ground,
            models=params.models,
            base=params.base,
            dataset=args.name,
        )

    return run("ground", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
