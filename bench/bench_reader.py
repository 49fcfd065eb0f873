"""Feeding benchmark, side by side in one run (this machine is shared and noisy).

1. images/s through the reader (`pipeline.rows.reader.read_batches` with the encode stage's loader:
   decode once, cut 3 object crops, CLIP-preprocess every view) into a model that does
   nothing, at 0, 1 and 2 decode workers, on a few hundred distinct images in a temp folder;
2. the encode stage (tiny preset) on the same images with `base.decode_workers` 0 and 2,
   alternated over rounds, its rows compared for identity, and the speed-up printed;
3. with `--vit-l N`: the encode stage on the real ViT-L/14 architecture (random weights loaded
   from a checkpoint file, the way real weights are) against the bare `encode_image` forward
   on the same N images (no objects), with the ratio;
4. with `--hf-stages ground caption`: those stages (tiny preset) at 0 and 2 decode workers,
   their main process's time per image outside the model's forward (reader wait, processors,
   post-processing) next to the forward's, and their rows compared for identity.

    python bench/bench_reader.py [--n-images 300] [--rounds 2] [--vit-l 16]
        [--hf-stages ground caption]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench._synthetic import encode_inputs, synthetic_images  # noqa: E402
from pipeline.config import params_from_dict  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.extract.caption import run_caption  # noqa: E402
from pipeline.extract.encode import (  # noqa: E402
    EncodeLoad,
    clear_text_memo,
    collate_views,
    run_encode,
)
from pipeline.extract.ground import run_ground  # noqa: E402
from pipeline.extract.loaded import loaded_model  # noqa: E402
from pipeline.rows import reader, store  # noqa: E402

_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

N_OBJECTS = 3


def _nothing(batch: object) -> None:
    """The model of part 1: takes the batch, does no work."""


def feeding_rate(items: list, load: object, batch: int, workers: int) -> float:
    start = time.perf_counter()
    n = 0
    for out in reader.read_batches(items, load, batch, workers, collate_views):  # type: ignore[arg-type]
        _nothing(out)
        n += len(out["n_views"])
    return n / (time.perf_counter() - start)


def prepare(
    work: Path, images: list[Path], shard_size: int
) -> tuple[Path, list[tuple[str, np.ndarray]]]:
    """The encode stage's inputs for `images` (dataset captions, N_OBJECTS synthesised boxes
    each) in `work/cache`; returns the cache and (image path, boxes) per image."""
    params = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "ingest": {"shard_size": shard_size},
            "caption": {"source": "dataset"},
        }
    )
    cache = work / "cache"
    items = encode_inputs(
        images, cache, params, dataset="bench", caption="a photo of thing", per_image=N_OBJECTS
    )
    return cache, items


def encode_stage(cache: Path, workers: int, out: str) -> tuple[float, dict]:
    params = params_from_dict(
        {"models": {"preset": "tiny"}, "base": {"decode_workers": workers}, "encode": {}}
    )
    shutil.rmtree(cache / out, ignore_errors=True)
    clear_text_memo()
    start = time.perf_counter()
    run_encode(
        cache / "ingest",
        cache / "captions",
        cache / "objects",
        cache / out,
        cfg=params.encode,
        crop_padding=params.ground.crop_padding,
        models=params.models,
        base=params.base,
        dataset="bench",
    )
    seconds = time.perf_counter() - start
    rows = store.concat_rows([store.read_shard(s) for s in store.list_shards(cache / out)])
    return seconds, rows


def same_rows(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


class _Timed:
    """Wraps a model method, adding up the seconds spent in it (the forward, or generate)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def _timed(owner: Any, method: str) -> _Timed:
    """`owner.method` wrapped once (models stay loaded between runs), its count reset."""
    timed = owner.__dict__.get(method)
    if not isinstance(timed, _Timed):
        timed = _Timed(getattr(owner, method))
        setattr(owner, method, timed)
    timed.seconds = 0.0
    return timed


