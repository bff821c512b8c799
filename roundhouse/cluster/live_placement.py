"""Where the live group's actors come from: a placement group per run, or the warm pool.

- `GroupPlacement` (`cluster.keep_warm_s: 0`, or `placement: strict_spread`, whose guarantee
  needs a placement group): one bundle per worker (`cluster.placement`), actors that end with
  the run (and with their driver).
- `PoolPlacement` (`keep_warm_s > 0`): detached named actors in the `roundhouse-pool`
  namespace (`actor_pool`), placed by Ray's scheduler (`SPREAD` for `placement: spread`),
  claimed warm when an earlier run left some of this job's kind, started fresh otherwise.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from roundhouse.cluster.actor_pool import POOL_NAMESPACE, claim_idle, evict_idle, pool_key
from roundhouse.cluster.capacity import worker_resources
from roundhouse.cluster.live_worker import LiveWorker
from roundhouse.cluster.runtime import ClusterError
from roundhouse.config import JobSpec

logger = logging.getLogger(__name__)

PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}


class Placement(ABC):
    """How the live group gets its actors (see the module docstring)."""

    pooled = False

    def __init__(self, job: JobSpec, runtime_env: dict[str, Any] | None) -> None:
        self.cluster, self.runtime_env = job.cluster, runtime_env

    def claim(self, wanted: int, token: str) -> list[Any]:
        """Up to `wanted` warm actors claimed for the run `token` (none without a pool)."""
        return []

    @abstractmethod
    def spawn(self, bundle: int, token: str) -> Any:
        """A fresh `LiveWorker` actor for bundle (worker slot) `bundle` of the run `token`."""

    def options(self) -> dict[str, Any]:
        """The actor options every live worker gets."""
        options: dict[str, Any] = {
            "num_cpus": self.cluster.cpus_per_worker,
            "num_gpus": self.cluster.gpus_per_worker,
            "max_restarts": 0,
        }
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        return options

    def close(self) -> None:
        """Free what the placement reserved for the run."""


class GroupPlacement(Placement):
    """One placement-group bundle per worker; actors that end with the run."""

    def __init__(self, job: JobSpec, runtime_env: dict[str, Any] | None) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        super().__init__(job, runtime_env)
        cluster = job.cluster
        bundles = [worker_resources(cluster) for _ in range(cluster.num_workers)]
        self.group = placement_group(bundles, strategy=PLACEMENT[cluster.placement])
        ready, _ = ray.wait([self.group.ready()], timeout=cluster.schedule_timeout_s)
        if not ready:
            remove_placement_group(self.group)
            raise ClusterError(
                f"the live worker group ({cluster.num_workers} x {bundles[0]}) could not be "
                f"scheduled within cluster.schedule_timeout_s={cluster.schedule_timeout_s:g} s",
                "free or add resources, lower the request, or raise cluster.schedule_timeout_s",
            )

    def spawn(self, bundle: int, token: str) -> Any:
        """A `LiveWorker` in bundle `bundle` of the run's placement group."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle)
        options = {**self.options(), "scheduling_strategy": strategy}
        return ray.remote(LiveWorker).options(**options).remote()

    def close(self) -> None:
        """Remove the placement group (and with it any actor still in it)."""
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self.group)


class PoolPlacement(Placement):
    """Warm detached actors, kept `cluster.keep_warm_s` after each run (`actor_pool`)."""

    pooled = True

    def __init__(self, job: JobSpec, runtime_env: dict[str, Any] | None) -> None:
        super().__init__(job, runtime_env)
        self.key = pool_key(job, runtime_env)
        self.held: set[str] = set()  # names of the actors this run started or claimed

    def claim(self, wanted: int, token: str) -> list[Any]:
        """Idle actors of this job's kind, claimed for `token`; when fewer than `wanted`, idle
        actors of other kinds end (they may hold the resources the fresh ones need)."""
        warm = claim_idle(self.key, wanted, token, exclude=self.held)
        self.held.update(name for name, _ in warm)
        if len(warm) < wanted:
            evict_idle(keep_key=self.key)
        return [handle for _, handle in warm]

    def spawn(self, bundle: int, token: str) -> Any:
        """A fresh detached `LiveWorker`, named `<key>.<id>` in the pool's namespace."""
        import secrets

        import ray

        name = f"{self.key}.{secrets.token_hex(6)}"
        self.held.add(name)
        options = {
            **self.options(),
            "name": name,
            "namespace": POOL_NAMESPACE,
            "lifetime": "detached",
            "scheduling_strategy": "SPREAD" if self.cluster.placement == "spread" else "DEFAULT",
        }
        return ray.remote(LiveWorker).options(**options).remote(self.cluster.keep_warm_s, token)


def build_placement(job: JobSpec, runtime_env: dict[str, Any] | None) -> Placement:
    """The pool when `cluster.keep_warm_s > 0` (and the placement allows it), else a group."""
    cluster = job.cluster
    if cluster.keep_warm_s > 0 and cluster.placement != "strict_spread":
        return PoolPlacement(job, runtime_env)
    return GroupPlacement(job, runtime_env)
