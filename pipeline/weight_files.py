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

from pipeline.errors import ModelFileError, shown

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


# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
# A header beyond this is not a weights file's (real ones are kilobytes to a few megabytes).
MAX_HEADER_BYTES = 100_000_000


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(path: Path) -> None:
    """The header parses, every number in it is a whole number, and every tensor's byte range
    lies inside the file and holds exactly its shape: checked from the header alone, before a
    loader allocates anything."""
    size = path.stat().st_size
    damaged = f"{path} is a damaged safetensors file"
    again = "download or save it again"
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ModelFileError(f"{path} is not a safetensors file: shorter than its header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ModelFileError(f"{path} is a truncated safetensors file (header past the end)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            reason = " ".join(str(err).split())[:160]
            raise ModelFileError(f"{path} is not a valid safetensors file: {reason}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{damaged} (its header is not a JSON object); {again}")
    end = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{damaged} (tensor {shown(name)}"
        if not isinstance(info, dict):
            raise ModelFileError(f"{where} has no description); {again}")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_whole(v) for v in offsets)
            or offsets[0] > offsets[1]
        ):
            raise ModelFileError(
                f"{where}: data_offsets {shown(offsets)} are not two whole numbers); {again}"
            )
        if end + offsets[1] > size:
            raise ModelFileError(f"{where} lies outside the file); {again}")
        if not isinstance(shape, list) or not all(_whole(v) for v in shape):
            raise ModelFileError(
                f"{where}: shape {shown(shape)} is not a list of whole numbers); {again}"
            )
        width = _DTYPE_BYTES.get(info.get("dtype"))  # type: ignore[arg-type]
        if width is None:
            raise ModelFileError(f"{where}: unknown dtype {shown(info.get('dtype'))}); {again}")
        n_bytes = width
        for dim in shape:
            n_bytes *= dim
            if n_bytes > size:
                break
        if n_bytes != offsets[1] - offsets[0]:
            raise ModelFileError(
                f"{where}: shape {shown(shape)} does not fit its {offsets[1] - offsets[0]} bytes); "
                f"{again}"
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
