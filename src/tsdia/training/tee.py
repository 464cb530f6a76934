"""Tee the process's stdout and stderr, at the file-descriptor level, to the console and a log file.

Working on fds 1 and 2 (not `sys.stdout`) catches everything: print, logging, warnings, tqdm, C++ and
child-process output, and the traceback of a crash. Progress-bar redraws (`\\r`) reach the console as
they are, but the file gets complete lines only, with a redrawn line written at most every
`progress_interval` seconds, so a long run's log is not flooded.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import BinaryIO

_CHUNK = 1 << 16


class _LineCollapser:
    """Turns one stream's bytes into complete log lines, collapsing `\\r` redraws."""

    def __init__(self, sink: BinaryIO, lock: threading.Lock, progress_interval: float) -> None:
        self.sink = sink
        self.lock = lock
        self.interval = progress_interval
        self.pending = b""  # the current, not yet terminated line (only its last redraw)
        self.pending_written = False
        self.last_progress = 0.0

    def feed(self, data: bytes) -> None:
        lines = data.split(b"\n")
        out = []
        for complete in lines[:-1]:
            line = self._redraw(self.pending, complete)
            if line or not self.pending_written:
                out.append(line + b"\n")
            self.pending, self.pending_written = b"", False
        tail = lines[-1]
        if tail:
            self.pending = self._redraw(self.pending, tail)
            if b"\r" in tail and self.pending:
                self.pending_written = False
                now = time.monotonic()
                if now - self.last_progress >= self.interval:
                    out.append(self.pending + b"\n")
                    self.pending_written = True
                    self.last_progress = now
        if out:
            with self.lock:
                self.sink.write(b"".join(out))
                self.sink.flush()

    @staticmethod
    def _redraw(pending: bytes, text: bytes) -> bytes:
        """What a terminal would show: the text after the last carriage return that is not empty."""
        combined = pending + text
        parts = [p for p in combined.split(b"\r") if p.strip()]
        return parts[-1].rstrip(b"\r") if parts else b""

    def flush_pending(self) -> None:
        if self.pending and not self.pending_written:
            with self.lock:
                self.sink.write(self.pending + b"\n")
                self.sink.flush()
        self.pending, self.pending_written = b"", True


class ConsoleTee:
    """Duplicate fds 1 and 2 into `log_path` until `close()`; the console keeps receiving everything."""

    def __init__(self, log_path: str, progress_interval: float = 30.0, echo: bool = True) -> None:
        self.log_path = log_path
        self.echo = echo
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._streams: list[tuple[int, int, threading.Thread, _LineCollapser]] = []
        self._closed = False
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            collapser = _LineCollapser(self._log, self._lock, progress_interval)
            thread = threading.Thread(
                target=self._pump, args=(read_end, saved, collapser), name=f"tsdia-tee-{fd}", daemon=True
            )
            thread.start()
            self._streams.append((fd, saved, thread, collapser))
        # Line-buffer Python's streams so stdout and stderr interleave in the order they were written.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    def _pump(self, read_end: int, console: int, collapser: _LineCollapser) -> None:
        try:
            while True:
                data = os.read(read_end, _CHUNK)
                if not data:
                    break
                if self.echo:
                    _write_all(console, data)
                collapser.feed(data)
        finally:
            collapser.flush_pending()
            os.close(read_end)

    def write_file_only(self, text: str) -> None:
        """Append to the log file without echoing to the console."""
        if not self._closed:
            with self._lock:
                self._log.write(text.encode("utf-8", "replace"))

    def close(self, timeout: float = 5.0) -> None:
        """Restore the console and drain what is still in the pipes. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved, _, _ in self._streams:
            os.dup2(saved, fd)  # closes our end of the pipe: the pump sees EOF once children let go
        for _, saved, thread, _ in self._streams:
            thread.join(timeout)
            os.close(saved)
        self._log.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError:
            return  # the console went away (closed terminal): keep logging to the file
        view = view[written:]
