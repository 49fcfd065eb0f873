"""DVC stage train: fit the configured heads on the train split (selection on val only)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument(
        "--features",
        required=True,
        nargs="+",
        help="features shards folder; several folders train on the union of their rows",
    )
    ap.add_argument("--out", required=True, help="output folder for the heads (models/)")

    def body(args, params):
        from pipeline.provenance import run_provenance
        from pipeline.train import train_heads

        train_heads(
            args.features,
            args.out,
            cfg=params.train,
            kind=params.features.kind,
            seed=params.base.seed,
            eval_split=params.evaluate.split,
            provenance=run_provenance(params, args.features[0]),
        )

    return run("train", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
