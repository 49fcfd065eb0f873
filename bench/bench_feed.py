"""Feeding benchmark: can the stages' CPU side keep a GPU busy? Side by side in one run.

The encode stage runs through its real code (`run_encode`: reader, decode workers, crops,
preprocessing, copies, text memo, HDF5 writes) with an INSTANT model: a stand-in CLIP whose
towers return zeros of the right shape at once, placed in this process's loaded-model table by
this script only (no param reaches it). So the stage's images/s is what its CPU side can feed.
It is compared with a bare loop doing the same per-image work (decode, 3 object crops, CLIP
resize/crop of the 4 views, conversion to a tensor) in the same number of processes and
keeping nothing. A and B alternate over rounds, on a few hundred distinct JPEGs at 384x288 and
1024x1024, at the CUDA sizes (forward batch 64 = encode.batch_size 16 x cuda_batch_scale 4,
shard 64).

Printed per image size: images/s of stage and bare loop, their ratio, the stage's reader-wait
share of its wall time, its decode workers, and the bytes per image that cross between
processes.

With `--ground-post N`: GroundingDINO's post-processing (`_objects`, the main process's
work per image after the forward) on N images of synthetic raw boxes, today's vectorised code
against the per-token, per-box version of commit 5a2083d (read from git), alternated: CPU
seconds per raw box, and whether both give the same boxes and phrases.

    python bench/bench_feed.py [--n-images 192] [--rounds 2] [--workers 2] [--ground-post 64]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
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
import torch  # noqa: E402

from pipeline.config import EncodeConfig, GroundConfig, params_from_dict  # noqa: E402
from pipeline.data.images import load_rgb  # noqa: E402
from pipeline.data.ingest import run_ingest  # noqa: E402
from pipeline.extract import loaded  # noqa: E402
from pipeline.extract.caption import run_caption  # noqa: E402
from pipeline.extract.encode import EncodeLoad, clear_text_memo, crop_box, run_encode  # noqa: E402
from pipeline.models.clip import ClipEncoder  # noqa: E402
from pipeline.rows import reader, store  # noqa: E402

N_OBJECTS = 3
PHRASES = ("car", "tree", "person", "dog", "red sofa", "street")
CUDA_BATCH = 64  # encode.batch_size 16 x base.cuda_batch_scale 4
SHARD = 64  # ingest.shard_size


class _InstantTowers(torch.nn.Module):
    """CLIP towers that answer at once: zeros of the embedding width."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.text_projection = torch.nn.Parameter(torch.zeros(width, dim))

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.new_zeros(len(pixels), self.text_projection.shape[1])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(tokens), self.text_projection.shape[1], device=tokens.device)


def install_instant_clip(params: Any) -> ClipEncoder:
    """Put an instant CLIP into the loaded-model table under the key the stage will look up:
    the real tiny CLIP's preprocessing, tokenizer and identity, the instant towers."""
    real = loaded.loaded_model("clip", params.models, params.base)
    key = ("clip", repr((params.models, params.base.seed, params.base.device, params.base.dtype)))
    instant = ClipEncoder(
        _InstantTowers(real.dim, real.model.text_projection.shape[0]),
        real.preprocess,
        real.tokenizer,
        real.name,
        real.weights_id,
        real.device,
        real.dtype,
    )
    for name in ("mean", "std"):  # what the device-side normalisation reads, when present
        if hasattr(real, name):
            setattr(instant, name, getattr(real, name))
    loaded._LOADED[key] = instant
    return instant


