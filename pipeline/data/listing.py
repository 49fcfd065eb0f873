"""The dataset's listing: each file's path, size, mtime and type, read from the folder's
metadata only, so that DVC depends on one small file instead of hashing every image.

The listing is byte-identical while the folder is unchanged (sorted, no time of its own), so
the ingest stage that depends on it reruns only when a file is added, removed, replaced or
touched. Entries that cannot be images (FIFOs, devices, sockets, links to them, link loops,
dangling links) are refused here, in seconds, before anything reads them: reading a FIFO or
`/dev/zero` never ends.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.layouts import resolve_dataset
from pipeline.errors import DatasetError
from pipeline.rows.atomic import write_text

HEADER = '["path", "size", "mtime_ns", "type"]'
MAX_NAMED = 10  # refused entries named in the one-line message; the rest are counted

Entry = tuple[str, int, int, str]


def _kind(mode: int) -> str:
    """A short name for a file type that is not a regular file or a folder."""
    for test, name in (
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return f"file of mode {stat.S_IFMT(mode):o}"


def _follow(path: Path) -> tuple[os.stat_result | None, str]:
    """stat() through a symlink: (the target's stat, "") or (None, why it is refused)."""
    try:
        return path.stat(), ""
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None, "symlink loop"
        if err.errno == errno.ENOENT:
            return None, f"dangling link to {os.readlink(path)}"
        return None, f"unreadable link ({err.strerror})"


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result | None, str, str]]:
    """(relative path, stat, type, refusal) of every entry under `root`, folders entered
    (through links too, unless the link leads back into a folder being walked)."""
    stack: list[tuple[Path, str, frozenset[tuple[int, int]]]] = []
    st = root.stat()
    stack.append((root, "", frozenset({(st.st_dev, st.st_ino)})))
    while stack:
        folder, prefix, ancestors = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                path = Path(entry.path)
                lst = entry.stat(follow_symlinks=False)
                kind, target = "file", lst
                if stat.S_ISLNK(lst.st_mode):
                    followed, why = _follow(path)
                    if followed is None:
                        yield rel, None, "", why
                        continue
                    kind, target = "link", followed
                    if not (stat.S_ISREG(target.st_mode) or stat.S_ISDIR(target.st_mode)):
                        what = _kind(target.st_mode)
                        yield rel, None, "", f"symlink to a {what}, {os.readlink(path)}"
                        continue
                if stat.S_ISDIR(target.st_mode):
                    ident = (target.st_dev, target.st_ino)
                    if ident in ancestors:
                        yield rel, None, "", "symlink loop"
                        continue
                    stack.append((path, rel + "/", ancestors | {ident}))
                elif stat.S_ISREG(target.st_mode):
                    yield rel, target, kind, ""
                else:
                    yield rel, None, "", _kind(target.st_mode)


def _named_files(csv_path: Path) -> Iterator[tuple[str, os.stat_result | None, str, str]]:
    """The CSV itself and every file it names (relative to its folder), as `_walk` gives them;
    a named file that does not exist is listed as missing (ingest then says what to do)."""
    root, records = resolve_dataset(csv_path)
    names = sorted({csv_path.name} | {r.path for r in records})
    for rel in names:
        path = root / rel
        try:
            lst = path.lstat()
        except FileNotFoundError:
            yield rel, None, "missing", ""
            continue
        kind, target, why = "file", lst, ""
        if stat.S_ISLNK(lst.st_mode):
            kind = "link"
            found, why = _follow(path)
            if found is None:
                yield rel, None, "", why
                continue
            target = found
        if stat.S_ISREG(target.st_mode):
            yield rel, target, kind, ""
        else:
            what = "folder" if stat.S_ISDIR(target.st_mode) else _kind(target.st_mode)
            if kind == "link":
                what = f"symlink to a {what}, {os.readlink(path)}"
            yield rel, None, "", what


def list_dataset(data_path: str | Path) -> list[Entry]:
    """Every file of the dataset at `data_path` (a folder: all files under it; a CSV: itself
    and the files it names) as (relative path, size, mtime_ns, type), sorted by path; type is
    "file", "link" (a symlink to a file) or "missing" (named by the CSV but absent).

    Raises:
        DatasetError: naming every entry that is not a regular file, a folder or a link to one
            (FIFO, device, socket, link to one, link loop, dangling link), in one line.
    """
    path = Path(data_path)
    if not path.exists():
        raise DatasetError(
            f"data path {path} does not exist; set data.path to a folder or a manifest CSV"
        )
    found = _named_files(path) if path.is_file() else _walk(path)
    entries: list[Entry] = []
    refused: list[str] = []
    for rel, st, kind, why in found:
        if why:
            refused.append(f"{rel} ({why})")
        elif st is None:
            entries.append((rel, 0, 0, kind))
        else:
            entries.append((rel, st.st_size, st.st_mtime_ns, kind))
    if refused:
        refused.sort()
        named = ", ".join(refused[:MAX_NAMED])
        more = f" and {len(refused) - MAX_NAMED} more" if len(refused) > MAX_NAMED else ""
        raise DatasetError(
            f"{path} holds entries that are not image files: {named}{more}; remove them (or "
            "move them out of the dataset) and rerun"
        )
    entries.sort()
    return entries


def write_listing(data_path: str | Path, out: str | Path) -> int:
    """Write `list_dataset(data_path)` to `out`, one JSON array per line after a header line;
    returns the number of files. Same folder, same bytes (nothing else is recorded)."""
    entries = list_dataset(data_path)
    lines = [HEADER, *(json.dumps(list(e), ensure_ascii=False) for e in entries)]
    write_text(out, "\n".join(lines) + "\n")
    return len(entries)
