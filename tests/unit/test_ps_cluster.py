"""Pure helpers of `roundhouse.cluster.services` for the `ps` strategy's servers: what the actors
reserve and how they restart (cluster/ knows only the strategy's `ServiceSpec`)."""

from __future__ import annotations

import pytest

from roundhouse.cluster.runtime import embedded_resources
from roundhouse.cluster.services import actor_options, job_services, service_cpus, service_name
from roundhouse.config.loading import validate_job
from roundhouse.errors import JobFileError
from roundhouse.parallel.ps import ShardServer

RESOURCES = {"CPU": 1.5, "GPU": 1, "accel": 2}


def job(**strategy) -> object:
    if strategy["kind"] == "ps":
        strategy.setdefault("server_resources", RESOURCES)
    return validate_job(
        {
            "name": "j",
            "model": {"name": "mlp"},
            "strategy": strategy,
            "cluster": {"num_workers": 2},
            "storage": {"run_id": "r1"},
        }
    )


def test_actor_options_split_ps_resources_and_restart_forever() -> None:
    ps = job(kind="ps", num_servers=2)
    [spec] = job_services(ps)
    assert (spec.name, spec.actor_class, spec.count) == ("ps", ShardServer, 2)
    options = actor_options(ps, spec, 1)
    assert (options["num_cpus"], options["num_gpus"]) == (1.5, 1)
    assert options["resources"] == {"accel": 2}
    assert options["max_restarts"] == -1 and options["max_concurrency"] > 8
    assert options["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "1"}}
    assert options["name"] == service_name(ps, spec, 1) == "roundhouse-ps-j-r1-1"


def test_embedded_cluster_counts_the_servers_cpus() -> None:
    ps = job(kind="ps", num_servers=2)
    assert service_cpus(ps) == 3.0 and service_cpus(job(kind="ring")) == 0.0
    assert job_services(job(kind="ring")) == []
    assert embedded_resources(ps.cluster, service_cpus(ps))["num_cpus"] >= 2 + 3


def test_the_old_cluster_key_is_one_line_naming_where_it_moved() -> None:
    with pytest.raises(JobFileError, match=r"'cluster\.ps_resources' has moved") as info:
        validate_job({"name": "j", "model": {"name": "mlp"}, "cluster": {"ps_resources": {}}})
    assert "strategy.server_resources" in info.value.fix