def write_images(folder: Path, n: int, width: int, height: int, seed: int) -> list[Path]:
    """`n` distinct JPEGs of width x height: gradients plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(n):
        base = np.stack(
            [(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + i) % 256], -1
        )
        arr = np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(path)
    return paths


def prepare(work: Path, images: list[Path]) -> tuple[Path, list[tuple[str, np.ndarray]]]:
    """Ingest shards of SHARD images, dataset captions (distinct per image), and N_OBJECTS
    synthesised boxes per image as the objects shards; returns the cache and (path, boxes)."""
    import csv

    data = images[0].parent
    with (data / "manifest.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "generator", "caption"])
        writer.writerows(
            [p.name, i % 2, "g", f"a photo of thing {i}"] for i, p in enumerate(images)
        )
    p = params_from_dict(
        {
            "models": {"preset": "tiny"},
            "ingest": {"shard_size": SHARD},
            "caption": {"source": "dataset"},
        }
    )
    cache = work / "cache"
    run_ingest(data, cache / "ingest", cfg=p.ingest, base=p.base, dataset="bench")
    run_caption(
        cache / "ingest",
        cache / "captions",
        cfg=p.caption,
        models=p.models,
        base=p.base,
        dataset="bench",
    )
    rng = np.random.default_rng(0)
    items: list[tuple[str, np.ndarray]] = []
    for shard in store.list_shards(cache / "ingest"):
        rows = store.read_shard(shard, ["ids", "path", "width", "height"])
        boxes = []
        for name, w, h in zip(rows["path"], rows["width"], rows["height"]):
            own = []
            for _ in range(N_OBJECTS):
                x0, y0 = rng.uniform(0, w * 0.6), rng.uniform(0, h * 0.6)
                own.append([x0, y0, x0 + rng.uniform(16, w * 0.4), y0 + rng.uniform(16, h * 0.4)])
            boxes.append(np.asarray(own, np.float32))
            items.append((str(data / Path(str(name)).name), boxes[-1]))
        store.write_shard(
            cache / "objects" / shard.name,
            {
                "ids": rows["ids"],
                "obj_offsets": np.arange(0, N_OBJECTS * len(boxes) + 1, N_OBJECTS),
                "obj_boxes": np.concatenate(boxes),
                "obj_phrase": rng.choice(PHRASES, N_OBJECTS * len(boxes)).astype(object),
            },
            {"stage": "objects", "params_hash": "synthetic"},
        )
    return cache, items


_RESIZE = (
    {"image_transform": "resize_center_crop"}
    if "image_transform" in EncodeConfig.__dataclass_fields__
    else {}
)


def stage_params(workers: int) -> Any:
    return params_from_dict(
        {
            "models": {"preset": "tiny"},
            "base": {"decode_workers": workers, "device": "cpu"},
            # open_clip's resize of the whole image, the bare loop's work (and the only
            # transform before encode.image_transform existed).
            "encode": {"batch_size": CUDA_BATCH, **_RESIZE},
        }
    )


def run_stage(cache: Path, workers: int) -> dict[str, float]:
    """The encode stage with the instant CLIP into a fresh folder."""
    p = stage_params(workers)
    out = cache / "clip"
    shutil.rmtree(out, ignore_errors=True)
    clear_text_memo()
    start = time.perf_counter()
    timings = run_encode(
        cache / "ingest",
        cache / "captions",
        cache / "objects",
        out,
        cfg=p.encode,
        crop_padding=p.ground.crop_padding,
        models=p.models,
        base=p.base,
        dataset="bench",
    )
    wall = time.perf_counter() - start
    return {"wall": wall, "read": timings["seconds"]["read"], "n": timings["n_processed"]}


class _BareWork:
    """The bare loop's per-image work: decode, crops, CLIP preprocessing, nothing kept."""

    def __init__(self, preprocess: Any, padding: float) -> None:
        self.preprocess = preprocess
        self.padding = padding

    def __call__(self, item: tuple[str, np.ndarray]) -> int:
        path, boxes = item
        image = load_rgb(path, True)
        views = [image, *(crop_box(image, b, self.padding) for b in boxes)]
        return sum(int(self.preprocess(v).shape[0]) for v in views)


def run_bare(items: list[tuple[str, np.ndarray]], work: _BareWork, workers: int) -> float:
    start = time.perf_counter()
    if workers:
        # One torch thread per process, as in torch's DataLoader workers (a forked child using
        # the parent's OpenMP pool can hang).
        with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
            for _ in pool.imap(work, items, chunksize=8):
                pass
    else:
        for item in items:
            work(item)
    return time.perf_counter() - start


def bytes_per_image(load: EncodeLoad, item: tuple[str, np.ndarray]) -> int:
    """Bytes of tensors one image's sample carries from a decode worker to the main process."""
    sample = load((item[0], True, item[1]))
    return sum(v.nbytes for v in sample.values() if isinstance(v, torch.Tensor))


