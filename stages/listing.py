"""DVC stage listing: list the dataset folder (path, size, mtime, type of each file) into one
small file that ingest depends on, instead of DVC hashing every image.

It runs at every `dvc repro` (`always_changed`: DVC cannot see a folder change without reading
it); its output is byte-identical while the folder is unchanged, so nothing downstream reruns.
FIFOs, devices, sockets and bad links in the folder are refused here, in seconds.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from stages._common import parser, run

logger = logging.getLogger("stages.listing")


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser(__doc__ or "")
    ap.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    ap.add_argument("--out", required=True, help="listing file to write")

    def body(args, params):
        from pipeline.data.listing import write_listing

        n = write_listing(args.data, args.out)
        logger.info("%s: %d files listed in %s", args.data, n, args.out)

    return run("listing", argv, ap, body)


if __name__ == "__main__":
    sys.exit(main())
