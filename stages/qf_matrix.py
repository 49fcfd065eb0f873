"""DVC stage qf_matrix: JPEG quality-factor train × test matrix (seed 003)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--root", required=True, help="folder holding jpeg_<q>/features per quality")
    ap.add_argument("--metrics", required=True, help="metrics JSON to write")

    def body(args, params):
        from pipeline.evalsets import qf_matrix
        from pipeline.evaluate import write_json_atomic

        dirs = {q: Path(args.root) / f"jpeg_{q}" / "features" for q in params.evaluate.qf_matrix}
        matrix = qf_matrix(dirs, params, params.evaluate.split, params.evaluate.qf_heads)
        write_json_atomic(args.metrics, matrix)

    return run("qf_matrix", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
