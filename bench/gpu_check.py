"""One GPU check: bare ViT-L/14 forward vs the pipeline's encode stage, GroundingDINO, BLIP-2.

Runs in under 8 minutes on one CUDA GPU with random weights (no downloads, no DVC) and writes
every figure to one JSON file:

- ``clip_bare``: images/s of ViT-L/14 ``encode_image`` alone (random weights) in float16 and
  bfloat16, eager and through ``torch.compile``, on the synthetic images already preprocessed
  and on the device;
- ``clip_pipeline``: images/s of the pipeline's encode stage (`pipeline.extract.encode.run_encode`,
  the parallel reader feeding it) on the same images in the DEFAULT configuration (shard size,
  encode batch x cuda_batch_scale, decode workers, dtype ``auto``; 3 objects per image as
  grounding gives them, so 4 views per image; 1024×1024 JPEGs), the same random weights loaded
  from a checkpoint file the way real weights are; and the ratio to the bare forward;
- ``clip_pipeline_gpu_decode``: the same with ``base.decode: gpu`` (nvJPEG decoding and the
  crops and CLIP sizing on the GPU; ``decoder`` says whether it ran or fell back to the CPU);
- every section's peak GPU memory on its own (the peak is reset per section);
- ``grounding_dino`` and ``blip2``: seconds per batch and images/s of the pipeline's
  GroundingDINO (grounding-dino-base config, 800/1333 px) and BLIP-2 (opt-2.7b config, 3 beams,
  30 new tokens forced) wrappers, random weights, for a few batches.

It needs only torch, transformers, timm, h5py, open_clip and ftfy (open_clip and ftfy may be
installed without their dependencies); everything else is imported only when present.
`--dry-run` does the same on the CPU with tiny configs and a couple of images (the test suite
runs it).

    python bench/gpu_check.py --out gpu_check.json
    python bench/gpu_check.py --dry-run --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._synthetic import encode_inputs, synthetic_images  # noqa: E402

logger = logging.getLogger("gpu_check")

CLIP_ARCH = "ViT-L-14"
CAPTION = "a red car parked next to a tree on the street"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Seconds per call of `fn` over `repeats` calls, after one warm-up call."""
    out = fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats, out


def _open_clip_model(arch: str, quick_gelu: bool) -> Any:
    import open_clip

    return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)


def clip_bare(
    model: Any,
    pixels: torch.Tensor,
    device: str,
    dtypes: list[torch.dtype],
    batch: int,
    repeats: int = 3,
    compiled: bool = False,
) -> dict[str, Any]:
    """images/s of `encode_image` alone, per dtype, on pixels already on the device; with
    `compiled`, also through `torch.compile` (the headroom beyond eager mode)."""
    out: dict[str, Any] = {}
    for dtype in dtypes:
        m = model.to(device, dtype).eval()
        x = pixels.to(device, dtype)
        chunks = [x[s : s + batch] for s in range(0, len(x), batch)]

        def run(m: Any = m, chunks: list[torch.Tensor] = chunks) -> None:
            with torch.inference_mode():
                for c in chunks:
                    m.encode_image(c)

        seconds, _ = _timed(device, run, repeats=repeats)
        out[str(dtype).replace("torch.", "")] = {
            "images_per_second": round(len(x) / seconds, 2),
            "seconds_per_pass": round(seconds, 4),
            "batch_size": batch,
        }
        if compiled:
            fast = torch.compile(m.encode_image)

            def run_compiled(fast: Any = fast, chunks: list[torch.Tensor] = chunks) -> None:
                with torch.inference_mode():
                    for c in chunks:
                        fast(c)

            run_compiled()  # compilation is not what is measured
            seconds, _ = _timed(device, run_compiled, repeats=repeats)
            out[str(dtype).replace("torch.", "") + "_compiled"] = {
                "images_per_second": round(len(x) / seconds, 2),
                "batch_size": batch,
            }
    model.to("cpu", torch.float32)
    return out


