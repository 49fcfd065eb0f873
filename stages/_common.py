"""What every stage script shares: logging setup, --params, and clean exits on user errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext

from pipeline.config import Params, load_params
from pipeline.errors import one_line, output_error, user_errors
from pipeline.logs import setup_logging, tiny_announced

# The exit status of a process stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return ap


def run(
    name: str,
    argv: Sequence[str] | None,
    ap: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace, Params], None],
    before: Callable[[Params], None] | None = None,
) -> int:
    """Parse args, load and validate the whole params file, then run `body`; user errors exit 1
    with one clear message.

    The order matters: nothing heavy (torch, transformers, open_clip) is imported before the
    params are valid, so a bad value is reported in seconds; `body` imports what it needs.
    `before` runs first, e.g. `stages._models.check_models` in the stages that load models."""
    setup_logging("%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        tiny = params.models.preset == "tiny"
        if tiny:
            # said once here; the model loads and heads of this run then say it at DEBUG only
            logging.getLogger(name).warning(
                "models.preset=tiny: every model is small and RANDOM; results are meaningless "
                "and marked preset=tiny in every output"
            )
        with tiny_announced() if tiny else nullcontext():
            if before is not None:
                before(params)
            body(args, params)
    except user_errors() as err:
        print(f"error in stage {name}: {one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:
        # Disk full or no permission where the library did not know the path (a library's
        # temporary file, a log): still the user's to fix, and said on one line.
        clear = output_error(err)
        if clear is None:
            raise
        print(f"error in stage {name}: {clear}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Finished shards are kept in <out>/.partial/ and picked up by the next run.
        print(f"stage {name} interrupted; rerun to resume", file=sys.stderr)
        return INTERRUPTED
    return 0
