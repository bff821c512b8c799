"""Where each rank ran: `ranks/rank_<r>.json` in the run folder, one file per worker.

Every Ray worker writes its own file when it starts (no collective, so a rank that is slow or
stuck still says where it is). A restarted worker group overwrites the files; rank 0 removes
files of ranks beyond the current world size, so after a shrink the folder describes the
group that is running now. Each file holds the rank's `WorkerContext` topology plus the Ray
node id, node address, host name, process id, start time and the checkpoint step it resumed
from (`null` for a fresh start).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import Any

from roundhouse.runs.rundir import RunDir

logger = logging.getLogger(__name__)

RANKS_DIR = "ranks"
TOPOLOGY_KEYS = (
    "rank",
    "world_size",
    "local_rank",
    "local_world_size",
    "node_rank",
    "num_nodes",
)


def rank_file(rank: int) -> str:
    """The file name of `rank`'s record inside the run folder."""
    return f"{RANKS_DIR}/rank_{rank}.json"


def describe_rank(
    ctx: Any, *, node_id: str, node_ip: str, resume_step: int | None
) -> dict[str, Any]:
    """The record one worker writes: its topology plus where and when it runs.

    Args:
        ctx: the worker's `WorkerContext`.
        node_id: the Ray node id hosting this worker.
        node_ip: that node's address.
        resume_step: the checkpoint step this attempt resumes from, or None.
    """
    record: dict[str, Any] = {key: getattr(ctx, key) for key in TOPOLOGY_KEYS}
    record.update(
        device=str(ctx.device),
        node_id=node_id,
        node_ip=node_ip,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started=time.time(),
        resume_step=resume_step,
    )
    return record


def write_rank_record(run_dir: RunDir, record: dict[str, Any]) -> None:
    """Write this rank's record; rank 0 also drops records of ranks no longer in the group."""
    run_dir.write_text(rank_file(record["rank"]), json.dumps(record, indent=1) + "\n")
    if record["rank"] != 0:
        return
    for name in run_dir.listdir(RANKS_DIR):
        rank = _rank_of(name)
        if rank is not None and rank >= record["world_size"]:
            run_dir.remove(RANKS_DIR, name)


def _rank_of(name: str) -> int | None:
    stem = name.removeprefix("rank_").removesuffix(".json")
    return int(stem) if stem.isdigit() and name.startswith("rank_") else None


def read_rank_record(run_dir: RunDir, rank: int) -> dict[str, Any] | None:
    """One rank's record, or None when it is missing or half-written."""
    try:
        return json.loads(run_dir.read_text(rank_file(rank)))
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
