"""Shared Hugging Face loading: fail-fast weight lookup, dtypes, and the `tiny` preset cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import string
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from huggingface_hub import try_to_load_from_cache

from pipeline import logs
from pipeline.errors import ConfigError, MisalignError, shown
from pipeline.rows.atomic import write_text
from pipeline.rows.digest import tree_digest
from pipeline.weight_files import check_model_dir

logger = logging.getLogger(__name__)

PRESETS = ("paper", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Bump when a tiny config or tokenizer changes, so tiny models cached by older code are rebuilt.
TINY_FORMAT_VERSION = 2
_TINY_MARKER = "misalign_tiny.json"


class ModelWeightsMissing(MisalignError, RuntimeError):
    """Real weights for a model are neither at the configured path nor in the local HF cache."""

    def __init__(self, model_id: str, where: str, role: str, detail: str = "") -> None:
        self.model_id = model_id
        self.where = where
        self.role = role
        message = (
            f"model weights for '{model_id}' not found in {where}; download it once with "
            f"`misalign weights fetch` (or `hf download {model_id}`) on a machine with network, "
            f"set models.{role}.path to a local save_pretrained directory, or run the offline "
            "smoke run `dvc exp run -S models.preset=tiny`"
        )
        if detail:
            message += f" (loader said: {detail.strip().splitlines()[0]})"
        super().__init__(message)


def hf_hub_cache() -> Path:
    """The HF hub cache directory, read from the environment at call time (not at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        value = os.environ.get(var)
        if value:
            return Path(os.path.expandvars(value)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def tiny_root() -> Path:
    """Where tiny presets are built once and reused (`MISALIGN_TINY_DIR` overrides)."""
    value = os.environ.get("MISALIGN_TINY_DIR")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "misalign" / "tiny"


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """Map a dtype name to torch. "auto": bfloat16 on a CUDA GPU that supports it (Ampere and
    later: float16's range without its overflow in long activations, at the same speed),
    float16 on older CUDA GPUs, float32 elsewhere (CPUs run half precision slowly)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if not str(device).startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {shown(dtype)} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class WeightsSource:
    """What to hand to `from_pretrained`, plus provenance for errors and shard attributes."""

    ref: str  # a local directory, or a hub id resolved inside cache_dir
    cache_dir: str | None
    weights_id: str
    where: str


def resolve_weights(model_id: str, path: str | os.PathLike[str] | None, role: str) -> WeightsSource:
    """Locate real weights without touching the network.

    Args:
        model_id: Hub id, e.g. "Salesforce/blip2-opt-2.7b".
        path: A local `save_pretrained` directory; when None the HF cache is searched.
        role: The `models.<role>` key in params.yaml, named in the error message.

    Returns:
        The source to load from.

    Raises:
        ModelWeightsMissing: Nothing usable is at `path` or in the cache.
    """
    if path is not None:
        local = Path(path).expanduser()
        if not (local / "config.json").is_file():
            raise ModelWeightsMissing(model_id, f"{local} (no config.json)", role)
        check_model_dir(local, f"models.{role}.path")
        resolved = local.resolve()
        # The folder's content, not its path: new weights saved at the same path are new rows.
        weights_id = f"{model_id}@sha256:{tree_digest(resolved)[:16]}"
        return WeightsSource(str(resolved), None, weights_id, str(resolved))
    cache = hf_hub_cache()
    found = try_to_load_from_cache(model_id, "config.json", cache_dir=cache)
    if not isinstance(found, str):
        raise ModelWeightsMissing(model_id, f"the Hugging Face cache {cache}", role)
    check_model_dir(Path(found).parent, f"{model_id} in the Hugging Face cache")
    revision = Path(found).parent.name  # .../snapshots/<commit>/config.json: the hub commit
    return WeightsSource(model_id, str(cache), f"{model_id}@{revision}", f"the HF cache {cache}")


def tiny_weights_id(name: str, seed: int) -> str:
    """Identity of a tiny model: what `build_tiny` builds is fixed by name, seed and format."""
    return f"{name}@seed{seed}-random-format{TINY_FORMAT_VERSION}"


def load_pretrained(
    loader: Callable[..., Any], source: WeightsSource, model_id: str, role: str, **kwargs: Any
) -> Any:
    """Call a `from_pretrained` offline, turning "file not there" into ModelWeightsMissing."""
    try:
        return loader(source.ref, cache_dir=source.cache_dir, local_files_only=True, **kwargs)
    except OSError as err:  # transformers reports missing files (weights, tokenizer) as OSError
        raise ModelWeightsMissing(model_id, source.where, role, detail=str(err)) from err


def _is_current(directory: Path, stamp: Mapping[str, Any]) -> bool:
    try:
        return bool(json.loads((directory / _TINY_MARKER).read_text()) == stamp)
    except (OSError, ValueError):
        return False


def build_tiny(name: str, seed: int, build: Callable[[Path], None]) -> Path:
    """Build a tiny model directory once per (name, seed) and return it.

    `build(directory)` must `save_pretrained` a model and its processor into `directory`; it runs
    under `torch.manual_seed(seed)` in a forked RNG, so the caller's RNG state is untouched. The
    directory is built under a temporary name and renamed, so concurrent runs never see half of it.
    """
    target = tiny_root() / f"{name}-seed{seed}"
    stamp = {"name": name, "seed": seed, "format_version": TINY_FORMAT_VERSION}
    if _is_current(target, stamp):
        # A cached directory is a file anyone could have replaced: check what it holds.
        check_model_dir(target, f"the tiny-model cache {target.parent}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-seed{seed}-", dir=target.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            build(tmp)
        write_text(tmp / _TINY_MARKER, json.dumps(stamp))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is as readable as any other
        if _is_current(target, stamp):  # another process finished the same build meanwhile
            return target
        if target.exists():  # stale: built by an older format version, or half-deleted
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_current(target, stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model %s in %s", name, target)
    return target


def warn_tiny(name: str, seed: int) -> None:
    """Say loudly that a tiny model is random (once per stage run: see `logs.warn_tiny`)."""
    logs.warn_tiny(
        logger,
        "models.preset=tiny: '%s' has RANDOM weights (seed %d); its outputs are MEANINGLESS and "
        "only fit for tests and offline smoke runs",
        name,
        seed,
    )


def to_model_inputs(batch: Mapping[str, Any], device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Move a processor batch to the device, casting floating tensors (pixels) to `dtype`; from
    pinned memory (the reader's on CUDA) the copies do not block."""
    moved: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            cast = dtype if value.is_floating_point() else value.dtype
            value = value.to(device, cast, non_blocking=True)
        moved[key] = value
    return moved


def bert_uncased_vocab(words: tuple[str, ...] = ()) -> list[str]:
    """A small WordPiece vocabulary laid out like bert-base-uncased's.

    Special tokens and punctuation keep their bert-base-uncased ids ([PAD]=0, [UNK]=100,
    [CLS]=101, [SEP]=102, [MASK]=103, "."=1012, "?"=1029): GroundingDINO hard-codes those ids
    to split phrases. Single letters and digits plus their "##" continuations make every
    lowercase ASCII word tokenizable; `words` adds whole-word tokens.
    """
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    vocab += [chr(c) for c in range(0x21, 0x7F) if not chr(c).isupper()]
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(vocab)
    for word in words:
        if word not in seen:
            vocab.append(word)
            seen.add(word)
    return vocab


TINY_WORDS = (
    "the",
    "a",
    "an",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "is",
    "photo",
    "picture",
    "image",
    "man",
    "woman",
    "person",
    "people",
    "cat",
    "dog",
    "car",
    "tree",
    "table",
    "street",
    "sky",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "sitting",
    "standing",
    "next",
    "to",
)


def write_tiny_wordpiece_tokenizer(directory: Path, model_max_length: int) -> int:
    """Write vocab.txt + tokenizer_config.json for a BertTokenizer; return the vocab size.

    Written as files and loaded with `from_pretrained(directory)`: transformers 5 silently
    ignores `BertTokenizer(vocab_file=...)` and builds a 5-token tokenizer.
    """
    vocab = bert_uncased_vocab(TINY_WORDS)
    directory.mkdir(parents=True, exist_ok=True)
    write_text(directory / "vocab.txt", "\n".join(vocab) + "\n")
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": model_max_length,
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2))
    return len(vocab)


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    """Write a config file the way save_pretrained does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(content, indent=2) + "\n")


_Wrapper = TypeVar("_Wrapper", bound="HFWrapper")


class HFWrapper:
    """A loaded model, its processor and provenance; subclasses add the inference call."""

    default_model_id: ClassVar[str]
    tiny_name: ClassVar[str]
    default_role: ClassVar[str]

    def __init__(
        self,
        model: Any,
        processor: Any,
        model_id: str,
        weights_id: str,
        preset: str,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.weights_id = weights_id
        self.preset = preset
        self.device = device
        self.dtype = dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, weights_id={self.weights_id!r}, "
            f"preset={self.preset!r}, device={self.device!r}, dtype={self.dtype})"
        )

    @classmethod
    def load(
        cls: type[_Wrapper],
        model_id: str | None = None,
        path: str | os.PathLike[str] | None = None,
        preset: str = "paper",
        device: str = "cpu",
        dtype: str | torch.dtype = "auto",
        seed: int = 0,
        role: str | None = None,
    ) -> _Wrapper:
        """Load real weights (`paper`) or a seeded random tiny model (`tiny`), fully offline.

        Args:
            model_id: Hub id of the real model; defaults to the paper's choice.
            path: Local `save_pretrained` directory for `paper`; None searches the HF cache.
            preset: "paper" (real weights) or "tiny" (random weights, built offline).
            device: Torch device, e.g. "cpu" or "cuda:0".
            dtype: "auto" (see `resolve_dtype`), "float32", "float16" or "bfloat16".
            seed: Seeds the tiny weights; ignored for `paper`.
            role: The `models.<role>` key named in error messages.

        Raises:
            ModelWeightsMissing: `paper` weights are not available locally.
        """
        if preset not in PRESETS:
            raise ConfigError(f"preset {shown(preset)} is not one of {list(PRESETS)}")
        role = role or cls.default_role
        torch_dtype = resolve_dtype(dtype, device)
        if preset == "tiny":
            warn_tiny(cls.tiny_name, seed)
            directory = build_tiny(cls.tiny_name, seed, cls._build_tiny)
            model_id = cls.tiny_name
            source = WeightsSource(
                str(directory), None, tiny_weights_id(cls.tiny_name, seed), str(directory)
            )
        else:
            model_id = model_id or cls.default_model_id
            source = resolve_weights(model_id, path, role)
        # The tiny preset goes through exactly these calls, so it exercises the real loader.
        model = load_pretrained(cls._model_loader(), source, model_id, role, dtype=torch_dtype)
        processor = load_pretrained(cls._processor_loader(), source, model_id, role)
        model = model.to(device).eval()
        wrapper = cls(model, processor, model_id, source.weights_id, preset, device, torch_dtype)
        wrapper._after_load()
        return wrapper

    def _after_load(self) -> None:
        """Check or adapt a loaded checkpoint (e.g. older hub snapshots); no-op by default."""

    @classmethod
    def _model_loader(cls) -> Callable[..., Any]:
        raise NotImplementedError

    @classmethod
    def _processor_loader(cls) -> Callable[..., Any]:
        raise NotImplementedError

    @staticmethod
    def _build_tiny(directory: Path) -> None:
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike[str]) -> None:
        """Save model and processor so that `load(path=directory)` reloads them."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
