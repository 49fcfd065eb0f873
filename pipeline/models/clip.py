"""open_clip image/text encoder: real weights from a checkpoint file or cache, or a tiny preset."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import logs
from pipeline.config import ModelsConfig
from pipeline.errors import ConfigError, ModelFileError
from pipeline.models.hf import ModelWeightsMissing, hf_hub_cache, tiny_root
from pipeline.rows.atomic import atomic_path, write_text
from pipeline.rows.digest import file_digest
from pipeline.weight_files import check_weights_file

logger = logging.getLogger(__name__)


class ClipWeightsMissing(ModelWeightsMissing):
    """open_clip weights are neither at models.clip.path nor in a local cache."""

    def __init__(self, message: str, where: str = "") -> None:
        self.where = where
        RuntimeError.__init__(self, message)


#: models.clip.id's default (its one home is the schema).
DEFAULT_ARCH = ModelsConfig().clip.id


def tiny_cache_dir() -> Path:
    path = tiny_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


# The tiny preset's CLIP is a small random model of the architecture models.clip.id names: a
# ResNet tower for RN* ids, a ViT with the id's patch size and image size for ViT-* ids, widths
# and depths scaled down, the real BPE tokenizer and quick GELU. Each is registered with
# open_clip under `tiny_arch(id)` the way its own tests register configs, and saved and loaded
# as a checkpoint file exactly as real weights are.
TINY_PREFIX = "misalign-tiny-"
_TINY_EMBED = 32
_TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_TINY_VIT = {"layers": 2, "width": 64, "head_width": 32}
# ResNet: one bottleneck block per stage; 8 stem channels give a 256-wide attention pool.
_TINY_RESNET_WIDTH = 8


def tiny_arch(arch: str) -> str:
    """The open_clip name of the tiny model of architecture `arch` (e.g. ViT-B-16)."""
    return f"{TINY_PREFIX}{arch}"


def tiny_config(arch: str) -> dict[str, Any]:
    """The open_clip config of the tiny model of `arch`, derived from the real one's.

    Raises:
        ConfigError: `arch` is no open_clip architecture, or not one the tiny preset can shrink
            (a ResNet or ViT tower with open_clip's own text tower).
    """
    import open_clip

    real = open_clip.get_model_config(arch)
    if not real:
        raise ConfigError(
            f"models.clip.id={arch!r} is not an open_clip architecture; use one of "
            "open_clip.list_models(), e.g. ViT-L-14, ViT-B-16 or RN50"
        )
    vision, text = real.get("vision_cfg", {}), real.get("text_cfg", {})
    if any(k.startswith(("timm_", "hf_")) for k in (*vision, *text)) or real.get("custom_text"):
        raise ConfigError(
            f"models.preset=tiny builds small ResNet and ViT CLIPs only, and models.clip.id="
            f"{arch!r} has another tower (timm or Hugging Face); use e.g. ViT-L-14, ViT-B-16 or "
            "RN50 with the tiny preset, or the paper preset"
        )
    if isinstance(vision.get("layers"), (list, tuple)):  # open_clip's ModifiedResNet
        tower: dict[str, Any] = {
            "layers": [1] * len(vision["layers"]),
            "width": _TINY_RESNET_WIDTH,
            "patch_size": None,
        }
    else:
        tower = {**_TINY_VIT, "patch_size": int(vision["patch_size"])}
    return {
        "embed_dim": _TINY_EMBED,
        "quick_gelu": True,
        "vision_cfg": {"image_size": vision.get("image_size", 224), **tower},
        "text_cfg": dict(_TINY_TEXT),
    }


def register_tiny_config(arch: str = DEFAULT_ARCH) -> str:
    """Register the tiny model of `arch` with open_clip (idempotent); its open_clip name."""
    import open_clip

    name = tiny_arch(arch)
    if name in open_clip.list_models():
        return name
    cfg = tiny_config(arch)
    folder = tiny_cache_dir() / "open_clip_configs"
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{name}.json", json.dumps(cfg, indent=2))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


#: The tiny model of the default architecture (models.clip.id's default).
TINY_CLIP = tiny_arch(DEFAULT_ARCH)


def find_checkpoint(name: str, pretrained: str, path: str = "") -> Path:
    """`_find_checkpoint`, with the file's kind checked (no pickle, no TorchScript)."""
    found = _find_checkpoint(name, pretrained, path)
    check_weights_file(found, f"CLIP {name}/{pretrained}")
    return found


def _find_checkpoint(name: str, pretrained: str, path: str = "") -> Path:
    """Locate the weights file for `name`/`pretrained` without any download.

    Looks at `path` if given, else in the Hugging Face cache (the repo open_clip prefers) and
    open_clip's URL cache (~/.cache/clip).

    Raises:
        ModelWeightsMissing: naming the model, every place looked, and the fix.
    """
    import open_clip

    looked: list[str] = []
    if path:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        looked.append(str(p))
    else:
        cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
        if not cfg:
            raise ClipWeightsMissing(
                f"open_clip has no pretrained tag {pretrained!r} for {name!r}; known tags: "
                f"{', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}. Set "
                "models.clip.pretrained, or models.clip.path to a checkpoint file"
            )
        hub, filenames = hub_files(cfg)
        if hub:
            from huggingface_hub import try_to_load_from_cache

            for filename in filenames:
                hit = try_to_load_from_cache(hub, filename, cache_dir=hf_hub_cache())
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
            looked.append(f"{hf_hub_cache()} (repo {hub})")
        url = cfg.get("url") or ""
        if url:
            target = Path("~/.cache/clip").expanduser() / os.path.basename(url)
            if target.is_file():
                return target
            looked.append(str(target))
    raise ClipWeightsMissing(
        f"model weights for '{name}/{pretrained}' not found; looked in: {'; '.join(looked)}. "
        "Fix: on a machine with network run `misalign weights fetch` to fill the cache, or "
        "set models.clip.path to a local checkpoint file, or run the offline smoke run "
        "`dvc exp run -S models.preset=tiny`",
        "; ".join(looked),
    )


def hub_files(cfg: dict) -> tuple[str, list[str]]:
    """The hub repo of an open_clip pretrained cfg and the files to look for, in open_clip's
    order: `hf_hub` is `org/repo/` (the default file name) or `org/repo/filename`, and a
    safetensors twin of a .bin/.pth file is preferred."""
    hub = cfg.get("hf_hub") or ""
    if not hub:
        return "", []
    repo, filename = os.path.split(hub)
    filename = filename or "open_clip_pytorch_model.bin"
    if filename == "open_clip_pytorch_model.bin":
        safe = ["open_clip_model.safetensors"]
    elif filename.endswith((".bin", ".pth")):
        safe = [filename[:-4] + ".safetensors"]
    else:
        safe = []
    return repo, [*safe, filename]


def _preprocess_kwargs(cfg: dict) -> dict:
    """The tag's own preprocessing (mean, std, interpolation, resize mode), which open_clip
    applies when given the tag but not when given a checkpoint file."""
    keys = {
        "mean": "image_mean",
        "std": "image_std",
        "interpolation": "image_interpolation",
        "resize_mode": "image_resize_mode",
    }
    return {
        arg: tuple(cfg[k]) if k in ("mean", "std") else cfg[k]
        for k, arg in keys.items()
        if cfg.get(k)
    }


def tiny_weights_id(seed: int, arch: str = DEFAULT_ARCH) -> str:
    """Identity of the tiny preset's CLIP: its architecture and seed (part of the row key)."""
    return f"{tiny_arch(arch)}/random-seed{seed}"


def checkpoint_weights_id(name: str, pretrained: str, checkpoint: str | os.PathLike[str]) -> str:
    """Identity of real CLIP weights: the checkpoint file's content hash (computed once per
    file version, see `pipeline.rows.digest`), so new weights at the same path are new rows."""
    return f"{name}/{pretrained or 'file'}@sha256:{file_digest(checkpoint)[:16]}"


def tiny_checkpoint(seed: int, arch: str = DEFAULT_ARCH) -> Path:
    """Seeded random weights of the tiny model of `arch`, saved once as a checkpoint file (its
    name carries a hash of the tiny config, so a changed config is a new file)."""
    import open_clip

    name = register_tiny_config(arch)
    config = json.dumps(tiny_config(arch), sort_keys=True).encode()
    target = tiny_cache_dir() / f"{name}-{hashlib.sha256(config).hexdigest()[:8]}-seed{seed}.pt"
    if not target.is_file():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
        with atomic_path(target) as tmp:
            torch.save(model.state_dict(), tmp)
    return target


@dataclass(frozen=True)
class ClipPixels:
    """The CPU half of CLIP's preprocessing, picklable for a decode worker: the PIL steps of
    open_clip's transform (resize, centre crop, RGB) giving a (3, H, W) uint8 tensor. The rest
    (to float, /255, the mean and std) is `ClipEncoder.normalise`, on the model's device: a
    quarter of the bytes cross between processes and the host does no float work."""

    pil_steps: Any

    def __call__(self, image: Image.Image) -> torch.Tensor:
        array = np.asarray(self.pil_steps(image), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def split_preprocess(preprocess: Any) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """open_clip's image transform as (its PIL steps, mean, std): the steps before the
    conversion to a tensor, and the Normalize that ends it."""
    from torchvision import transforms

    steps = list(preprocess.transforms)
    names = [type(t).__name__ for t in steps]
    if len(steps) < 2 or names[-2] not in ("ToTensor", "MaybeToTensor") or names[-1] != "Normalize":
        raise ValueError(f"unexpected CLIP image transform (no ToTensor then Normalize): {names}")
    norm = steps[-1]
    return transforms.Compose(steps[:-2]), tuple(norm.mean), tuple(norm.std)


def center_crop_steps(size: int) -> Any:
    """UFD's evaluation crop (`validate.py`): the central size x size pixels, no resize; a side
    shorter than `size` is padded with black on both sides (torchvision's CenterCrop)."""
    from torchvision import transforms

    return transforms.Compose([transforms.Lambda(_to_rgb), transforms.CenterCrop(size)])


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class ClipEncoder:
    """Raw (unnormalised) CLIP image and text embeddings through open_clip."""

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess,
        tokenizer,
        name: str,
        weights_id: str,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.weights_id = weights_id
        self.device = device
        self.dtype = dtype
        steps, self.mean, self.std = split_preprocess(preprocess)
        self.pixels = ClipPixels(steps)

    def center_crop_pixels(self) -> ClipPixels:
        """`encode.image_transform: center_crop`'s whole-image view: the central crop at the
        size of open_clip's own crop, no resize (`center_crop_steps`)."""
        from torchvision import transforms

        sizes = [
            t.size for t in self.pixels.pil_steps.transforms if isinstance(t, transforms.CenterCrop)
        ]
        if not sizes:
            raise ValueError("the CLIP image transform has no CenterCrop to take the size from")
        return ClipPixels(center_crop_steps(int(sizes[0][0])))

    def view_shape(self) -> tuple[int, ...] | None:
        """The (3, H, W) of `pixels`' views (its centre crop's size; None without one)."""
        from torchvision import transforms

        for t in self.pixels.pil_steps.transforms:
            if isinstance(t, transforms.CenterCrop):
                return (3, int(t.size[0]), int(t.size[1]))
        return None

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 views from `pixels` (N, 3, H, W), on any device, as the model's input: on the
        model's device, the operations and float32 numbers of open_clip's ToTensor and
        Normalize, then the model's dtype. A pinned CPU tensor is copied without blocking."""
        batch = pixels.to(self.device, non_blocking=True)
        if batch.dtype == torch.uint8:
            # In place after one conversion: the same operations, one buffer.
            x = batch.to(torch.float32)
            mean = torch.as_tensor(self.mean, dtype=torch.float32, device=x.device)
            std = torch.as_tensor(self.std, dtype=torch.float32, device=x.device)
            batch = x.div_(255).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        return batch.to(self.dtype)

    @classmethod
    def load(
        cls,
        name: str = "ViT-L-14",
        pretrained: str = "openai",
        path: str = "",
        preset: str = "paper",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> ClipEncoder:
        """Load an open_clip model from a checkpoint file (real or tiny) on `device`.

        Both presets go through the same call: `create_model_and_transforms(name,
        pretrained=<checkpoint file>)`.
        """
        import open_clip

        if preset == "tiny":
            arch = name
            name = register_tiny_config(arch)
            logs.warn_tiny(
                logger,
                "models.preset=tiny: CLIP is a small RANDOM model (%s, seed %d); embeddings are "
                "meaningless, for smoke runs and tests only",
                name,
                seed,
            )
            checkpoint, quick_gelu = tiny_checkpoint(seed, arch), False
            check_weights_file(checkpoint, "the tiny-model cache")
            weights_id = tiny_weights_id(seed, arch)
            preprocess_kwargs: dict = {}
        else:
            if name.startswith(TINY_PREFIX):  # a saved tiny model loaded as a checkpoint file
                register_tiny_config(name.removeprefix(TINY_PREFIX))
            checkpoint = find_checkpoint(name, pretrained, path)
            cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            quick_gelu = bool(cfg.get("quick_gelu", False))
            weights_id = checkpoint_weights_id(name, pretrained, checkpoint)
            preprocess_kwargs = _preprocess_kwargs(cfg)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=str(checkpoint),
                device=device,
                force_quick_gelu=quick_gelu,
                **preprocess_kwargs,
            )
        except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError, EOFError) as err:
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else repr(err)
            raise ModelFileError(
                f"{checkpoint} cannot be loaded as {name} weights ({type(err).__name__}: "
                f"{first}); point models.clip.path at a checkpoint of this architecture, or "
                "delete the file to rebuild it"
            ) from err
        model = model.to(dtype=dtype).eval()
        tokenizer = open_clip.get_tokenizer(name)
        logger.info("loaded CLIP %s from %s on %s", weights_id, checkpoint, device)
        return cls(model, preprocess, tokenizer, name, weights_id, device, dtype)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1])  # type: ignore[union-attr,index]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.dim), np.float32)
        batch = torch.stack([self.preprocess(im) for im in images])
        return self.encode_pixels(batch).float().cpu().numpy()

    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embeddings of images (N, 3, H, W), left on the model's device: uint8 views from
        `pixels` (normalised on the device) or tensors preprocessed already.

        A CPU tensor in pinned memory is copied without blocking, so the copy overlaps the
        previous forward; the caller synchronises once, when it moves the results back.
        """
        batch = self.normalise(pixels)
        return self.model.encode_image(batch)  # type: ignore[operator,no-any-return]

    @property
    def pooled_dim(self) -> int:
        """Width of `encode_images_pooled`: the vision tower's width before its projection."""
        proj = getattr(self.model.visual, "proj", None)
        if proj is None:
            raise ValueError(
                f"CLIP {self.name} has no vision projection to stop before; "
                "encode.clip_pooled needs an open_clip VisionTransformer (ViT-*) model"
            )
        return int(proj.shape[0])

    @torch.inference_mode()
    def encode_images_pooled(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The vision tower's pooled output before the projection into the joint space (what
        Hugging Face's `CLIPVisionModel` calls `pooler_output`, CT2's image feature)."""
        if not images:
            return np.zeros((0, self.pooled_dim), np.float32)
        pixels = torch.stack([self.preprocess(im) for im in images])
        return self.encode_pixels_pooled(pixels).float().cpu().numpy()

    @torch.inference_mode()
    def encode_pixels_pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """`encode_images_pooled` of preprocessed images (N, 3, H, W), left on the device."""
        visual: Any = self.model.visual
        self.pooled_dim  # noqa: B018 (refuses a model without a vision projection)
        batch = self.normalise(pixels)
        proj = visual.proj
        visual.proj = None
        try:
            pooled = visual(batch)
        finally:
            visual.proj = proj
        if isinstance(pooled, tuple):
            pooled = pooled[0]
        return pooled  # type: ignore[no-any-return]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_tokens(self.tokenize(texts)).float().cpu().numpy()

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CPU token ids of `texts` (pure CPU work: may run on another thread)."""
        return self.tokenizer(list(texts))  # type: ignore[no-any-return]

    @torch.inference_mode()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of `tokenize`'s ids, left on the model's device."""
        return self.model.encode_text(tokens.to(self.device, non_blocking=True))  # type: ignore[operator,no-any-return]