def bench_size(work: Path, label: str, size: tuple[int, int], args: Any) -> dict[str, Any]:
    images = write_images(work / label, args.n_images, *size, seed=hash(label) % 1000)
    cache, items = prepare(work / f"{label}_cache", images)
    p = stage_params(args.workers)
    instant = install_instant_clip(p)
    load = EncodeLoad(getattr(instant, "pixels", instant.preprocess), p.ground.crop_padding)
    bare_work = _BareWork(instant.preprocess, p.ground.crop_padding)
    stage_runs, bare_runs = [], []
    for _ in range(args.rounds):
        stage_runs.append(run_stage(cache, args.workers))
        bare_runs.append(run_bare(items, bare_work, args.workers))
    n = args.n_images
    stage_rate = statistics.median(n / r["wall"] for r in stage_runs)
    bare_rate = statistics.median(n / s for s in bare_runs)
    return {
        "label": label,
        "stage": stage_rate,
        "bare": bare_rate,
        "ratio": statistics.median(
            (n / r["wall"]) / (n / s) for r, s in zip(stage_runs, bare_runs)
        ),
        "wait": statistics.median(r["read"] / r["wall"] for r in stage_runs),
        "bytes": bytes_per_image(load, items[0]),
        # Before the Feeder, the reader cut the workers to the batches per shard.
        "used": args.workers
        if hasattr(reader, "Feeder")
        else min(args.workers, -(-SHARD // CUDA_BATCH)),
        "rounds": [
            (round(n / r["wall"], 1), round(n / s, 1)) for r, s in zip(stage_runs, bare_runs)
        ],
    }


BEFORE_POST = "5a2083d"  # the last commit with the per-token, per-box post-processing


def ground_post(n_images: int, rounds: int) -> None:
    import subprocess
    import types

    from pipeline.models.grounding import GroundingDinoGrounder

    now = GroundingDinoGrounder.load(preset="tiny", device="cpu", dtype="float32", seed=0)
    # One torch thread: on a shared machine, intra-op threads on these small tensors measure
    # the waits for busy cores rather than the work (both sides alike).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = subprocess.run(
        ["git", "show", f"{BEFORE_POST}:pipeline/models/grounding.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    module = types.ModuleType("grounding_before")
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(source, "grounding_before.py", "exec"), module.__dict__)  # noqa: S102
    before = object.__new__(module.GroundingDinoGrounder)
    before.__dict__.update({k: v for k, v in now.__dict__.items() if not k.startswith("_")})
    rng = np.random.default_rng(0)
    captions = [
        "a red car parked next to a tree on the street.",
        "a man riding a bicycle past a dog and a bench.",
        "two people sitting on a sofa in a living room.",
        "a bowl of fruit on a wooden kitchen table.",
    ]
    cases = []
    n_tokens, n_boxes, size = 40, 100, (480, 640)
    for i in range(n_images):
        query = captions[i % len(captions)]
        enc = now.processor.tokenizer(query, return_tensors="pt")
        ids = torch.zeros(n_tokens, dtype=torch.long)
        mask = torch.zeros(n_tokens, dtype=torch.long)
        ids[: enc["input_ids"].shape[1]] = enc["input_ids"][0]
        mask[: enc["input_ids"].shape[1]] = 1
        probs = torch.tensor(rng.uniform(0, 1, (n_boxes, n_tokens)), dtype=torch.float32)
        xy = rng.uniform(-20, 600, (n_boxes, 2))
        wh = rng.uniform(2, 200, (n_boxes, 2))
        boxes = torch.tensor(np.concatenate([xy, xy + wh], 1), dtype=torch.float32)
        detection = {"scores": probs.max(dim=-1).values, "boxes": boxes}
        cases.append((detection, probs, ids, mask, query))

    max_objects = GroundConfig().max_objects  # the default: objects kept per image

    def run(grounder: Any) -> tuple[float, list[Any]]:
        start = time.process_time()
        found = [
            grounder._objects(
                d,
                p,
                i,
                m,
                size,
                0.0,
                0.75,
                max_objects,
                query=q,
                iou_threshold=0.8,
                min_box_side=8.0,
            )
            for d, p, i, m, q in cases
        ]
        seconds = time.process_time() - start
        return seconds, [[(o.box, o.phrase, o.score) for o in objs] for objs in found]

    times: dict[str, list[float]] = {"before": [], "now": []}
    outputs: dict[str, list[Any]] = {}
    for _ in range(rounds):
        for name, grounder in (("before", before), ("now", now)):
            seconds, outputs[name] = run(grounder)
            times[name].append(seconds)
    per_box = {k: 1e6 * statistics.median(v) / (n_images * n_boxes) for k, v in times.items()}
    print(
        f"ground post-processing, {n_images} images x {n_boxes} raw boxes, {n_tokens} tokens, "
        f"max_objects {max_objects}: "
        f"{BEFORE_POST} {per_box['before']:.1f} us CPU per raw box, now {per_box['now']:.1f} "
        f"({per_box['now'] / per_box['before']:.2f} x); same boxes and phrases: "
        f"{outputs['before'] == outputs['now']} (median of {rounds} alternated rounds, 1 "
        "torch thread)"
    )
    torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n-images", type=int, default=192)
    ap.add_argument("--rounds", type=int, default=2, help="alternations of stage and bare loop")
    ap.add_argument("--workers", type=int, default=2, help="decode processes on both sides")
    ap.add_argument("--ground-post", type=int, default=0, help="images for the ground check")
    ap.add_argument("--skip-encode", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="misalign-bench-feed-"))
    try:
        print(
            f"encode stage with an instant CLIP vs bare decode+crops+preprocess loop; "
            f"{args.n_images} distinct JPEGs per size, {N_OBJECTS} crops each, batch "
            f"{CUDA_BATCH}, shard {SHARD}, {args.workers} processes each side, "
            f"{reader.available_cpus()} CPUs visible; median of {args.rounds} alternated rounds"
        )
        print(
            f"{'images':>10} {'stage img/s':>12} {'bare img/s':>11} {'ratio':>6} "
            f"{'reader wait':>12} {'bytes/img':>10} {'workers':>8}  rounds (stage, bare)"
        )
        if args.ground_post:
            ground_post(args.ground_post, args.rounds)
        for label, size in (
            ()
            if args.skip_encode
            else (
                ("384x288", (384, 288)),
                ("1024x1024", (1024, 1024)),
            )
        ):
            r = bench_size(work, label, size, args)
            print(
                f"{r['label']:>10} {r['stage']:12.1f} {r['bare']:11.1f} {r['ratio']:6.2f} "
                f"{r['wait']:11.0%} {r['bytes']:10,d} {r['used']:8d}  {r['rounds']}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
