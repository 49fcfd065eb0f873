"""Feeding benchmark: can the stages' CPU side keep a GPU busy? Side by side in one run.

(Over 500 lines: the three stages' instant models, their bare loops and the ground
post-processing check live in one script so that one run prints them side by side.)

Caption, ground and encode run through their real stage code (`run_caption`, `run_ground`,
`run_encode`: the reader and its decode workers, the processors, copies, post-processing, text
memo, HDF5 writes) with INSTANT models, stand-ins for the device: they take the batch and
answer at once with outputs of the right shape, placed in this process's loaded-model table by
this script only (no param reaches them). So a stage's images/s is what its CPU side can feed.
Each stage is compared with a bare loop that runs the stage's own per-image work (its decode
worker's `load`: decode, crops, preprocessing) in the same number of processes and keeps
nothing. Stage and bare loop alternate over rounds, on a few hundred distinct JPEGs at 384x288
and 1024x1024, at the CUDA sizes (forward batch = the params' batch x cuda_batch_scale 4:
caption 32, ground 16, encode 64; shard 64).

What is device work and what is not: on CUDA the float conversion and CLIP normalisation of
the encode stage's uint8 views run on the GPU, so the instant CLIP does not do them (neither does
the bare loop); what the host does on CUDA beyond the bare loop is one copy of each batch into
pinned memory, which every instant model does (a copy of its input tensors) in its place. The
processors of caption and ground give float tensors on the host on both sides alike.
GroundingDINO's post-processing (upstream's and the project's) runs in the stage's main
process on the instant detector's outputs (900 queries, 256 text positions, fixed random
logits with 30 queries over the thresholds), as on a GPU; the bare loop has no such work.

The instant captioner and grounder are the tiny models' wrappers with the REAL models'
processor sizes (BLIP-2: 224 x 224; GroundingDINO: shortest side 800, longest 1333), since
the feeding cost is the processor's. The instant CLIP has the tiny CLIP's preprocessing, which
is ViT-L/14's (224 px).

Printed per stage and image size: images/s of stage and bare loop, their ratio, the stage's
reader-wait share of its wall time, its decode workers, and the bytes per image that cross
between processes.

With `--ground-post N`: GroundingDINO's post-processing (`_objects`, the main process's
work per image after the forward) on N images of synthetic raw boxes, today's vectorised code
against the per-token, per-box version of commit 5a2083d (read from git), alternated: CPU
seconds per raw box, and whether both give the same boxes and phrases.

    python bench/bench_feed.py [--n-images 192] [--rounds 2] [--workers 2] \
        [--stages caption,ground,encode] [--ground-post 64]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._synthetic import encode_inputs, synthetic_images  # noqa: E402
from pipeline.config import GroundConfig, params_from_dict  # noqa: E402
from pipeline.extract import loaded  # noqa: E402
from pipeline.extract.base import Feed, decode_workers  # noqa: E402
from pipeline.extract.caption import CaptionStep, run_caption  # noqa: E402
from pipeline.extract.encode import EncodeStep, clear_text_memo, run_encode  # noqa: E402
from pipeline.extract.ground import GroundStep, run_ground  # noqa: E402
from pipeline.models.clip import ClipEncoder  # noqa: E402
from pipeline.rows import reader  # noqa: E402

N_OBJECTS = 3
SHARD = 64  # ingest.shard_size
SCALE = 4  # base.cuda_batch_scale: the CUDA batch sizes are the params' x this
# The real models' processor sizes, which the instant captioner and grounder use.
BLIP2_SIZE = {"height": 224, "width": 224}
GDINO_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
GDINO_QUERIES = 900  # grounding-dino-base's num_queries
GDINO_HITS = 30  # raw boxes over the thresholds per image from the instant detector


def params(workers: int) -> Any:
    """The tiny preset at the CUDA batch sizes, CPU device, `workers` decode processes."""
    from pipeline.config import CaptionConfig, EncodeConfig

    return params_from_dict(
        {
            "models": {"preset": "tiny"},
            "ingest": {"shard_size": SHARD},
            "base": {"decode_workers": workers, "device": "cpu"},
            "caption": {"source": "blip2", "batch_size": CaptionConfig().batch_size * SCALE},
            "ground": {"batch_size": GroundConfig().batch_size * SCALE},
            # open_clip's resize of the whole image (the crops' transform too).
            "encode": {
                "batch_size": EncodeConfig().batch_size * SCALE,
                "image_transform": "resize_center_crop",
            },
        }
    )


_PINNED: dict[tuple[Any, ...], torch.Tensor] = {}


def _pin_copy(tensors: Any) -> None:
    """What the host does on CUDA before the device takes a batch: one copy into pinned memory
    (into a kept buffer, as torch's caching host allocator reuses its pinned blocks)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            key = (tuple(t.shape), t.dtype)
            if key not in _PINNED:
                _PINNED[key] = torch.empty_like(t)
            _PINNED[key].copy_(t)


class _InstantClip(ClipEncoder):
    """CLIP whose towers answer at once (zeros of the embedding width); the normalisation of
    the uint8 views is the device's work, so only the host's pinned copy is done."""

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        _pin_copy([pixels])
        return pixels

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(self.normalise(pixels)), self.dim)

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(tokens), self.dim)


