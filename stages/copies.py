"""DVC stage copies: every perturbed copy of the dataset (ITEM's robustness study,
evaluate.perturbations, of the evaluate.split images) and every JPEG quality copy (seed 003's
QF matrix, evaluate.qf_matrix, of all images), made and extracted in one process.

One process, so that the captioner, the grounder and CLIP are each loaded once for all the
copies (they were loaded again by one process per copy). Each copy keeps its own folder, row
cache, resume and timings; features, heads and scores are the stages after this one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from stages._common import parser, run
from stages._models import check_models


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--source", required=True, help="ingest shards of the clean dataset")
    ap.add_argument("--perturbed", required=True, help="folder of the perturbed copies")
    ap.add_argument("--qf", required=True, help="folder of the JPEG quality copies")

    def body(args, params):
        from pipeline.evalsets import Copy, drop_stale_copies, extract_copies

        perturbed, qf = Path(args.perturbed), Path(args.qf)
        names = list(params.evaluate.perturbations)
        qualities = [f"jpeg_{q}" for q in params.evaluate.qf_matrix]
        drop_stale_copies(perturbed, names)
        drop_stale_copies(qf, qualities)
        perturbed.mkdir(parents=True, exist_ok=True)
        qf.mkdir(parents=True, exist_ok=True)
        split = None if params.evaluate.split == "all" else [params.evaluate.split]
        # dataset names as the features and evaluate stages after this one give them
        copies = [Copy(n, perturbed / n, split, f"{params.data.name}__{n}") for n in names]
        copies += [Copy(q, qf / q, None, q) for q in qualities]
        extract_copies(args.source, copies, params)

    return run("copies", argv, ap, body, before=check_models)


if __name__ == "__main__":
    sys.exit(main())