def hf_stage(cache: Path, stage: str, workers: int) -> dict[str, float]:
    """One run of the ground or caption stage (every image through the model) into a fresh
    folder: seconds of the main process waiting for the reader, in the model phase, in the
    forward itself (generate, for BLIP-2) and, for GroundingDINO, in the batches' forward plus
    post-processing (`_ground_batch`)."""
    params = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "base": {"decode_workers": workers},
            "caption": {"source": "blip2"},
        }
    )
    p = params
    out = cache / f"{stage}_{workers}"
    shutil.rmtree(out, ignore_errors=True)
    if stage == "objects":
        grounder = loaded_model("grounder", p.models, p.base)
        forward, batches = _timed(grounder.model, "forward"), _timed(grounder, "_ground_batch")
        timings = run_ground(
            cache / "ingest",
            cache / "captions",
            out,
            cfg=p.ground,
            models=p.models,
            base=p.base,
            dataset="bench",
        )
    else:
        forward = _timed(loaded_model("captioner", p.models, p.base).model, "generate")
        batches = forward
        timings = run_caption(
            cache / "ingest", out, cfg=p.caption, models=p.models, base=p.base, dataset="bench"
        )
    seconds = timings["seconds"]
    return {
        "read": seconds["read"],
        "pre": seconds["model"] - batches.seconds,
        "post": batches.seconds - forward.seconds,
        "forward": forward.seconds,
    }


def report_hf_stages(cache: Path, n_images: int, rounds: int, stages: list[str]) -> None:
    for name in stages:
        stage = {"ground": "objects", "caption": "captions"}[name]
        runs: dict[int, list[dict[str, float]]] = {0: [], 2: []}
        for _ in range(rounds):
            for w in runs:
                runs[w].append(hf_stage(cache, stage, w))
        for w, parts in runs.items():
            ms = {k: 1000 * statistics.median(r[k] for r in parts) / n_images for k in parts[0]}
            print(
                f"{name} stage (tiny preset, {n_images} images), decode_workers={w}: main "
                f"process outside the forward {ms['read'] + ms['pre'] + ms['post']:.2f} ms/image "
                f"= reader wait {ms['read']:.2f} + processors and grouping {ms['pre']:.2f} + "
                f"post-processing {ms['post']:.2f}; forward {ms['forward']:.2f} ms/image "
                f"(median of {rounds} rounds)"
            )
        shards = {w: store.list_shards(cache / f"{stage}_{w}") for w in runs}
        same = same_rows(
            *(store.concat_rows([store.read_shard(s) for s in shards[w]]) for w in runs)
        )
        print(f"{name} stage rows identical at 0 and 2 decode workers: {same}")


