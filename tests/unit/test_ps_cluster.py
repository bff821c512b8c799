"""Pure helpers of `roundhouse.cluster.ps`: what the server actors reserve and how they restart."""

from __future__ import annotations

from roundhouse.cluster.ps import actor_options, server_cpus, server_name
from roundhouse.cluster.runtime import embedded_resources
from roundhouse.config.loading import validate_job


def job(**strategy) -> object:
    return validate_job(
        {
            "name": "j",
            "model": {"name": "mlp"},
            "strategy": strategy,
            "cluster": {"num_workers": 2, "ps_resources": {"CPU": 1.5, "GPU": 1, "accel": 2}},
            "storage": {"run_id": "r1"},
        }
    )


def test_actor_options_split_ps_resources_and_restart_forever() -> None:
    options = actor_options(job(kind="ps", num_servers=2), 1)
    assert (options["num_cpus"], options["num_gpus"]) == (1.5, 1)
    assert options["resources"] == {"accel": 2}
    assert options["max_restarts"] == -1 and options["max_concurrency"] > 8
    assert options["name"] == server_name(job(kind="ps"), 1) == "roundhouse-ps-j-r1-1"


def test_embedded_cluster_counts_the_servers_cpus() -> None:
    ps = job(kind="ps", num_servers=2)
    assert server_cpus(ps) == 3.0 and server_cpus(job(kind="ring")) == 0.0
    assert embedded_resources(ps.cluster, server_cpus(ps))["num_cpus"] >= 2 + 3
