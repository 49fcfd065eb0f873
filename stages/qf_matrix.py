"""DVC stage qf_matrix: features of each JPEG quality (copied and extracted by the copies
stage), heads trained at each quality and tested at each; metrics/qf_matrix.json."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument(
        "--root", required=True, help="the copies stage's QF folder (one dataset per quality)"
    )
    ap.add_argument("--features", required=True, help="folder for the features of each quality")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")

    def body(args, params):
        from pipeline.evaluation.qf_matrix import qf_matrix
        from pipeline.features import run_features
        from pipeline.provenance import run_provenance
        from pipeline.rows.atomic import write_json_atomic

        dirs = {}
        for q in params.evaluate.qf_matrix:
            name = f"jpeg_{q}"
            source, dirs[q] = Path(args.root) / name, Path(args.features) / name
            run_features(source / "ingest", source / "clip", dirs[q], params.features, name)
        Path(args.features).mkdir(parents=True, exist_ok=True)
        matrix = qf_matrix(dirs, params, params.evaluate.split, params.evaluate.qf_heads)
        # each head's block says what made its features, like every other output's
        made_by = run_provenance(params, next(iter(dirs.values()))) if dirs else {}
        write_json_atomic(args.metrics, {h: {**made_by, **grid} for h, grid in matrix.items()})

    return run("qf_matrix", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
