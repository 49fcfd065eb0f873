"""DVC stage features: ITEM / TIDY / ablation feature sets from the cached embeddings."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--ingest", required=True, help="ingest shards folder")
    ap.add_argument("--clip", required=True, help="encode shards folder")
    ap.add_argument("--captions", default="", help="caption shards folder (caption provenance)")
    ap.add_argument("--out", required=True, help="output folder (cache/<dataset>/features)")
    ap.add_argument("--name", required=True, help="dataset name recorded in the shards")

    def body(args, params):
        from pipeline.features import run_features

        run_features(
            args.ingest,
            args.clip,
            args.out,
            params.features,
            args.name,
            captions_dir=args.captions or None,
        )

    return run("features", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
