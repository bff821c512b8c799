"""Read an offline W&B run back: the `.wandb` transaction log of `<dir>/wandb/offline-run-*/`.

wandb 0.31 ships no Python reader for this file (its writer lives in the Go `wandb-core`), so
tests use this one. The format, checked against files wandb 0.31 writes:

* a 7-byte file header: `b":W&B"`, magic `0xBEE1` (uint16, little endian), version `0` (uint8);
* then LevelDB log framing in 32 KiB blocks (the header counts as part of block 0): each chunk
  has a 7-byte header `crc (uint32 LE), length (uint16 LE), type (uint8)` with type
  FULL=1, FIRST=2, MIDDLE=3, LAST=4; a block tail shorter than 7 bytes is zero padding;
* the CRC is plain CRC-32 (IEEE, `zlib.crc32`) of the type byte and the payload, *not* the
  masked CRC-32C of upstream LevelDB; it is checked (zlib makes that cheap);
* each reassembled payload is a `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.Struct("<4sHB")
HEADER_IDENT = b":W&B"
HEADER_MAGIC = 0xBEE1
HEADER_VERSION = 0
BLOCK_SIZE = 32 * 1024
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log, or it is corrupt."""


def _check_header(data: bytes) -> None:
    if len(data) < HEADER.size:
        raise WandbFileError("file too short for a W&B header")
    ident, magic, version = HEADER.unpack_from(data)
    if (ident, magic, version) != (HEADER_IDENT, HEADER_MAGIC, HEADER_VERSION):
        raise WandbFileError(f"bad header {data[: HEADER.size]!r}")


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """Reassembled record payloads of a whole `.wandb` file's bytes.

    A torn last chunk (a run still writing, or killed mid-write) ends the iteration quietly;
    a CRC mismatch raises `WandbFileError`.
    """
    _check_header(data)
    pos, pending = HEADER.size, bytearray()
    while pos + CHUNK.size <= len(data):
        block_left = BLOCK_SIZE - pos % BLOCK_SIZE
        if block_left < CHUNK.size:
            pos += block_left  # zero padding at the end of a block
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        payload = data[pos + CHUNK.size : pos + CHUNK.size + length]
        if kind == 0 or len(payload) < length:
            return  # preallocated zeros or a torn write: the end of what was written
        if zlib.crc32(bytes([kind]) + payload) != crc:
            raise WandbFileError(f"CRC mismatch in chunk at byte {pos}")
        pos += CHUNK.size + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = bytearray(payload)
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield bytes(pending + payload)
            pending = bytearray()
        else:
            raise WandbFileError(f"unknown chunk type {kind} at byte {pos}")


def read_records(path: str | Path) -> Iterator[pb.Record]:
    """Every `Record` in a `.wandb` file, in order."""
    for payload in iter_payloads(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _item_path(item: Any) -> list[str]:
    """An item's key path: `key`, or the `nested_key` list (W&B puts `a/b` keys there too)."""
    return [item.key] if item.key else list(item.nested_key)


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """History rows, each `key -> value` (JSON-decoded; nested keys joined with `.`)."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {".".join(_item_path(i)): json.loads(i.value_json) for i in record.history.item}
            )
    return rows


def _apply_updates(target: dict[str, Any], updates: Any, removes: Any = ()) -> None:
    for item in updates:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in removes:
        _del_path(target, _item_path(item))


def read_config(path: str | Path) -> dict[str, Any]:
    """The run config: the run record's config plus later config updates, in order."""
    config: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_updates(config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_updates(config, record.config.update, record.config.remove)
    return config


def read_summary(path: str | Path) -> dict[str, Any]:
    """The final run summary: every summary update (and removal) applied in order."""
    summary: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _apply_updates(summary, record.run.summary.update, record.run.summary.remove)
        elif kind == "summary":
            _apply_updates(summary, record.summary.update, record.summary.remove)
    return summary


def read_run(path: str | Path) -> pb.RunRecord:
    """The first run record (id, project, display name, tags, ...)."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run
    raise WandbFileError(f"no run record in {path}")


def read_exit_code(path: str | Path) -> int | None:
    """The exit code the run finished with, or None when it did not finish."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "exit":
            return record.exit.exit_code
    return None


def find_wandb_files(run_dir: str | Path) -> list[Path]:
    """All `wandb/offline-run-*/run-*.wandb` files under a run folder, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def find_wandb_file(run_dir: str | Path) -> Path:
    """The newest offline `.wandb` file of a run folder (raises FileNotFoundError if none)."""
    files = find_wandb_files(run_dir)
    if not files:
        raise FileNotFoundError(f"no wandb/offline-run-*/run-*.wandb under {run_dir}")
    return files[-1]
