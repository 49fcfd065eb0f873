"""DVC stage perturb@<name> (and qf_extract@<q>): a perturbed copy of a dataset, extracted."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--source", required=True, help="ingest shards of the clean dataset")
    ap.add_argument("--perturbation", required=True, help="e.g. noise_0.005, blur_2, jpeg_75")
    ap.add_argument("--cache", required=True, help="cache folder of the perturbed dataset")
    ap.add_argument("--splits", default="all", help="comma-separated splits to copy, or all")

    def body(args, params):
        from pipeline.evalsets import extract_dataset, perturbed_copy

        cache = Path(args.cache)
        splits = None if args.splits == "all" else args.splits.split(",")
        data = perturbed_copy(
            args.source, args.perturbation, cache / "data", params.base.seed, splits=splits
        )
        extract_dataset(data, cache, cache.name, params, layout="manifest")

    return run("perturb", argv, ap, body, needs_models=True)


if __name__ == "__main__":
    sys.exit(main())
