"""DVC stage check: validate the whole params.yaml, that data paths exist and that the models'
weights are there, in seconds.

Every other stage depends on its stamp, so DVC runs it first after any change of params.yaml:
a misspelt key or a bad value stops `dvc exp run` before any stage works. The stamp's content
never changes, so a passing check reruns nothing downstream.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stages._common import parser, run
from stages._models import check_models

STAMP = "params.yaml checked: every key known, every value valid\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--out", required=True, help="stamp file to write when the params are valid")

    def body(args, params):
        from pathlib import Path

        from pipeline.errors import DatasetError
        from pipeline.rows.atomic import write_text

        paths = {"data.path": params.data.path} | {
            f"evaluate.datasets.{name}": path for name, path in params.evaluate.datasets.items()
        }
        for key, path in paths.items():
            if not Path(path).exists():
                raise DatasetError(
                    f"{key} = {path!r} does not exist (looked from {Path.cwd()}); give a folder "
                    "in a known layout or a manifest CSV, e.g. -S data.path=/data/my_set"
                )
        # After the paths (a typo there is the likelier mistake), before any stage reads data.
        check_models(params)
        write_text(args.out, STAMP)

    return run("check", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
