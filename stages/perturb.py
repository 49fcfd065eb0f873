"""DVC stage perturb@<name>: a perturbed copy of the evaluation split, extracted and scored."""

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
    ap.add_argument("--heads", required=True, help="trained heads folder (models/)")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")
    ap.add_argument("--plots", required=True, help="folder for ROC / PR plot data")

    def body(args, params):
        from pipeline.evalsets import extract_dataset, perturbed_copy
        from pipeline.evaluate import run_evaluate

        cache = Path(args.cache)
        name = cache.name
        split = params.evaluate.split
        data = perturbed_copy(
            args.source, args.perturbation, cache / "data", params.base.seed, splits=[split]
        )
        features = extract_dataset(data, cache, name, params, layout="manifest")
        run_evaluate(
            features,
            args.heads,
            args.metrics,
            cache / "scores",
            args.plots,
            params.evaluate,
            split=split,
        )

    return run("perturb", argv, ap, body, needs_models=True)


if __name__ == "__main__":
    sys.exit(main())
