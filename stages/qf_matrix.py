"""DVC stage qf_matrix: features of each JPEG quality (from qf_extract), heads trained at each
quality and tested at each; metrics/qf_matrix.json."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--root", required=True, help="qf_extract's folder (one dataset per quality)")
    ap.add_argument("--features", required=True, help="folder for the features of each quality")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")

    def body(args, params):
        from pipeline.evaluate import write_json_atomic
        from pipeline.features import run_features
        from pipeline.qf_matrix import qf_matrix

        dirs = {}
        for q in params.evaluate.qf_matrix:
            name = f"jpeg_{q}"
            source, dirs[q] = Path(args.root) / name, Path(args.features) / name
            run_features(source / "ingest", source / "clip", dirs[q], params.features, name)
        Path(args.features).mkdir(parents=True, exist_ok=True)
        matrix = qf_matrix(dirs, params, params.evaluate.split, params.evaluate.qf_heads)
        write_json_atomic(args.metrics, matrix)

    return run("qf_matrix", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
