"""Tee the process's stdout and stderr, at the file-descriptor level, to the console and a log file.

Working on fds 1 and 2 (not `sys.stdout`) catches everything: print, logging, warnings, tqdm, C++ and
child-process output, and the traceback of a crash. Progress-bar redraws (`\\r`) reach the console as
they are, but the file gets complete lines only, with a redrawn line written at most every
`progress_interval` seconds, so a long run's log is not flooded.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import select
import sys
import threading
import time
from typing import BinaryIO

_CHUNK = 1 << 20
_PIPE_SIZE = 1 << 20  # a deep pipe: a burst of prints fills it without waiting for the pump
_BATCH_S = 0.001  # after the pipe turns readable, let output gather for 1 ms: fewer, larger reads
_POLL_S = 0.05  # after close(), the pump stops once the pipe has been empty this long
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux); not exported by every Python version


class _LineCollapser:
    """Turns one stream's bytes into complete log lines, as a terminal would show them.

    `\r` returns to the start of the line, so only the text after the last `\r` is kept (a tqdm
    redraw, or a bar cleared with `\r   \r` before a message). A line that is still being redrawn
    is written at most every `progress_interval` seconds.
    """

    def __init__(self, sink: BinaryIO, lock: threading.Lock, progress_interval: float) -> None:
        self.sink = sink
        self.lock = lock
        self.interval = progress_interval
        self.pending = b""  # the current line as a terminal shows it now
        self.redrawn = False  # the current line has been redrawn with \r (a progress bar)
        self.written = b""  # what of the current line already reached the file
        self.last_progress = -math.inf  # the first redraw is written at once

    def feed(self, data: bytes) -> None:
        if not self.redrawn and b"\r" not in data:
            # The common case, plain lines: pass whole lines through without looking at each one.
            cut = data.rfind(b"\n") + 1
            if cut:
                self._write([self.pending, data[:cut]])
                self.pending = data[cut:]
            else:
                self.pending += data
            return
        pieces = data.split(b"\n")
        out = []
        for i, piece in enumerate(pieces):
            newline = i < len(pieces) - 1
            if newline and piece.endswith(b"\r"):
                piece = piece[:-1]  # CRLF
            if b"\r" in piece:
                self.pending = piece.rsplit(b"\r", 1)[1]
                self.redrawn = True
            else:
                self.pending += piece
            if newline:
                if not (self.written and self.pending == self.written):
                    out.append(self.pending + b"\n")
                self.pending, self.redrawn, self.written = b"", False, b""
        if self.redrawn and self.pending.strip() and self.pending != self.written:
            now = time.monotonic()
            if now - self.last_progress >= self.interval:
                out.append(self.pending + b"\n")
                self.written = self.pending
                self.last_progress = now
        self._write(out)

    def _write(self, parts: list[bytes]) -> None:
        if parts:
            with self.lock:
                self.sink.write(b"".join(parts))

    def flush_pending(self) -> None:
        if self.pending.strip() and self.pending != self.written:
            with self.lock:
                self.sink.write(self.pending + b"\n")
                self.sink.flush()
        self.pending, self.redrawn, self.written = b"", False, b""


class ConsoleTee:
    """Duplicate fds 1 and 2 into `log_path` until `close()`; the console keeps receiving everything."""

    def __init__(self, log_path: str, progress_interval: float = 30.0, echo: bool = True) -> None:
        self.log_path = log_path
        self.echo = echo
        self._log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._streams: list[tuple[int, int, threading.Thread, _LineCollapser]] = []
        self._closed = False
        self._stopping = threading.Event()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            read_end, write_end = os.pipe()
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
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
                ready, _, _ = select.select([read_end], [], [], _POLL_S)
                if not ready:
                    if self._stopping.is_set():
                        break  # drained: a child that still holds the pipe (wandb's service) cannot stall us
                    continue
                # The pump competes with the training thread for the GIL: waking per line costs it.
                time.sleep(_BATCH_S)
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
            os.dup2(saved, fd)  # nothing new enters the pipes from this process
        self._stopping.set()
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
