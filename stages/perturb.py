"""DVC stage perturb@<name>: a perturbed copy of a dataset's images (extracted by the
stages after it, so that a feature or head param never regenerates the images)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--source", required=True, help="ingest shards of the clean dataset")
    ap.add_argument("--perturbation", required=True, help="e.g. noise_0.005, blur_2, jpeg_75")
    ap.add_argument("--out", required=True, help="folder for the images and manifest.csv")
    ap.add_argument("--splits", default="all", help="comma-separated splits to copy, or all")

    def body(args, params):
        from pipeline.evalsets import perturbed_copy

        splits = None if args.splits == "all" else args.splits.split(",")
        perturbed_copy(args.source, args.perturbation, args.out, params.base.seed, splits=splits)

    return run("perturb", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
