"""`PSClient`: a worker's side of the parameter server.

Pushes: parameters are grouped into buckets (reverse order, as backward produces them; the same
buckets and the same scheduler as the ring strategy, `roundhouse.parallel.buckets`). A
post-accumulate-grad hook counts each bucket's gradients; a complete bucket is handed to one
background thread, which packs it, (with node aggregation)
sums it over the node onto the node leader, and sends each shard its part. So gradients travel
while autograd goes on with earlier layers.

Pulls: the step's last push to each shard also asks for the parameters of the next step (the
leader only; it then broadcasts them inside its node), so a step costs one call per shard; the
same thread collects the replies while the main thread returns to the loop (data loading,
logging), and copies them into the model just before the next forward. The request is not held
back until the pushes are acknowledged: each shard answers once this pusher's gradients arrived.

One thread runs every push and pull of this worker in order, so node-group collectives happen
in the same order on every rank of a node.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from roundhouse.parallel.buckets import Bucket, BucketScheduler
from roundhouse.parallel.ps.protocol import ParameterStore
from roundhouse.parallel.ps.sharding import shard_of, used_shards

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PusherRole:
    """Who this rank pushes for.

    Without node aggregation every rank is its own pusher (`pusher = rank`, `weight = 1`).
    With it, a node's ranks form one pusher (`pusher = node_rank`, `weight` = ranks on the
    node), led by the node's lowest rank, which alone talks to the servers.
    """

    pusher: int
    is_leader: bool
    weight: int
    node_group: dist.ProcessGroup | None = None
    leader_rank: int = 0


@dataclass
class Pulled:
    """The parameters of one step, flat in model order, and what the servers reported."""

    flat: Tensor
    lr: float | None = None
    grad_norm: float | None = None
    ahead: int | None = None


class PSClient:
    """Overlapped gradient pushes and parameter prefetch for one worker.

    Usage per optimizer step: `begin(step)` before the synchronising backward, `flush()` after
    it, then `start_pull(step + 1)`; `wait_pull()` before the parameters are needed.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        store: ParameterStore | None,
        layout: list[list[int]],
        role: PusherRole,
        *,
        bucket_mb: float,
        shards: list[int] | None = None,
    ) -> None:
        self.params = list(params)
        self.store, self.layout, self.role = store, layout, role
        self.scheduler = BucketScheduler(
            self.params, bucket_mb, self._launch, thread_name="roundhouse-ps"
        )
        self.buckets = self.scheduler.buckets
        index_of = {p: i for i, p in enumerate(self.params)}
        self.bucket_indices = [[index_of[p] for p in b.params] for b in self.buckets]
        self.shard_of = shard_of(layout)
        # The shards each pull asks: those with parameters here (or `shards`: every shard
        # that holds row tables too, so the reported gradient norm covers them).
        self.used = used_shards(layout) if shards is None else shards
        # The bucket whose push completes this worker's gradient on each shard: that push
        # also asks for the next step's parameters (`ParameterStore.push`'s `pull_step`).
        self.last_bucket = {
            self.shard_of[g]: i for i, gs in enumerate(self.bucket_indices) for g in gs
        }
        self.offsets = _offsets(self.params)
        self.push_futures: list[Future] = []
        self.pull_future: Future | None = None
        self.step = 0

    # --- pushes -------------------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """The next backward is the synchronising one of `step`: push its buckets."""
        self.step = step
        self.scheduler.begin()

    def _launch(self, i: int) -> None:
        self.push_futures.append(self.scheduler.submit(self._push_bucket, i, self.step))

    def flush(self) -> None:
        """Backward returned: push every bucket not pushed yet (missing gradients as absent)."""
        self.scheduler.flush()

    def _push_bucket(self, i: int, step: int) -> None:
        bucket: Bucket = self.buckets[i]
        buffer = bucket.pack(torch.float32)
        role = self.role
        if role.node_group is not None:
            dist.reduce(buffer, role.leader_rank, group=role.node_group)
        if not role.is_leader:
            return
        buffer = buffer.cpu()
        numel = bucket.numel
        flags = buffer[numel:].tolist()
        per_shard: dict[int, tuple[list[int], list[bool], list[Tensor]]] = {}
        offset = 0
        for p, g, flag in zip(bucket.params, self.bucket_indices[i], flags, strict=True):
            indices, present, parts = per_shard.setdefault(self.shard_of[g], ([], [], []))
            indices.append(g)
            present.append(flag > 0)
            if flag > 0:
                parts.append(buffer[offset : offset + p.numel()])
            offset += p.numel()
        for shard, (indices, present, parts) in per_shard.items():
            flat = torch.cat(parts) if parts else torch.zeros(0)
            pull_step = step + 1 if self.last_bucket[shard] == i else None
            self.store.push(
                shard, role.pusher, step, indices, flat.numpy(), present, role.weight, pull_step
            )

    # --- pulls --------------------------------------------------------------------------------

    def start_pull(self, step: int) -> None:
        """Fetch (in the background) the parameters to compute `step` with."""
        assert self.pull_future is None, "a pull is already in flight"
        self.pull_future = self.scheduler.submit(self._pull, step)

    def _pull(self, step: int) -> Pulled:
        role = self.role
        device = self.params[0].device
        flat = np.empty(self.offsets[-1], dtype=np.float32)
        pulled = Pulled(torch.from_numpy(flat))
        if role.is_leader:
            replies = self.store.pull(self.used, role.pusher, step)  # waits for the pushes
            for shard, reply in zip(self.used, replies, strict=True):
                self._scatter(flat, shard, reply.flat)
            pulled.lr = replies[0].lr if replies else None
            norms = [r.grad_sq_norm for r in replies]
            if all(n is not None for n in norms):
                pulled.grad_norm = math.sqrt(sum(norms))
            pulled.ahead = max((r.ahead for r in replies), default=0)
        if role.node_group is not None:
            pulled.flat = pulled.flat.to(device)
            dist.broadcast(pulled.flat, role.leader_rank, group=role.node_group)
        return pulled

    def _scatter(self, flat: np.ndarray, shard: int, values: np.ndarray) -> None:
        offset = 0
        for g in self.layout[shard]:
            n = self.params[g].numel()
            flat[self.offsets[g] : self.offsets[g] + n] = values[offset : offset + n]
            offset += n

    def wait_pull(self) -> Pulled | None:
        """Wait for the pull in flight (None if there is none); re-raise any failure."""
        self.wait_pushes()
        future, self.pull_future = self.pull_future, None
        return future.result() if future is not None else None

    def wait_pushes(self) -> None:
        """Wait for every push launched so far; re-raise any failure."""
        futures, self.push_futures = self.push_futures, []
        for future in futures:
            future.result()

    @torch.no_grad()
    def load(self, flat: Tensor) -> None:
        """Copy pulled parameters into the model; drop the (already pushed) gradients."""
        flat = flat.to(self.params[0].device)
        for p, start in zip(self.params, self.offsets, strict=False):
            p.copy_(flat[start : start + p.numel()].view_as(p))
            p.grad = None

    def close(self) -> None:
        """Remove the hooks and stop the background thread (queued work is dropped)."""
        self.scheduler.close(wait=False)


def _offsets(params: Sequence[nn.Parameter]) -> list[int]:
    """Start of each parameter in the flat model vector, plus the total at the end."""
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return offsets
