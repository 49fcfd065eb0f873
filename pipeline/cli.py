"""The `misalign` command: predict, report, info, protocol, weights (DVC runs the stages)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.logs import setup_logging

logger = logging.getLogger(__name__)


def _info(args: argparse.Namespace) -> int:
    from pipeline import store

    target = Path(args.path)
    folders = sorted(str(p.parent) for p in Path("cache").glob("*/*/shard_00000.h5"))
    give = (
        "give a shard file (shard_00000.h5) or a stage folder such as cache/sample/clip ("
        + (f"stage folders here: {', '.join(folders)}" if folders else "no cache/ here yet")
        + ")"
    )
    if not target.exists():
        raise store.ShardError(f"{target} does not exist; {give}")
    shards = store.list_shards(target) if target.is_dir() else [target]
    if not shards:
        raise store.ShardError(f"no shards in {target}; {give}")
    total = 0
    for shard in shards:
        # A damaged shard inside a stage folder is the stage's to rewrite (open_shard's own
        # fix); a file the user named may simply be the wrong file.
        opened = store.open_shard(shard) if target.is_dir() else store.open_shard(shard, give)
        with opened as fh:
            n = len(fh["ids"]) if "ids" in fh else 0
            total += n
            if shard is shards[0] or not target.is_dir():
                sys.stdout.write(f"{shard}  ({n} images)\n")
                for key, value in sorted(fh.attrs.items()):
                    sys.stdout.write(f"  @{key} = {value}\n")
                for key in sorted(fh.keys()):
                    ds = fh[key]
                    sys.stdout.write(f"  {key:16s} {str(ds.shape):14s} {ds.dtype}\n")
    if target.is_dir():
        sys.stdout.write(f"{len(shards)} shards, {total} images in {target}\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import predict

    params = load_params(args.params)
    threshold = args.threshold if args.threshold == "val" else float(args.threshold)
    rows = predict(args.head, args.inputs, args.out, params, args.cache, threshold)
    sys.stdout.write(f"wrote {len(rows)} predictions to {args.out}\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pipeline.report import report_for_dataset

    params = load_params(args.params)
    path = report_for_dataset(
        Path(args.cache) / params.data.name,
        Path(args.metrics),
        Path(args.out),
        params.features.kind,
        params.base.seed,
    )
    sys.stdout.write(f"report written to {path}\n")
    return 0


def _protocol(args: argparse.Namespace) -> int:
    from pipeline.protocols import list_protocols, protocol_args

    if args.list or not args.name:
        for name, description in list_protocols().items():
            sys.stdout.write(f"{name:8s} {description}\n")
        return 0
    existing = None
    if Path(args.params).is_file():
        import yaml

        existing = yaml.safe_load(Path(args.params).read_text()) or {}
    sys.stdout.write(" ".join(protocol_args(args.name, args.data_root, existing)) + "\n")
    return 0


def _weights(args: argparse.Namespace) -> int:
    from pipeline import weights

    params = load_params(args.params)
    if params.models.preset == "tiny":
        sys.stdout.write("models.preset=tiny: every model is built offline; nothing to fetch\n")
        return 0
    if args.action == "fetch":
        statuses = weights.fetch(params, timeout=args.timeout)
    else:
        statuses = weights.check(params)
    sys.stdout.write(weights.format_statuses(statuses) + "\n")
    missing = [s for s in statuses if not s.present]
    if missing:
        sys.stderr.write(
            f"misalign weights: {len(missing)} of {len(statuses)} models missing; "
            f"`misalign weights fetch` downloads them (needs network), {weights.OFFLINE_WAY}\n"
        )
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="misalign", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="score images or folders with a trained head")
    p.add_argument("--head", required=True, help="trained head folder, e.g. models/mlp")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--params", default="params.yaml", help="models and extraction settings")
    p.add_argument("--cache", default="cache/predict", help="row cache for these images")
    p.add_argument(
        "--threshold", default="val", help="'val' (chosen on val at training) or a number"
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.set_defaults(func=_predict)

    r = sub.add_parser("report", help="write the HTML report of the last run")
    r.add_argument("--params", default="params.yaml")
    r.add_argument("--cache", default="cache", help="cache root (default: cache)")
    r.add_argument("--metrics", default="metrics", help="metrics folder")
    r.add_argument("--out", default="report", help="output folder (index.html)")
    r.set_defaults(func=_report)

    i = sub.add_parser("info", help="describe a shard or a stage folder")
    i.add_argument("path")
    i.set_defaults(func=_info)

    w = sub.add_parser("weights", help="check or fetch the weights the params need")
    w.add_argument("action", choices=("check", "fetch"))
    w.add_argument("--params", default="params.yaml")
    w.add_argument("--timeout", type=float, default=15.0, help="seconds per network request")
    w.set_defaults(func=_weights)

    c = sub.add_parser("protocol", help="print the -S arguments of a named protocol")
    c.add_argument("name", nargs="?")
    c.add_argument("--data-root", default="", help="folder holding the protocol's datasets")
    c.add_argument("--list", action="store_true")
    c.add_argument(
        "--params", default="params.yaml", help="keys it has get -S, new keys -S ++ (Hydra)"
    )
    c.set_defaults(func=_protocol)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except user_errors() as err:
        sys.stderr.write(f"misalign {args.command}: error: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
