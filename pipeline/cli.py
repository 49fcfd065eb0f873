"""The `misalign` command: predict, report, info, protocol, weights, study (DVC runs the
stages)."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.config import load_params
from pipeline.errors import DatasetError, one_line, output_error, user_errors
from pipeline.logs import setup_logging

logger = logging.getLogger(__name__)


def _info(args: argparse.Namespace) -> int:
    from pipeline.rows import store

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
                    if key == store.CHECKSUMS:  # one sha256 per dataset: too long to show
                        value = f"sha256 of each of {len(fh.keys())} datasets"
                    sys.stdout.write(f"  @{key} = {value}\n")
                for key in sorted(fh.keys()):
                    ds = fh[key]
                    sys.stdout.write(f"  {key:16s} {str(ds.shape):14s} {ds.dtype}\n")
    if target.is_dir():
        sys.stdout.write(f"{len(shards)} shards, {total} images in {target}\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    # Checked before the library (torch, the models) is imported: a typo costs no wait.
    for item in args.inputs:
        if not Path(item).expanduser().exists():
            raise DatasetError(f"{item} does not exist; give image files or folders")
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
        kind=params.features.kind,
        seed=params.base.seed,
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


def _study(args: argparse.Namespace) -> int:
    from pipeline.studies import STUDIES, ExtractionStudy, StudyInputs, run_study

    if args.list or not args.name:
        for name, cls in STUDIES.items():
            sys.stdout.write(f"{name:11s} {cls.summary} [{cls.reproduces}]\n")
        return 0
    params = load_params(args.params)
    dataset_cache = Path(args.cache) / params.data.name
    features = args.features or [str(dataset_cache / "features")]
    options = {
        "train": args.train,
        "finetune": args.finetune,
        "epochs": args.epochs,
        "settings": args.settings,
    }
    inputs = StudyInputs(
        features_dirs=[Path(f) for f in features],
        cfg=params.train,
        kind=args.kind or params.features.kind,
        seed=params.base.seed,
        head=args.head,
        by=args.by,
        threshold=params.evaluate.threshold,
        options={k: v for k, v in options.items() if v is not None},
        params=params,
        # Given folders: the cell cache goes beside the first (`StudyInputs.dataset_cache`).
        cache_dir=None if args.features else dataset_cache,
        refit=args.refit,
    )
    table, path = run_study(args.name, inputs, Path(args.out))
    cache = table["cache"]
    done = f"{cache['fitted']} fits made, {cache['reused']} reused from the cell cache"
    if issubclass(STUDIES[args.name], ExtractionStudy):
        folder = dataset_cache / "studies" / args.name
        done += f"; each setting's shards in {folder}/<setting>/"
    sys.stdout.write(
        f"study {args.name}: {len(table['cells'])} cells written to {path} ({done}); "
        "`misalign report` draws it\n"
    )
    return 0


def _wrap(text: str) -> str:
    """A description filled to the terminal's usual width (the raw formatter keeps the
    examples' lines as written, and would not wrap descriptions either)."""
    return textwrap.fill(text, width=79)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    from pipeline import __version__
    from pipeline.protocols import list_protocols

    fmt = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(
        prog="misalign",
        description=_wrap(
            "Tell real photos from AI-generated images by image-text misalignment. "
            "DVC runs the pipeline (`dvc exp run`); this command scores new images, writes the "
            "report, describes cache shards, prints protocols and checks or fetches weights."
        ),
        epilog=_examples(
            "misalign weights check",
            "misalign predict --head models/mlp --out scores.csv photos/",
            "misalign <command> --help",
        ),
        formatter_class=fmt,
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="<command>")

    p = sub.add_parser(
        "predict",
        help="score images or folders with a trained head",
        description=_wrap(
            "Score image files or folders with a trained head: the images go through "
            "the same extraction steps as the head's training rows (cached under --cache), and "
            "each gets a probability of being generated and a label at the threshold."
        ),
        epilog=_examples(
            "misalign predict --head models/mlp --out scores.csv photo.jpg more_photos/",
            "misalign predict --head models/svm --threshold 0.5 --out scores.csv photos/",
        ),
        formatter_class=fmt,
    )
    p.add_argument("--head", required=True, help="trained head folder, e.g. models/mlp")
    p.add_argument("--out", required=True, help="CSV to write, one row per image")
    p.add_argument(
        "--params",
        default="params.yaml",
        help="params file with the models and extraction settings (default: params.yaml)",
    )
    p.add_argument(
        "--cache", default="cache/predict", help="row cache for these images (default: %(default)s)"
    )
    p.add_argument(
        "--threshold",
        default="val",
        help="'val' (the threshold chosen on val at training, the default) or a number in [0, 1]",
    )
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.set_defaults(func=_predict)

    r = sub.add_parser(
        "report",
        help="write the HTML report of the last run",
        description=_wrap(
            "Write the HTML report (metrics, curves, a gallery of test images) of the "
            "run whose params, cache and metrics are given; `dvc repro` does this as its report "
            "stage."
        ),
        epilog=_examples(
            "misalign report",
            "misalign report --params params.yaml --out report_copy   # report_copy/index.html",
        ),
        formatter_class=fmt,
    )
    r.add_argument(
        "--params",
        default="params.yaml",
        help="params file of the run: its dataset name, feature kind and seed (default: "
        "params.yaml)",
    )
    r.add_argument("--cache", default="cache", help="cache root (default: cache)")
    r.add_argument("--metrics", default="metrics", help="metrics folder (default: metrics)")
    r.add_argument("--out", default="report", help="output folder of index.html (default: report)")
    r.set_defaults(func=_report)

    i = sub.add_parser(
        "info",
        help="describe a shard or a stage folder",
        description=_wrap(
            "Describe an HDF5 shard of the row cache: its attributes (step versions, "
            "params hash, preset) and its datasets' shapes and types; for a stage folder, the first "
            "shard and the number of shards and images."
        ),
        epilog=_examples(
            "misalign info cache/sample/clip",
            "misalign info cache/sample/features/shard_00000.h5",
        ),
        formatter_class=fmt,
    )
    i.add_argument("path", help="a shard file (shard_00000.h5) or a stage folder under cache/")
    i.set_defaults(func=_info)

    w = sub.add_parser(
        "weights",
        help="check or fetch the weights the params need",
        description=_wrap(
            "check: list each model the params need, present or MISSING, with where "
            "it was found or looked for. fetch: download the missing ones into the Hugging Face / "
            "open_clip caches (needs network). The tiny preset needs no weights."
        ),
        epilog=_examples(
            "misalign weights check",
            "misalign weights fetch --timeout 30",
            "dvc exp run -S models.preset=tiny      # offline, no weights",
        ),
        formatter_class=fmt,
    )
    w.add_argument(
        "action", choices=("check", "fetch"), help="check what is there, or fetch what is missing"
    )
    w.add_argument(
        "--params",
        default="params.yaml",
        help="params file naming the models (default: params.yaml)",
    )
    w.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        help="seconds per network request (default: %(default)s)",
    )
    w.set_defaults(func=_weights)

    c = sub.add_parser(
        "protocol",
        help="print the -S arguments of a named protocol",
        description=_wrap(
            "Print the `dvc exp run -S key=value` arguments of a seed paper's protocol "
            "(datasets, features, heads), so that the protocol runs as a tracked experiment "
            "without editing params.yaml. Without a name, list the protocols."
        ),
        epilog=_examples(
            "misalign protocol --list",
            'eval "dvc exp run $(misalign protocol item --data-root /data)"',
            'eval "dvc exp run -S models.preset=tiny $(misalign protocol qf --data-root /data)"',
        ),
        formatter_class=fmt,
    )
    c.add_argument(
        "name", nargs="?", help=f"protocol name ({', '.join(list_protocols())}); none lists them"
    )
    c.add_argument(
        "--data-root", default="", help="folder holding the protocol's datasets, e.g. /data"
    )
    c.add_argument("--list", action="store_true", help="list the protocols with a description")
    c.add_argument(
        "--params",
        default="params.yaml",
        help="params file: keys it has get -S, new keys -S ++ (Hydra) (default: params.yaml)",
    )
    c.set_defaults(func=_protocol)
    _add_study_parser(sub, fmt)
    return ap