def clip_pipeline(
    work: Path,
    images: list[Path],
    checkpoint: Path,
    arch: str,
    device: str,
    dtype: str,
    batch_images: int,
    decode_workers: int,
    warm_up: bool = True,
    decode: str = "cpu",
) -> dict[str, Any]:
    """The encode stage on the images at the default sizes (dataset captions, objects as
    grounding gives them), model pre-loaded; `batch_images` 0: encode.batch_size's default;
    `decode`: base.decode (gpu: nvJPEG where it works, else the CPU, see "decoder")."""
    from pipeline.config import params_from_dict
    from pipeline.extract.base import scaled_batch_size
    from pipeline.extract.device_decode import choose_decoder
    from pipeline.extract.encode import clear_text_memo, run_encode
    from pipeline.extract.loaded import loaded_model
    from pipeline.rows.reader import resolve_workers

    # The defaults a run uses (shard size, encode batch x cuda_batch_scale on CUDA, decode
    # workers), only the weights and the device set here; objects as grounding gives them.
    params = params_from_dict(
        {
            "base": {
                "device": device,
                "dtype": dtype,
                "decode_workers": decode_workers,
                "decode": decode,
            },
            "models": {"clip": {"id": arch, "pretrained": "openai", "path": str(checkpoint)}},
            "caption": {"source": "dataset"},
            "encode": {"batch_size": batch_images} if batch_images else {},
        }
    )
    cache = work / f"cache_{decode}"
    p = params
    encode_inputs(
        images, cache, p, dataset="gpu_check", caption=CAPTION, per_image=OBJECTS_PER_IMAGE
    )
    clip = loaded_model("clip", p.models, p.base)  # loading is not what is measured

    def encode() -> dict[str, Any]:
        shutil.rmtree(cache / "clip", ignore_errors=True)
        clear_text_memo()
        return run_encode(
            cache / "ingest",
            cache / "captions",
            cache / "objects",
            cache / "clip",
            cfg=p.encode,
            crop_padding=p.ground.crop_padding,
            models=p.models,
            base=p.base,
            dataset="gpu_check",
        )

    if warm_up:
        encode()  # CUDA kernels, allocator, file cache
    _sync(device)
    start = time.perf_counter()
    timings = encode()
    _sync(device)
    wall = time.perf_counter() - start
    return {
        "images_per_second": round(len(images) / wall, 2),
        "wall_seconds": round(wall, 3),
        "stage_timings": timings,
        "decode_workers": resolve_workers(decode_workers),
        "batch_size": scaled_batch_size(p.encode.batch_size, p.base),
        "shard_size": p.ingest.shard_size,
        "objects_per_image": OBJECTS_PER_IMAGE,
        "dtype": str(clip.dtype).replace("torch.", ""),
        "decoder": choose_decoder(decode, device, host_image_needed=False),
        "note": "whole stage: read shards, decode+preprocess (reader), image and caption "
        "forwards, write shard",
    }


OBJECTS_PER_IMAGE = 3  # a typical grounded caption: 3 object crops beside the whole image


