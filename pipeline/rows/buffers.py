"""Shared-memory batch buffers: decode workers write a batch's tensor where the consumer reads it.

The main process (`Buffers`) keeps files in shared memory (/dev/shm where there is one), each
mapped once and reused batch after batch; a worker is told where its chunk's rows go (`Into`)
and maps the file once for its life. A batch's tensor is a view of its buffer, and the buffer
is free again when the last tensor on it is gone, so the consumer may keep a batch as long as
it likes; `Pack` says which tensor of a sample goes this way (see `pipeline.rows.reader`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Pack:
    """A tensor of each sample (`key`, rows of `shape`, e.g. the views of an image) that the
    workers write straight into one shared buffer per batch, in item order: the batch's tensor
    is that buffer, so the main process copies and concatenates nothing. `rows(item)` (run in
    the main process) says how many rows an item gives, so that each chunk knows where its rows
    go before any is decoded."""

    key: str
    shape: tuple[int, ...]
    rows: Callable[[Any], int]
    dtype: str = "uint8"

    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape)))


@dataclass(frozen=True)
class Into:
    """Where a worker writes a chunk's packed tensors: a byte offset in a buffer file."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    path: str
    offset: int
    rows: int

    def write(self, samples: list[Any]) -> list[Any]:
        import torch

        count = self.rows * int(np.prod(self.shape))
        flat = np.frombuffer(_mapped(self.path), self.dtype, count, self.offset)
        dest = torch.from_numpy(flat).view(self.rows, *self.shape)
        out, r = [], 0
        for sample in samples:
            value = sample[self.key]
            dest[r : r + len(value)].copy_(value)
            r += len(value)
            # What crosses back: the rows' count (an empty tensor of that length), no pixels.
            out.append({**sample, self.key: value.new_empty((len(value), 0))})
        if r != self.rows:
            raise RuntimeError(f"the samples gave {r} rows of {self.key!r}, {self.rows} expected")
        return out


# A worker's mappings of the main process's batch buffers, kept for the worker's life.
_MAPS: dict[str, mmap.mmap] = {}


def _mapped(path: str) -> mmap.mmap:
    if path not in _MAPS:
        fd = os.open(path, os.O_RDWR)
        try:
            _MAPS[path] = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
    return _MAPS[path]


def remove_mapped() -> None:
    """Delete the files of the buffers this process mapped (a worker whose owner is gone)."""
    for path in list(_MAPS):
        with contextlib.suppress(OSError):
            os.unlink(path)


class Buffer:
    """A file in shared memory (/dev/shm where there is one), mapped once, reused for batch
    after batch: its pages stay mapped in the main process and in the workers."""

    def __init__(self, size: int) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, self.path = tempfile.mkstemp(prefix="misalign-feed-", dir=folder)
        try:
            os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class Buffers:
    """The main process's batch buffers: one is taken per batch, and given back when the last
    tensor on it is gone (a consumer may keep a batch as long as it likes)."""

    def __init__(self) -> None:
        self.free: list[Buffer] = []
        self.all: list[Buffer] = []

    def take(self, size: int) -> Buffer:
        fits = [b for b in self.free if b.size >= size]
        if fits:
            buffer = min(fits, key=lambda b: b.size)
            self.free.remove(buffer)
            return buffer
        buffer = Buffer(max(size, 1 << 20))
        self.all.append(buffer)
        return buffer

    def tensor(self, buffer: Buffer, pack: Pack, rows: int) -> Any:
        """The batch's packed tensor on `buffer`; the buffer is free again once it is gone."""
        import torch

        count = rows * int(np.prod(pack.shape))
        flat = np.frombuffer(buffer.map, pack.dtype, count)
        weakref.finalize(flat, self.free.append, buffer)
        return torch.from_numpy(flat).view(rows, *pack.shape)

    def close(self) -> None:
        for buffer in self.all:
            buffer.remove()  # the mappings go with their last user
        self.all, self.free = [], []