def _add_study_parser(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    from pipeline.studies import STUDIES
    from pipeline.studies.base import GROUPINGS

    s = sub.add_parser(
        "study",
        help="run a named study (a table of fitted and scored heads)",
        description=_wrap(
            "Run a study: train the head on groups of rows (generators, subsets or datasets) "
            "and score it on others; the table goes to <out>/study_<name>.json and into the "
            "report. captioners and clip_arch first extract each setting's features into "
            "<cache>/<data.name>/studies/<study>/<setting>/, reusing the main pipeline's rows "
            "where nothing changed. Fits are cached: a rerun with the same rows and head "
            "settings refits nothing (--refit forces it). Without a name, list the studies."
        ),
        epilog=_examples(
            "misalign study --list",
            "misalign study train_sets --head svm          # one cell per (train, test) pair",
            "misalign study logo --by subset",
            "misalign study distances",
            "misalign study finetune --train ganA --finetune diffB --epochs 5",
            "misalign study train_sets --by dataset --features cache/a/features cache/b/features",
            "misalign study captioners                     # blip2, blip, llava captions",
            "misalign study clip_arch --settings RN50 ViT-B-16",
        ),
        formatter_class=fmt,
    )
    s.add_argument("name", nargs="?", help=f"study ({', '.join(STUDIES)}); none lists them")
    s.add_argument("--list", action="store_true", help="list the studies")
    s.add_argument(
        "--params", default="params.yaml", help="params file of the run (default: params.yaml)"
    )
    s.add_argument("--cache", default="cache", help="cache root (default: cache)")
    s.add_argument(
        "--features",
        nargs="+",
        help="features folders (default: cache/<data.name>/features); several for --by dataset",
    )
    s.add_argument("--head", default="mlp", help="head trained in every cell (default: mlp)")
    s.add_argument("--kind", default="", help="features kind (default: features.kind)")
    s.add_argument(
        "--by", default="generator", choices=GROUPINGS, help="what a group is (default: generator)"
    )
    s.add_argument(
        "--out", default="metrics", help="folder of study_<name>.json (default: metrics)"
    )
    s.add_argument("--train", help="finetune: the group trained on first (default: each)")
    s.add_argument("--finetune", help="finetune: the group fine-tuned on (default: each other)")
    s.add_argument("--epochs", type=int, help="finetune: fine-tuning epochs of a torch head")
    s.add_argument(
        "--settings",
        nargs="+",
        help="captioners, clip_arch: the settings to run (default: all of the study's)",
    )
    s.add_argument("--refit", action="store_true", help="refit every cell, ignoring the cell cache")
    s.set_defaults(func=_study)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except user_errors() as err:
        sys.stderr.write(f"misalign {args.command}: error: {one_line(err)}\n")
        return 1
    except OSError as err:
        clear = output_error(err)  # disk full or not permitted, where no library call knew it
        if clear is None:
            raise
        sys.stderr.write(f"misalign {args.command}: error: {clear}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"misalign {args.command}: interrupted; rerun to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