class _InstantDetector:
    """GroundingDINO's forward, at once: fixed random logits over 900 queries and 256 text
    positions (-inf past the query's tokens, as the model) and boxes (cxcywh in [0, 1]),
    with the model's config."""

    def __init__(self, config: Any) -> None:
        self.config = config
        gen = torch.Generator().manual_seed(0)
        n = config.max_text_len
        # Most queries well under the thresholds; GDINO_HITS of them sure of 3 of the first
        # 8 tokens (every query has them), as a real detection of a few objects looks.
        self.logits = torch.randn(1, GDINO_QUERIES, n, generator=gen) * 0.5 - 6.0
        hits = torch.randperm(GDINO_QUERIES, generator=gen)[:GDINO_HITS]
        for q in hits.tolist():
            self.logits[0, q, torch.randperm(8, generator=gen)[:3] + 1] = 1.0
        centre = torch.rand(1, GDINO_QUERIES, 2, generator=gen) * 0.8 + 0.1
        side = torch.rand(1, GDINO_QUERIES, 2, generator=gen) * 0.3 + 0.02
        self.boxes = torch.cat([centre, side], -1)
        self.masked: dict[int, torch.Tensor] = {}

    def __call__(self, **inputs: Any) -> Any:
        _pin_copy(inputs.values())
        b, length = inputs["input_ids"].shape
        if length not in self.masked:  # as the model: -inf past the query's tokens
            self.masked[length] = self.logits.clone()
            self.masked[length][..., length:] = -float("inf")
        return types.SimpleNamespace(
            logits=self.masked[length].expand(b, -1, -1), pred_boxes=self.boxes.expand(b, -1, -1)
        )


def _sized(processor: Any, size: dict[str, int]) -> Any:
    """A copy of `processor` whose image processor resizes to `size`."""
    out = copy.deepcopy(processor)
    out.image_processor.size = size
    return out


