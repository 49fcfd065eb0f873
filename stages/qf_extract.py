"""DVC stage qf_extract: seed 003's JPEG copies of the dataset at each evaluate.qf_matrix quality,
ingested, captioned, grounded and encoded (features and heads are qf_matrix's work)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--source", required=True, help="ingest shards of the clean dataset")
    ap.add_argument("--root", required=True, help="cache folder for one dataset per quality")

    def body(args, params):
        from pipeline.evalsets import extract_dataset, perturbed_copy

        root = Path(args.root)
        root.mkdir(parents=True, exist_ok=True)
        for q in params.evaluate.qf_matrix:
            cache = root / f"jpeg_{q}"
            data = perturbed_copy(args.source, f"jpeg_{q}", cache / "data", params.base.seed)
            extract_dataset(data, cache, cache.name, params, "manifest", with_features=False)

    return run("qf_extract", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