def _grounder(device: str, dtype: torch.dtype, dry: bool, work: Path) -> Any:
    from pipeline.models.grounding import GroundingDinoGrounder

    if dry:
        return GroundingDinoGrounder.load(preset="tiny", device=device, dtype=dtype)
    from transformers import (
        AutoTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from pipeline.models.hf import write_tiny_wordpiece_tokenizer

    # IDEA-Research/grounding-dino-base: Swin-B (384 px windows 12), BERT-base text encoder.
    config = GroundingDinoConfig(
        backbone_config={
            "model_type": "swin",
            "embed_dim": 128,
            "depths": [2, 2, 18, 2],
            "num_heads": [4, 8, 16, 32],
            "window_size": 12,
            "image_size": 384,
            "out_indices": [2, 3, 4],
        },
    )
    with torch.device(device):
        model = GroundingDinoForObjectDetection._from_config(config, dtype=dtype).eval()
    # A bert-base-uncased-shaped WordPiece vocabulary (same special-token ids) for the text.
    write_tiny_wordpiece_tokenizer(work / "gdino_tok", model_max_length=256)
    processor = GroundingDinoProcessor(
        GroundingDinoImageProcessor(size={"shortest_edge": 800, "longest_edge": 1333}),
        AutoTokenizer.from_pretrained(work / "gdino_tok"),
    )
    return GroundingDinoGrounder(
        model, processor, "grounding-dino-base(random)", "random", "paper", device, dtype
    )


def _captioner(device: str, dtype: torch.dtype, dry: bool, work: Path) -> Any:
    from pipeline.models.blip2 import Blip2Captioner

    if dry:
        return Blip2Captioner.load(preset="tiny", device=device, dtype=dtype)
    from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

    # The tiny builder's BPE tokenizer and processor, at the real model's 224 px and 32 queries.
    Blip2Captioner._build_tiny(work / "blip2_tiny")
    processor = AutoProcessor.from_pretrained(work / "blip2_tiny")
    processor.image_processor.size = {"height": 224, "width": 224}
    processor.num_query_tokens = 32
    tok = processor.tokenizer
    # Salesforce/blip2-opt-2.7b: ViT-g/14 (39 layers, 1408 wide), Q-Former, OPT-2.7b.
    config = Blip2Config(
        vision_config={
            "hidden_size": 1408,
            "intermediate_size": 6144,
            "num_hidden_layers": 39,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
            "qkv_bias": True,
        },
        qformer_config={"encoder_hidden_size": 1408},
        text_config={
            "model_type": "opt",
            "vocab_size": 50272,
            "hidden_size": 2560,
            "word_embed_proj_dim": 2560,
            "ffn_dim": 10240,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "max_position_embeddings": 2048,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        num_query_tokens=32,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    with torch.device(device):
        model = Blip2ForConditionalGeneration._from_config(config, dtype=dtype).eval()
    captioner = Blip2Captioner(
        model, processor, "blip2-opt-2.7b(random)", "random", "paper", device, dtype
    )
    captioner._after_load()
    return captioner


def hf_model(
    kind: str,
    images: list[Path],
    device: str,
    dtype: torch.dtype,
    dry: bool,
    work: Path,
    batch: int,
    n_batches: int,
) -> dict[str, Any]:
    """Seconds per batch of the pipeline's wrapper (processor + model + post-processing)."""
    from pipeline.data.images import load_rgb

    start = time.perf_counter()
    model = (_grounder if kind == "grounding_dino" else _captioner)(device, dtype, dry, work)
    built = time.perf_counter() - start
    if kind == "blip2":
        # Random weights stop early on a random EOS; time full-length captions.
        model.model.generation_config.min_new_tokens = 30
    pil = [load_rgb(p) for p in images[: batch * (n_batches + 1)]]
    while len(pil) < batch * (n_batches + 1):
        pil += pil[: batch * (n_batches + 1) - len(pil)]

    def call(chunk: list[Any]) -> Any:
        if kind == "grounding_dino":
            return model.ground(chunk, [CAPTION] * len(chunk), box_threshold=0.3)
        return model.caption(chunk, num_beams=3, max_new_tokens=30)

    call(pil[:batch])  # warm-up
    _sync(device)
    seconds = []
    for k in range(1, n_batches + 1):
        t = time.perf_counter()
        call(pil[k * batch : (k + 1) * batch])
        _sync(device)
        seconds.append(time.perf_counter() - t)
    per_batch = float(np.median(seconds))
    info: dict[str, Any] = {
        "images_per_second": round(batch / per_batch, 3),
        "seconds_per_batch": [round(s, 4) for s in seconds],
        "batch_size": batch,
        "n_parameters": int(sum(p.numel() for p in model.model.parameters())),
        "build_seconds": round(built, 2),
        "attn_implementation": str(getattr(model.model.config, "_attn_implementation", "")),
        "dtype": str(dtype).replace("torch.", ""),
    }
    if device.startswith("cuda"):
        info["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    model.model.to("meta")  # frees the device memory before the next model is built
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return info


def _section(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one part; a failure is recorded (with its traceback) and the others still run."""
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # each section's peak is its own
    try:
        report[name] = fn()
    except Exception as err:  # noqa: BLE001 - a GPU check reports every failure, then goes on
        report[name] = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        logger.error("%s failed: %s", name, err)
    report.setdefault("section_seconds", {})[name] = round(time.perf_counter() - start, 2)
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        report.setdefault("section_peak_gib", {})[name] = round(peak, 2)
    logger.info("%s: %s", name, json.dumps(report[name], default=str)[:400])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json", help="JSON file for the figures")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, a few images")
    ap.add_argument("--n-images", type=int, default=None, help="synthetic images (default 1024)")
    ap.add_argument("--clip-batch", type=int, default=None, help="images per CLIP forward")
    ap.add_argument("--decode-workers", type=int, default=-1, help="base.decode_workers")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("pipeline", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    device = "cpu" if dry else "cuda"
    n_images = args.n_images or (3 if dry else 1024)
    clip_batch = args.clip_batch or 0  # 0: the params' default (x cuda_batch_scale on CUDA)
    bare_batch = clip_batch or (2 if dry else 64)
    arch = CLIP_ARCH
    quick_gelu = True  # the openai weights' activation (open_clip's pretrained cfg)
    if dry:
        from pipeline.models.clip import TINY_CLIP, register_tiny_config

        register_tiny_config()
        arch, quick_gelu = TINY_CLIP, False
    if dry:
        dtypes = [torch.float32]
        pipe_dtype = "float32"
        hf_dtype = torch.float32
    else:
        dtypes = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
        # What base.dtype=auto picks on CUDA (see pipeline.models.hf.resolve_dtype).
        hf_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        pipe_dtype = str(hf_dtype).replace("torch.", "")
    report: dict[str, Any] = {
        "dry_run": dry,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "n_images": n_images,
        "clip_arch": arch,
        "weights": "random (no downloads)",
    }
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except ImportError:
        pass
    total = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="misalign-gpu-check-"))
    try:
        side = 64 if dry else 1024  # square, as generators' outputs usually are
        images = synthetic_images(work / "images", n=n_images, width=side, height=side)
        torch.manual_seed(0)
        model = _open_clip_model(arch, quick_gelu)
        checkpoint = work / "clip_random.pt"
        torch.save(model.state_dict(), checkpoint)
        if "clip_bare" not in args.skip:

            def bare(model: Any = model) -> dict[str, Any]:
                import open_clip

                _, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=None, force_quick_gelu=quick_gelu
                )
                from pipeline.data.images import load_rgb

                pixels = torch.stack([preprocess(load_rgb(p)) for p in images])
                return clip_bare(model, pixels, device, dtypes, bare_batch, compiled=not dry)

            _section(report, "clip_bare", bare)
        model = None
        for section, decode in (("clip_pipeline", "cpu"), ("clip_pipeline_gpu_decode", "gpu")):
            if section in args.skip:
                continue
            _section(
                report,
                section,
                lambda decode=decode: clip_pipeline(  # type: ignore[misc]
                    work,
                    images,
                    checkpoint,
                    arch,
                    device,
                    pipe_dtype,
                    clip_batch,
                    args.decode_workers,
                    decode=decode,
                ),
            )
            bare_fig = report.get("clip_bare", {}).get(pipe_dtype, {}).get("images_per_second")
            pipe_fig = report[section].get("images_per_second")
            if bare_fig and pipe_fig:
                # Per view: the stage runs 1 + OBJECTS_PER_IMAGE image forwards per image.
                views = pipe_fig * (1 + OBJECTS_PER_IMAGE)
                report[f"{section}_over_bare"] = round(views / bare_fig, 4)
        from pipeline.extract.loaded import forget_loaded_models

        forget_loaded_models()
        if device == "cuda":
            torch.cuda.empty_cache()
        for kind, batch, n_batches in (("grounding_dino", 4, 3), ("blip2", 8, 3)):
            if kind in args.skip:
                continue
            b = 1 if dry else batch
            n = 1 if dry else n_batches
            _section(
                report,
                kind,
                lambda kind=kind, b=b, n=n: hf_model(
                    kind, images, device, hf_dtype, dry, work, b, n
                ),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - total, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    failed = [k for k, v in report.items() if isinstance(v, dict) and "error" in v]
    print(json.dumps({k: v for k, v in report.items() if k != "stage_timings"}, indent=2)[:6000])
    print(f"wrote {args.out}; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
