"""DVC stage qf_matrix: JPEG quality-factor train × test matrix (seed 003)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--source", required=True, help="ingest shards of the clean dataset")
    ap.add_argument("--root", required=True, help="cache folder for one dataset per quality")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")

    def body(args, params):
        from pipeline.evalsets import extract_dataset, perturbed_copy, qf_matrix
        from pipeline.evaluate import write_json_atomic

        dirs = {}
        for q in params.evaluate.qf_matrix:
            cache = Path(args.root) / f"jpeg_{q}"
            data = perturbed_copy(args.source, f"jpeg_{q}", cache / "data", params.base.seed)
            dirs[q] = extract_dataset(data, cache, cache.name, params, layout="manifest")
        Path(args.root).mkdir(parents=True, exist_ok=True)
        matrix = qf_matrix(dirs, params, params.evaluate.split, params.evaluate.qf_heads)
        write_json_atomic(args.metrics, matrix)

    return run("qf_matrix", argv, ap, body, needs_models=True)


if __name__ == "__main__":
    sys.exit(main())