def install_instant_models(p: Any) -> None:
    """Put the instant CLIP, captioner and grounder into the loaded-model table under the keys
    the stages will look up (the tiny models' identities, so the rows' keys are unchanged)."""
    key = repr((p.models, p.base.seed, p.base.device, p.base.dtype))
    real = loaded.loaded_model("clip", p.models, p.base)
    loaded._LOADED[("clip", key)] = _InstantClip(
        real.model, real.preprocess, real.tokenizer, real.name, real.weights_id, "cpu", real.dtype
    )
    captioner = copy.copy(loaded.loaded_model(p.caption.model, p.models, p.base))
    captioner.processor = _sized(captioner.processor, BLIP2_SIZE)
    words = captioner.processor.tokenizer(" a photo of a thing", add_special_tokens=False)

    def generate(inputs: dict[str, Any], generation_config: Any) -> torch.Tensor:
        _pin_copy(inputs.values())
        ids = inputs["input_ids"]
        tail = torch.tensor(words["input_ids"], dtype=ids.dtype).expand(len(ids), -1)
        return torch.cat([ids, tail], 1)

    captioner.generate = generate
    loaded._LOADED[(p.caption.model, key)] = captioner
    grounder = copy.copy(loaded.loaded_model("grounder", p.models, p.base))
    grounder.processor = _sized(grounder.processor, GDINO_SIZE)
    grounder.model = _InstantDetector(grounder.model.config)
    loaded._LOADED[("grounder", key)] = grounder


def prepare(work: Path, images: list[Path], p: Any) -> Path:
    """Ingest shards of SHARD images, dataset captions (distinct per image) and N_OBJECTS
    synthesised boxes per image as the objects shards; returns the cache folder."""
    cache = work / "cache"
    dataset_captions = dataclasses.replace(
        p, caption=dataclasses.replace(p.caption, source="dataset")
    )
    encode_inputs(
        images,
        cache,
        dataset_captions,
        dataset="bench",
        caption="a photo of thing with a car and a tree",
        per_image=N_OBJECTS,
    )
    return cache


def _steps(cache: Path, p: Any) -> dict[str, Any]:
    """Each stage's step object (for its feed: the items and the workers' `load`)."""
    args = {"models": p.models, "base": p.base, "dataset": "bench"}
    return {
        "caption": CaptionStep(cache / "ingest", p.caption, **args),
        "ground": GroundStep(cache / "ingest", cache / "captions", p.ground, **args),
        "encode": EncodeStep(
            cache / "ingest",
            cache / "captions",
            cache / "objects",
            p.encode,
            p.ground.crop_padding,
            **args,
        ),
    }


def run_stage(stage: str, cache: Path, p: Any) -> dict[str, float]:
    """One stage through its real code with the instant models, into a fresh folder."""
    out = cache / f"out_{stage}"
    shutil.rmtree(out, ignore_errors=True)
    clear_text_memo()
    args = {"models": p.models, "base": p.base, "dataset": "bench"}
    # The main process's torch threads as on CUDA (the feeder sets them for CUDA jobs; code
    # from before that did not: the script can be run against it, see `--code`).
    threads = torch.get_num_threads()
    if hasattr(reader, "main_threads"):
        torch.set_num_threads(min(threads, reader.main_threads(decode_workers(p.base))))
    start = time.perf_counter()
    if stage == "caption":
        timings = run_caption(cache / "ingest", out, cfg=p.caption, **args)
    elif stage == "ground":
        timings = run_ground(cache / "ingest", cache / "captions", out, cfg=p.ground, **args)
    else:
        timings = run_encode(
            cache / "ingest",
            cache / "captions",
            cache / "objects",
            out,
            cfg=p.encode,
            crop_padding=p.ground.crop_padding,
            **args,
        )
    wall = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {"wall": wall, "read": timings["seconds"]["read"], "n": timings["n_processed"]}


def feeds(stage: str, cache: Path, p: Any) -> list[Feed]:
    """The stage's feed per shard (what its decode workers get)."""
    step = _steps(cache, p)[stage]
    return [step.feed(step.read(i)) for i in range(step.n_shards())]


class _Discard:
    """The bare loop's per-image work: the stage's own `load`, its result dropped."""

    def __init__(self, load: Callable[[Any], Any]) -> None:
        self.load = load

    def __call__(self, item: Any) -> int:
        self.load(item)
        return 0


