"""What identifies a field's input files, so that a rerun redoes a field whose images changed.

Two tiers (benchmarks/input_signature.py measured them on 5 x 2160 x 2160 uint16 fields):

- the *stat* signature: name, size and modification time of each file. Free (one stat per file), and
  unchanged as long as nobody touched the files: a plain rerun decides from it alone;
- the *content* digest: sha256 of each file's size, its first and last 64 KiB (TIFF header and
  directories) and 16 blocks of 4 KiB spread over the pixel data (about 2 % of a 9 MB plane). It is
  read only when the stat signature differs (files copied to a new folder, restored from a backup,
  exported again), and decides whether the pixels really changed: a copy of the same files is not
  redone, a re-export with other pixels is.

An input may be a folder (an OME-Zarr field's full-resolution array): its stat entry sums every file
below it (count, total size, newest modification time, and a digest of their relative names, sizes and
times, so a chunk rewritten in place is seen), and its content digest samples every one of those files.

A change that keeps name, size and modification time (a tool that restores mtimes after writing other
pixels of the same size) is not seen; ``--force`` redoes such fields.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

HEAD_BYTES = 64 * 1024
BLOCK_BYTES = 4 * 1024
BLOCKS = 16


def stat_signature(files: Iterable[Path | str]) -> list[dict[str, Any]]:
    """Name, size and modification time (ns) of each file, in order; size None for a missing file. A
    folder's entry sums the files below it (`files`: their count; `listing`: sha256 of their stats)."""
    out = []
    for path in files:
        path = Path(path)
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                out.append(_folder_stat(path))
            else:
                out.append({"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        except OSError:
            out.append({"name": path.name, "size": None, "mtime_ns": None})
    return out


def folder_files(folder: Path) -> list[Path]:
    """Every file below `folder` (no hidden files but Zarr v2 metadata), sorted by path."""
    out: list[Path] = []
    stack = [Path(folder)]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file() and (not entry.name.startswith(".") or entry.name in _ZARR_V2_META):
                out.append(Path(entry.path))
    return sorted(out)


_ZARR_V2_META = (".zarray", ".zattrs", ".zgroup")


def _folder_stat(folder: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    total, newest, n = 0, 0, 0
    for path in folder_files(folder):
        try:
            st = os.stat(path)
        except OSError:
            continue
        n += 1
        total += st.st_size
        newest = max(newest, st.st_mtime_ns)
        digest.update(f"{path.relative_to(folder).as_posix()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return {"name": folder.name, "size": total, "mtime_ns": newest, "files": n, "listing": digest.hexdigest()}


def content_digest(files: Iterable[Path | str]) -> str:
    """sha256 over each file's size, head, tail and 16 sampled blocks; missing files count as such; a
    folder counts as its files, each with its path relative to the folder."""
    digest = hashlib.sha256()
    for path in files:
        if Path(path).is_dir():
            for inner in folder_files(Path(path)):
                digest.update(f"{inner.relative_to(path).as_posix()}:".encode())
                _sample_into(digest, inner)
            continue
        _sample_into(digest, path)
    return digest.hexdigest()


def _sample_into(digest: Any, path: Path | str) -> None:
    """One file's size and sampled bytes into `digest` ("missing:" when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            digest.update(f"{size}:".encode())
            for offset, length in _sample_ranges(size):
                handle.seek(offset)
                digest.update(handle.read(length))
    except OSError:
        digest.update(b"missing:")


def _sample_ranges(size: int) -> list[tuple[int, int]]:
    if size <= 2 * HEAD_BYTES + BLOCKS * BLOCK_BYTES:
        return [(0, size)]
    middle = size - 2 * HEAD_BYTES - BLOCK_BYTES
    blocks = [(HEAD_BYTES + middle * (i + 1) // (BLOCKS + 1), BLOCK_BYTES) for i in range(BLOCKS)]
    return [(0, HEAD_BYTES), *blocks, (size - HEAD_BYTES, HEAD_BYTES)]


def signature(files: Sequence[Path | str], stat: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Both tiers, as a field's record keeps them: ``{"stat": [...], "content": "<sha256>"}``."""
    return {"stat": stat if stat is not None else stat_signature(files), "content": content_digest(files)}


def same_inputs(recorded: Mapping[str, Any] | None, files: Sequence[Path | str],
                stat: list[dict[str, Any]]) -> tuple[bool, bool]:
    """(the recorded signature still describes `files`, only the stat tier changed).

    A record without a signature (an older pcim, a field failed before its files were read) counts as
    changed. The content digest is read only when the stat signatures differ.
    """
    if not recorded or not recorded.get("stat"):
        return False, False
    if recorded["stat"] == stat:
        return True, False
    if recorded.get("content") and recorded["content"] == content_digest(files):
        return True, True
    return False, False
