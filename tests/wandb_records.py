"""Read back what a WandB *offline* run wrote, so tests can check real wandb output without a server.

An offline run directory ``<dir>/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>/`` holds ``run-<id>.wandb``: the
run's transaction log.  No config.yaml or wandb-summary.json is written offline, so this log is the only
place the config, history and summary live.

File format (the same as wandb's old Python ``wandb.sdk.internal.datastore``, which wandb >= 0.2x dropped
when the writer moved to the Go ``wandb-core`` binary, so there is no Python reader left to reuse):

* a 7-byte header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 LE), version ``0`` (uint8);
* then LevelDB-log framing (https://github.com/google/leveldb/blob/main/doc/log_format.md): 32 KiB
  blocks, counted from the start of the file (the header sits inside the first block), each holding
  chunks ``crc32: uint32 LE | length: uint16 LE | type: uint8 | data``.  Type FULL (1) is a whole record;
  FIRST (2), MIDDLE (3), LAST (4) are pieces of one.  A block tail under 7 bytes is zero padding.
  The checksum is zlib's CRC-32 (not LevelDB's crc32c) of ``data``, seeded with the CRC-32 of the type byte.
* each reassembled record is a serialized ``wandb.proto.wandb_internal_pb2.Record``.

The records used here (everything else, e.g. stats, output, telemetry, is skipped):

* ``run``: the ``wandb.init`` call; ``run.config`` / ``run.summary`` hold the initial config / summary.
* ``config``: ``run.config.update``; items are ``key`` (or a ``nested_key`` path) plus ``value_json``,
  the user's value JSON-encoded as-is.  The ``{"value": ..., "desc": ...}`` wrapping seen in config.yaml and
  the public API is added only when those are written, never in the log, so nothing here unwraps it.
* ``history``: one per committed step (a ``run.log`` call, or several merged with ``commit=False``); items
  are keyed by ``nested_key`` paths, so ``run.log({"a": {"b": 1}})`` comes back as ``{"a": {"b": 1}}``.
* ``summary``: updates/removes to the summary; wandb writes one after each history row.

Keys named ``_wandb`` (wandb's own bookkeeping, e.g. ``{"_wandb": {"runtime": 0}}``) are dropped from the
config and summary; ``_step``, ``_runtime`` and ``_timestamp`` are kept.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION = b":W&B", 0xBEE1, 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_INTERNAL_KEY = "_wandb"


@dataclass
class WandbRun:
    run_id: str
    config: dict[str, Any]
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    run_dir: Path
    # Seconds since the epoch from the run record, for ordering runs (a resumed run has the same id).
    start_time: float = 0.0
    records: list[pb.Record] = field(default_factory=list, repr=False)  # every decoded record, for digging


def iter_records(path: Path) -> Iterator[pb.Record]:
    """Yield the ``Record`` protos in a ``run-<id>.wandb`` file, in write order.

    A torn final chunk (a writer that is still running or was killed) ends the scan quietly; a bad header
    or checksum raises ``ValueError``.
    """
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short for a .wandb header")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (_FILE_IDENT, _FILE_MAGIC, _FILE_VERSION):
        raise ValueError(f"{path}: not a .wandb log (header {ident!r} {magic:#x} v{version})")

    pos, pending = _FILE_HEADER.size, bytearray()
    while True:
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _CHUNK_HEADER.size:  # zero trailer: the next chunk starts in the next block
            pos += left_in_block
            continue
        if pos + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start, pos = pos + _CHUNK_HEADER.size, pos + _CHUNK_HEADER.size + length
        if kind == 0 and length == 0:  # preallocated / zero-filled tail
            return
        if pos > len(data):  # torn write
            return
        chunk = data[start:pos]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: checksum mismatch in chunk at byte {start - _CHUNK_HEADER.size}")
        if kind in (_FULL, _FIRST):
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST):
            pending += chunk
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {start - _CHUNK_HEADER.size}")
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(bytes(pending))
            yield record


def _path(item: Any) -> list[str]:
    """The key path of a ConfigItem / SummaryItem / HistoryItem: ``nested_key`` if set, else ``[key]``."""
    return list(item.nested_key) or [item.key]


def _set(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        target = target.get(key)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)


def _apply(target: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    """Apply a config or summary record's ``update`` / ``remove`` items to ``target``, in place."""
    for item in updates:
        _set(target, _path(item), json.loads(item.value_json))
    for item in removes:
        _remove(target, _path(item))


def read_run(run_dir: Path) -> WandbRun:
    """Decode one ``offline-run-*`` (or ``run-*``) directory."""
    run_dir = Path(run_dir)
    logs = sorted(run_dir.glob("run-*.wandb"))
    if len(logs) != 1:
        raise FileNotFoundError(f"{run_dir}: expected one run-*.wandb file, found {len(logs)}")
    records = list(iter_records(logs[0]))

    run_id = logs[0].stem.removeprefix("run-")
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    start_time = 0.0
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id or run_id
            start_time = record.run.start_time.seconds + record.run.start_time.nanos / 1e9
            _apply(config, record.run.config.update, record.run.config.remove)
            _apply(summary, record.run.summary.update, record.run.summary.remove)
        elif kind == "config":
            _apply(config, record.config.update, record.config.remove)
        elif kind == "summary":
            _apply(summary, record.summary.update, record.summary.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item)
            row.setdefault("_step", record.history.step.num)
            history.append(row)
    config.pop(_INTERNAL_KEY, None)
    summary.pop(_INTERNAL_KEY, None)
    return WandbRun(run_id, config, history, summary, run_dir, start_time, records)


def find_runs(wandb_dir: Path) -> list[WandbRun]:
    """Read every ``offline-run-*`` / ``run-*`` directory under a ``.../wandb`` directory, oldest first.

    A resumed offline run gets a new directory with the same ``run_id``; the ``latest-run`` symlink is
    skipped so no run is listed twice.
    """
    dirs = [
        d
        for d in Path(wandb_dir).iterdir()
        if d.is_dir() and not d.is_symlink() and d.name.startswith(("offline-run-", "run-"))
    ]
    # Start time from the run record (sub-second); the directory name's timestamp breaks ties.
    return sorted((read_run(d) for d in dirs), key=lambda r: (r.start_time, r.run_dir.name))
