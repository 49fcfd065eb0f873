"""What kind of file a weights file is, checked before any loader opens it.

Only formats that cannot run code are loaded: safetensors, and torch's zip state dicts (read
with `torch.load(weights_only=True)`). A raw pickle can execute anything when unpickled, and a
TorchScript archive is a program, not a state dict; both are refused with the reason.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from pipeline.errors import ModelFileError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def file_kind(path: str | Path) -> str:
    """'safetensors', 'torch-zip' (a torch.save state dict), 'torchscript', 'pickle', 'empty',
    'json' or 'unknown', from the file's bytes (not its name)."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any("/code/" in n or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "torch-zip" if any(n.endswith("data.pkl") for n in names) else "unknown"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    return "unknown"


def check_safetensors(path: Path) -> None:
    """The header parses and every tensor's byte range lies inside the file."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFileError(f"{path} is not a safetensors file: shorter than its header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelFileError(f"{path} is a truncated safetensors file (header past the end)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelFileError(f"{path} is not a valid safetensors file: {err}") from None
    end = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not offsets or len(offsets) != 2 or end + offsets[1] > size or offsets[0] > offsets[1]:
            raise ModelFileError(
                f"{path} is a truncated or damaged safetensors file (tensor {name!r} lies "
                "outside the file); download or save it again"
            )


def check_weights_file(path: str | Path, what: str) -> str:
    """Refuse a weights file that is empty, a raw pickle, TorchScript or damaged.

    Args:
        what: the model it is for, named in the error (e.g. "models.clip.path").

    Returns:
        Its kind (see `file_kind`).

    Raises:
        ModelFileError: one line naming the file, its kind, why it is refused and the fix.
    """
    path = Path(path)
    kind = file_kind(path)
    fix = "save the weights as safetensors (or torch.save(model.state_dict())) and point at that"
    if kind == "pickle":
        raise ModelFileError(
            f"{path} ({what}) is a raw pickle, which can run arbitrary code when loaded; it is "
            f"refused. Fix: {fix}"
        )
    if kind == "torchscript":
        raise ModelFileError(
            f"{path} ({what}) is a TorchScript archive (e.g. OpenAI's `clip` package JIT "
            "checkpoint), a program rather than a state dict; it is refused. Fix: delete it so "
            f"the open_clip / Hugging Face cache is used, or {fix}"
        )
    if kind in ("empty", "json", "unknown"):
        raise ModelFileError(
            f"{path} ({what}) is not a weights file (its content is {kind}). Fix: {fix}"
        )
    if kind == "safetensors":
        check_safetensors(path)
    return kind


def check_model_dir(directory: str | Path, what: str) -> None:
    """`check_weights_file` on every weights file of a save_pretrained directory."""
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.suffix.lower() in WEIGHT_SUFFIXES:
            check_weights_file(path, what)
