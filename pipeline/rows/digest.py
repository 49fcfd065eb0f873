"""Content hashes of weight files, remembered by what a copy cannot preserve, so that a
checkpoint of several GB is read once, not at every run.

A digest is reused while the file's path, size, mtime, inode and change time (ctime) are all
the same. Size and mtime alone are not enough: `cp -p`, `rsync -t` or unpacking an archive put
other weights at the same path with the same size and the old mtime. The inode changes when a
file is replaced by another, and the ctime changes on every write, rename or `utime` and cannot
be set back by a user; a file whose ctime changed is simply hashed again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from pipeline.rows.atomic import write_text

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22
_MEMO: dict[tuple[str, int, int, int, int, int], str] = {}


def digest_cache_file() -> Path:
    """Where digests are remembered between runs (`MISALIGN_DIGEST_CACHE` overrides)."""
    value = os.environ.get("MISALIGN_DIGEST_CACHE")
    if value:
        return Path(value).expanduser()
    return Path.home() / ".cache" / "misalign" / "digests.json"


def _load_cache(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stat_key(path: Path) -> tuple[str, int, int, int, int, int]:
    """(path, size, mtime, device, inode, ctime): unchanged only while the bytes are."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)


def file_digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes (hex). A file whose path, size, mtime, inode and ctime are
    unchanged since it was last hashed is not read again; a rewrite, a replacement or a
    restored mtime changes its ctime or inode, and the file is hashed again."""
    p = Path(path)
    key = _stat_key(p)
    if key in _MEMO:
        return _MEMO[key]
    cache_file = digest_cache_file()
    cache = _load_cache(cache_file)
    text_key = json.dumps(key)
    if text_key in cache:
        _MEMO[key] = cache[text_key]
        return cache[text_key]
    logger.info("hashing %s (%.1f MB) once to identify its weights", p, key[1] / 1e6)
    digest = _hash_file(p)
    _MEMO[key] = digest
    cache = _load_cache(cache_file)  # another process may have added entries meanwhile
    # Entries of files that were rewritten since (same path, other stat key) are dropped.
    cache = {k: v for k, v in cache.items() if json.loads(k)[0] != key[0]}
    cache[text_key] = digest
    try:
        write_text(cache_file, json.dumps(cache, indent=0, sort_keys=True) + "\n")
    except OSError as err:  # a read-only home still gets correct (if slower) runs
        logger.warning("cannot remember weight digests in %s: %s", cache_file, err)
    return digest


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_digest(directory: str | os.PathLike[str]) -> str:
    """sha256 over every file under `directory` (relative name and content digest), so that a
    changed weight, config or tokenizer file changes it."""
    root = Path(directory)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and not q.name.startswith(".")):
        h.update(f"{p.relative_to(root).as_posix()}\0{file_digest(p)}\n".encode())
    return h.hexdigest()
