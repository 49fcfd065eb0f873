"""Training at scale: wall time and peak memory of the features stage and of each head.

Synthetic encode-stage shards (random 768-d embeddings, no objects) at each size go through
`run_features`, then each head trains through `train_heads` (the train stage's code: features
read once per kind, train/val views). Every measurement runs in a fresh process; its peak RSS
above the interpreter's baseline (after imports) is printed as a ratio to the train+val
feature matrix's bytes (rows × 768 × 4). Sizes run one after another in one invocation, so the
ratios are side by side.

    python bench/bench_scale.py [--sizes 10000 100000 300000] [--heads mlp svm multitask]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 768
SHARD_ROWS = 8192
SPLITS = ("train", "val", "test")


def make_clip_shards(root: Path, n: int, seed: int = 0) -> None:
    """Ingest and encode shards of `n` synthetic rows (60/20/20 split, half generated)."""
    import numpy as np

    from pipeline.rows import store

    rng = np.random.default_rng(seed)
    for k, start in enumerate(range(0, n, SHARD_ROWS)):
        m = min(SHARD_ROWS, n - start)
        ids = np.array([f"{start + i:012d}" for i in range(m)], dtype=object)
        label = rng.integers(0, 2, m).astype(np.int8)
        split = np.array(SPLITS, dtype=object)[rng.choice(3, m, p=[0.6, 0.2, 0.2])]
        generator = np.where(label == 1, "gen_" + (rng.integers(0, 4, m)).astype(str), "real")
        store.write_shard(
            root / "ingest" / store.shard_name(k),
            {
                "ids": ids,
                "label": label,
                "generator": generator.astype(object),
                "split": split,
                "family": generator.astype(object),
                "subset": np.full(m, "", dtype=object),
            },
            {"stage": "ingest"},
        )
        shift = label[:, None].astype(np.float32) * 0.05
        store.write_shard(
            root / "clip" / store.shard_name(k),
            {
                "ids": ids,
                "image_emb": (rng.standard_normal((m, DIM), np.float32) + shift),
                "text_emb": rng.standard_normal((m, DIM), np.float32),
                "obj_offsets": np.zeros(m + 1, np.int64),
                "obj_image_emb": np.zeros((0, DIM), np.float32),
                "obj_text_emb": np.zeros((0, DIM), np.float32),
            },
            {"stage": "clip", "params_hash": "synthetic"},
        )


class PeakRss:
    """Highest resident set size seen (sampled every 2 ms from /proc) while the block runs."""

    def __enter__(self) -> PeakRss:
        import threading

        self.peak = self.start = _current_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _current_mib())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_mib())


def _current_mib() -> float:
    import os

    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _train(features: Path, out: Path, head: str, epochs: int) -> None:
    from pipeline.config import TrainConfig
    from pipeline.train import train_heads

    cfg = TrainConfig(heads=[head])
    for name in ("mlp", "multitask", "tip_adapter"):
        getattr(cfg, name)["epochs"] = epochs
    cfg.meta["base_heads"] = [["mlp", {"epochs": epochs}], "svm"]
    kind = "image" if head == "tip_adapter" else "item"
    train_heads(features, out, cfg=cfg, kind=kind, seed=0)


def child(task: str, root: Path, head: str, epochs: int) -> dict:
    """One measurement in this (fresh) process, after a warm-up on the small `warm` set that
    imports and initialises everything (libraries, torch's allocator and thread pools), so that
    the peak above the RSS before the run is what the run's data costs."""
    from pipeline.config import FeaturesConfig
    from pipeline.features import run_features

    warm = root.parent / "warm"
    if task == "features":
        run_features(warm / "ingest", warm / "clip", warm / "features_w", FeaturesConfig(), "w")
    else:
        _train(warm / "features", warm / f"models_{head}", head, 1)
    start = time.perf_counter()
    with PeakRss() as rss:
        if task == "features":
            run_features(
                root / "ingest", root / "clip", root / "features", FeaturesConfig(), "bench"
            )
        else:
            _train(root / "features", root / "models" / head, head, epochs)
    return {"seconds": time.perf_counter() - start, "peak_mib": rss.peak - rss.start}


def _run_child(task: str, root: Path, head: str, epochs: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--root", str(root), "--head", head]
    cmd += ["--epochs", str(epochs)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f}s"}
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    ap.add_argument(
        "--heads", nargs="+", default=["mlp", "multitask", "svm", "tip_adapter", "meta"]
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="epochs of the torch-trained heads (memory does not depend on them)",
    )
    ap.add_argument("--max-head-rows", type=int, default=100_000, help="heads skip larger sizes")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--child", default="")
    ap.add_argument("--root", default="")
    ap.add_argument("--head", default="")
    args = ap.parse_args()
    if args.child:
        import logging

        logging.basicConfig(level=logging.ERROR)
        print(json.dumps(child(args.child, Path(args.root), args.head, args.epochs)))
        return
    print(
        f"{'rows':>8s} {'task':>12s} {'seconds':>9s} {'peak MiB':>9s} {'X MiB':>7s} {'peak/X':>7s}"
    )
    top = Path(tempfile.mkdtemp(prefix="misalign-bench-scale-"))
    from pipeline.config import FeaturesConfig
    from pipeline.features import run_features

    make_clip_shards(top / "warm", 2000, seed=1)
    run_features(
        top / "warm" / "ingest",
        top / "warm" / "clip",
        top / "warm" / "features",
        FeaturesConfig(),
        "w",
    )
    for n in args.sizes:
        work = top / f"n{n}"
        try:
            make_clip_shards(work, n)
            x_mib = None
            tasks = ["features"] + ([*args.heads] if n <= args.max_head_rows else [])
            for task in tasks:
                name = "features" if task == "features" else "head"
                r = _run_child(name, work, task, args.epochs, args.timeout)
                if x_mib is None:
                    x_mib = _train_val_rows(work) * DIM * 4 / 2**20
                if "error" in r:
                    print(f"{n:8d} {task:>12s} {r['error']}")
                    continue
                print(
                    f"{n:8d} {task:>12s} {r['seconds']:9.2f} {r['peak_mib']:9.1f} {x_mib:7.1f} "
                    f"{r['peak_mib'] / x_mib:7.2f}",
                    flush=True,
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(top, ignore_errors=True)


def _train_val_rows(root: Path) -> int:
    from pipeline.rows import store

    return sum(
        int(sum(s in ("train", "val") for s in store.read_shard(p, ["split"])["split"]))
        for p in store.list_shards(root / "ingest")
    )


if __name__ == "__main__":
    main()