def run_bare(work: list[tuple[Callable[[Any], Any], Any]], workers: int) -> float:
    start = time.perf_counter()
    if workers:
        # One torch thread per process, as in the decode workers.
        with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
            for _ in pool.imap(_call, work, chunksize=8):
                pass
    else:
        for item in work:
            _call(item)
    return time.perf_counter() - start


def _call(pair: tuple[Callable[[Any], Any], Any]) -> Any:
    return pair[0](pair[1])


def bytes_per_image(stage: str, feed: Feed) -> int:
    """Bytes of tensors one image's sample carries from a decode worker to the main process
    (a packed tensor is written into the shared batch buffer instead: counted too)."""
    sample = feed.load(feed.items[0])
    return sum(v.nbytes for v in sample.values() if isinstance(v, torch.Tensor))


def bench_size(work: Path, label: str, size: tuple[int, int], args: Any) -> list[dict[str, Any]]:
    images = synthetic_images(
        work / label, n=args.n_images, width=size[0], height=size[1], seed=sum(size)
    )
    p = params(args.workers)
    install_instant_models(p)
    cache = prepare(work / f"{label}_cache", images, p)
    results = []
    for stage in args.stages:
        shard_feeds = feeds(stage, cache, p)
        bare = [(_Discard(f.load), item) for f in shard_feeds for item in f.items]
        stage_runs, bare_runs = [], []
        for _ in range(args.rounds):
            stage_runs.append(run_stage(stage, cache, p))
            bare_runs.append(run_bare(bare, args.workers))
        n = args.n_images
        results.append(
            {
                "label": f"{stage} {label}",
                "stage": statistics.median(n / r["wall"] for r in stage_runs),
                "bare": statistics.median(n / s for s in bare_runs),
                "ratio": statistics.median(
                    (n / r["wall"]) / (n / s) for r, s in zip(stage_runs, bare_runs)
                ),
                "wait": statistics.median(r["read"] / r["wall"] for r in stage_runs),
                "bytes": bytes_per_image(stage, shard_feeds[0]),
                "batch": shard_feeds[0].batch_size,
                "workers": reader.usable_workers(decode_workers(p.base)),
                "rounds": [
                    (round(n / r["wall"], 1), round(n / s, 1))
                    for r, s in zip(stage_runs, bare_runs)
                ],
            }
        )
    return results


BEFORE_POST = "5a2083d"  # the last commit with the per-token, per-box post-processing


def ground_post(n_images: int, rounds: int) -> None:
    import subprocess

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
    ap.add_argument("--stages", default="caption,ground,encode", help="comma-separated")
    ap.add_argument("--sizes", default="384x288,1024x1024", help="comma-separated WxH")
    ap.add_argument("--ground-post", type=int, default=0, help="images for the ground check")
    args = ap.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="misalign-bench-feed-"))
    try:
        if args.ground_post:
            ground_post(args.ground_post, args.rounds)
        print(
            f"stages with instant models vs bare loops of their per-image work; "
            f"{args.n_images} distinct JPEGs per size ({N_OBJECTS} boxes each), shard {SHARD}, "
            f"{args.workers} processes each side, {reader.available_cpus()} CPUs visible; "
            f"median of {args.rounds} alternated rounds"
        )
        print(
            f"{'stage images':>18} {'batch':>5} {'stage img/s':>12} {'bare img/s':>11} "
            f"{'ratio':>6} {'reader wait':>12} {'bytes/img':>10} {'workers':>8}  rounds (stage, bare)"
        )
        for label in [s for s in args.sizes.split(",") if s]:
            w, h = (int(v) for v in label.split("x"))
            for r in bench_size(work, label, (w, h), args):
                print(
                    f"{r['label']:>18} {r['batch']:5d} {r['stage']:12.1f} {r['bare']:11.1f} "
                    f"{r['ratio']:6.2f} {r['wait']:11.0%} {r['bytes']:10,d} {r['workers']:8d}  "
                    f"{r['rounds']}",
                    flush=True,
                )
    finally:
        reader.close_feeders()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
