"""Benchmark of the extraction cache, side by side in one run (this machine is noisy).

Runs caption → ground → encode with the tiny preset on the shipped sample three ways and
prints the ratios: a first run, a rerun with nothing new (every row reused), and a rerun after
adding a few images (only those computed); plus the encode stage with and without the
once-per-run text memo, and the local loop against Dask with 2 worker processes.

    python bench/bench_extract.py [--n-new 3]
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.extract import encode  # noqa: E402
from pipeline.extract.caption import run_caption  # noqa: E402
from pipeline.extract.ground import run_ground  # noqa: E402


def _stages(data: Path, cache: Path, params) -> dict[str, float]:
    t = {}
    start = time.perf_counter()
    run_ingest(data, cache / "ingest", cfg=params.ingest, base=params.base, dataset="bench")
    t["ingest"] = time.perf_counter() - start
    for name, call in (
        (
            "caption",
            lambda: run_caption(
                cache / "ingest",
                cache / "captions",
                cfg=params.caption,
                models=params.models,
                base=params.base,
                dataset="bench",
            ),
        ),
        (
            "ground",
            lambda: run_ground(
                cache / "ingest",
                cache / "captions",
                cache / "objects",
                cfg=params.ground,
                models=params.models,
                base=params.base,
                dataset="bench",
            ),
        ),
        ("encode", lambda: _run_encode(cache, params, params.base)),
    ):
        start = time.perf_counter()
        call()
        t[name] = time.perf_counter() - start
    return t


def _encode_again(cache: Path, params, base) -> float:
    """Seconds of an encode stage run from scratch (captions and objects already cached)."""
    shutil.rmtree(cache / "clip")
    start = time.perf_counter()
    _run_encode(cache, params, base)
    return time.perf_counter() - start


def _run_encode(cache: Path, params, base) -> None:
    encode.run_encode(
        cache / "ingest",
        cache / "captions",
        cache / "objects",
        cache / "clip",
        cfg=params.encode,
        crop_padding=params.ground.crop_padding,
        models=params.models,
        base=base,
        dataset="bench",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-new", type=int, default=3)
    ap.add_argument("--n-images", type=int, default=40, help="sample images in the base set")
    args = ap.parse_args()
    params = params_from_dict({"models": {"preset": "tiny"}, "ingest": {"shard_size": 16}})
    work = Path(tempfile.mkdtemp(prefix="misalign-bench-"))
    src = ROOT / "data" / "sample"
    rows = list(csv.DictReader((src / "manifest.csv").open()))
    # A seeded mix of real and generated images, some without a dataset caption (BLIP-2 work).
    rows = [rows[i] for i in random.Random(0).sample(range(len(rows)), len(rows))]
    base, extra = rows[: args.n_images], rows[args.n_images : args.n_images + args.n_new]
    data = work / "data"
    for r in base + extra:
        (data / r["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / r["file"], data / r["file"])

    def manifest(chosen):
        with (data / "manifest.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, list(rows[0]))
            w.writeheader()
            w.writerows(chosen)

    manifest(base)
    cache = work / "cache"
    first = _stages(data, cache, params)
    again = _stages(data, cache, params)
    manifest(base + extra)
    grown = _stages(data, cache, params)

    # Encode without the run-wide text memo: every shard encodes its own strings.
    original = encode.encode_texts_once
    sent = {"memo": 0, "no_memo": 0}

    def counting(encoder, texts, batch_size, memo=None, key="memo"):
        before = len(memo) if memo is not None else 0
        out = original(encoder, texts, batch_size, memo)
        sent[key] += (len(memo) - before) if memo is not None else len(set(texts))
        return out

    encode.encode_texts_once = lambda e, t, b, m=None, _k=None: counting(e, t, b, m, "memo")
    t_memo = _encode_again(cache, params, params.base)
    encode.encode_texts_once = lambda e, t, b, m=None, _k=None: counting(e, t, b, None, "no_memo")
    t_no_memo = _encode_again(cache, params, params.base)
    encode.encode_texts_once = original

    dask_params = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "ingest": {"shard_size": 16},
            "base": {"scheduler": "dask", "n_workers": 2},
        }
    )
    t_dask = _encode_again(cache, params, dask_params.base)

    print(f"images: {args.n_images} base + {args.n_new} new, shard size 16, tiny preset")
    print(
        f"{'stage':8s} {'first s':>8s} {'rerun s':>8s} {'+new s':>8s} {'rerun/first':>12s} "
        f"{'+new/first':>11s}"
    )
    for s in ("caption", "ground", "encode"):
        print(
            f"{s:8s} {first[s]:8.2f} {again[s]:8.2f} {grown[s]:8.2f} "
            f"{again[s] / first[s]:12.3f} {grown[s] / first[s]:11.3f}"
        )
    print(
        f"encode with run-wide text memo {t_memo:.2f}s ({sent['memo']} strings encoded), "
        f"per shard only {t_no_memo:.2f}s ({sent['no_memo']} strings); "
        f"ratio {t_memo / t_no_memo:.3f}"
    )
    print(
        f"encode local {t_memo:.2f}s vs Dask 2 workers {t_dask:.2f}s; "
        f"ratio dask/local {t_dask / t_memo:.3f}"
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak:.0f} MiB")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
