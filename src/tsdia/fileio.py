"""Crash-safe file operations: write to a temporary name, fsync, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or unlink inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a torn one.

    `durable=False` skips the fsyncs: still atomic for readers, but a power loss may keep the old file
    (right for records rewritten every few seconds, such as the progress record).
    """
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(target.parent)


def atomic_symlink(target: str, link: str | os.PathLike[str]) -> None:
    """Point `link` at `target` (relative), swapping any existing link in one rename."""
    link_path = Path(link)
    tmp = link_path.with_name(f".{link_path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link_path)
    fsync_dir(link_path.parent)


def remove_tree(path: str | os.PathLike[str], trash_dir: str | os.PathLike[str]) -> None:
    """Delete a directory by first renaming it into `trash_dir`, so a half-deleted copy never looks valid."""
    src = Path(path)
    trash = Path(trash_dir) / f".deleting-{src.name}-{os.getpid()}"
    os.replace(src, trash)
    fsync_dir(src.parent)
    shutil.rmtree(trash, ignore_errors=True)
