"""How many lost workers a live run replaces (found by `benchmarks/elastic.py --trace`: a
kill every 30 s outran the old cap of `num_workers` replacements, and the group shrank to
nothing)."""

from __future__ import annotations

from roundhouse.cluster.live_group import max_replacements
from roundhouse.config import ClusterConfig


def test_a_live_run_replaces_up_to_max_failures_workers() -> None:
    assert max_replacements(ClusterConfig(num_workers=3, max_failures=100)) == 100


def test_a_live_run_replaces_at_least_num_workers_workers() -> None:
    assert max_replacements(ClusterConfig(num_workers=3)) == 3