def vit_l(work: Path, n: int, rounds: int) -> None:
    import torch

    images = synthetic_images(work / "vitl_images", n=n, width=256 * 4 // 3, height=256, seed=1)
    torch.manual_seed(0)
    model = gpu_check._open_clip_model("ViT-L-14", True)
    checkpoint = work / "vitl_random.pt"
    torch.save(model.state_dict(), checkpoint)
    import open_clip

    _, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-L-14", pretrained=None, force_quick_gelu=True
    )
    pixels = torch.stack([preprocess(load_rgb(p)) for p in images])
    tokens = open_clip.get_tokenizer("ViT-L-14")([f"{gpu_check.CAPTION} {i}" for i in range(n)])

    def bare() -> float:
        """The bare image forward plus the text forward of the stage's captions (the encode
        stage runs both), on tensors already made."""
        image = gpu_check.clip_bare(model, pixels, "cpu", [torch.float32], batch=16, repeats=1)
        with torch.inference_mode():
            start = time.perf_counter()
            model.encode_text(tokens)
            text_s = time.perf_counter() - start
        return n / image["float32"]["images_per_second"] + text_s

    # Alternated rounds, so that a change in the machine's load hits both sides alike. Round 0
    # is the stage's first use of the loaded model (one-time costs: the bare forward gets a
    # warm-up call instead); the ratio is the median of the rounds after it.
    rows = []
    for r in range(rounds + 1):
        bare_s = bare()
        stage = gpu_check.clip_pipeline(
            work / f"vitl_{r}", images, checkpoint, "ViT-L-14", "cpu", "float32", 16, -1, False
        )
        rows.append((bare_s, stage["wall_seconds"], stage["stage_timings"]["seconds"]))
    for r, (bare_s, wall, parts) in enumerate(rows):
        print(
            f"ViT-L/14 on {n} images (CPU, float32), round {r}{' (cold)' if r == 0 else ''}: "
            f"bare image+text forward "
            f"{bare_s:.2f}s, encode stage {wall:.2f}s (model {parts.get('model', 0):.2f}s, "
            f"reader wait {parts.get('read', 0):.2f}s); stage/bare {wall / bare_s:.3f}"
        )
    ratio = statistics.median(wall / bare_s for bare_s, wall, _ in rows[1:])
    print(f"ViT-L/14 encode stage / bare forward, median of {rounds} warm rounds: {ratio:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of 0 and 2 workers")
    ap.add_argument("--vit-l", type=int, default=0, help="images for the ViT-L/14 check (0: skip)")
    ap.add_argument("--skip-feeding", action="store_true")
    ap.add_argument("--skip-encode", action="store_true")
    ap.add_argument(
        "--hf-stages",
        nargs="*",
        choices=["ground", "caption"],
        default=[],
        help="time these stages' main-process work outside the model's forward",
    )
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="misalign-bench-reader-"))
    try:
        images = synthetic_images(work / "images", n=args.n_images, width=384, height=288)
        print(
            f"{args.n_images} distinct 384x288 JPEGs, {N_OBJECTS} objects each, "
            f"{reader.available_cpus()} CPUs visible"
        )
        cache, items = prepare(work, images, shard_size=64)
        if not args.skip_feeding:
            clip = loaded_model("clip", *_tiny())
            # The loader's items: (path, exif_transpose as ingest records it by default, boxes).
            feed = [(path, True, boxes) for path, boxes in items]
            load = EncodeLoad(clip.pixels, 0.1)
            rates: dict[int, list[float]] = {0: [], 1: [], 2: []}
            for _ in range(args.rounds):
                for w in rates:
                    rates[w].append(feeding_rate(feed, load, 16, w))
            med = {w: statistics.median(r) for w, r in rates.items()}
            print("reader into a do-nothing model (images/s, median of rounds):")
            for w, r in med.items():
                print(
                    f"  {w} workers: {r:7.1f} images/s  ({r / med[0]:.2f} x 0 workers; "
                    f"rounds {', '.join(f'{x:.1f}' for x in rates[w])})"
                )
        seconds: dict[int, list[float]] = {0: [], 2: []}
        rows: dict[int, dict] = {}
        for _ in range(0 if args.skip_encode else args.rounds):
            for w in (0, 2):
                s, rows[w] = encode_stage(cache, w, f"clip_{w}")
                seconds[w].append(s)
        if not args.skip_encode:
            report_encode(args.n_images, seconds, same_rows(rows[0], rows[2]))
        if args.hf_stages:
            report_hf_stages(cache, args.n_images, args.rounds, args.hf_stages)
        if args.vit_l:
            vit_l(work, args.vit_l, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report_encode(n_images: int, seconds: dict[int, list[float]], identical: bool) -> None:
    t0, t2 = statistics.median(seconds[0]), statistics.median(seconds[2])
    print(
        f"encode stage (tiny preset, {n_images} images, {N_OBJECTS} objects each): "
        f"decode_workers=0 {t0:.2f}s, decode_workers=2 {t2:.2f}s; speed-up {t0 / t2:.2f}x "
        f"(rounds 0: {', '.join(f'{x:.2f}' for x in seconds[0])}; "
        f"2: {', '.join(f'{x:.2f}' for x in seconds[2])}); rows identical: {identical}"
    )


def _tiny():
    p = params_from_dict({"models": {"preset": "tiny"}})
    return p.models, p.base


if __name__ == "__main__":
    main()
