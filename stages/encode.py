"""DVC stage encode: CLIP embeddings of images, captions, object crops and object phrases."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--ingest", required=True, help="ingest shards folder")
    ap.add_argument("--captions", required=True, help="captions shards folder")
    ap.add_argument("--objects", required=True, help="objects shards folder")
    ap.add_argument("--out", required=True, help="output folder (cache/<dataset>/clip)")
    ap.add_argument("--name", required=True, help="dataset name recorded in the shards")

    def body(args, params):
        from pipeline.extract.encode import run_encode

        run_encode(
            args.ingest,
            args.captions,
            args.objects,
            args.out,
            cfg=params.encode,
            crop_padding=params.ground.crop_padding,
            models=params.models,
            base=params.base,
            dataset=args.name,
        )

    return run("encode", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
