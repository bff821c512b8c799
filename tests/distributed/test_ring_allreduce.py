"""The ring all-reduce against `torch.distributed.all_reduce` on real gloo processes.

Each rank builds every rank's input from a seed, so it also knows the exact (float64) average.
One spawn per world size runs all cases (spawning costs seconds; the cases cost milliseconds).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from roundhouse.parallel.ring import GradientReducer, build_node_groups, ring_all_reduce_
from roundhouse.parallel.ring import collectives as ring_module
from tests.helpers.dist import DistributedTestError, run_distributed

LENGTHS = [1, 2, 3, 5, 7, 64, 1001, 4099]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TIMEOUT_S = 60


def make_input(rank: int, length: int, dtype: torch.dtype, integer: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + length)
    if integer:  # sums of small integers are exact in fp32, whatever the order
        return torch.randint(-50, 50, (length,), generator=gen).to(dtype)
    return torch.randn(length, generator=gen).to(dtype)


def exact_average(world_size: int, length: int, dtype: torch.dtype, integer: bool):
    inputs = [make_input(r, length, dtype, integer).double() for r in range(world_size)]
    return torch.stack(inputs).mean(0), torch.stack(inputs).abs().mean(0)


def check_case(rank: int, world_size: int, length: int, dtype: torch.dtype, integer: bool):
    ours = make_input(rank, length, dtype, integer)
    ring_all_reduce_(ours)
    native = make_input(rank, length, dtype, integer).float()
    dist.all_reduce(native)
    native /= world_size
    exact, scale = exact_average(world_size, length, dtype, integer)
    if dtype == torch.float32:
        if integer or world_size <= 2:  # a + b is order-free: bit-exact
            assert torch.equal(ours, native), (world_size, length, integer)
        torch.testing.assert_close(ours, native, rtol=1e-6, atol=1e-6)
    else:
        # Summed in fp32; rounded to the wire dtype once per hop and once at the end.
        eps = torch.finfo(dtype).eps
        bound = world_size * eps * scale + 1e-6
        assert ((ours.double() - exact).abs() <= bound).all(), (world_size, length, dtype)
    return ours


def all_cases(rank: int, world_size: int) -> list[torch.Tensor]:
    outputs = []
    for dtype in DTYPES:
        for length in LENGTHS:
            for integer in (True, False):
                outputs.append(check_case(rank, world_size, length, dtype, integer))
    outputs.append(bf16_wire_case(rank, world_size))
    ring_module.SEGMENT_BYTES = 16  # many segments per chunk: the pipelined path
    for dtype in DTYPES:
        # 13 and 21 give neighbouring chunks different segment counts (e.g. 5 | 4 | 4).
        for length in (13, 21, 1001):
            outputs.append(check_case(rank, world_size, length, dtype, integer=False))
    return outputs


def bf16_wire_case(rank: int, world_size: int) -> torch.Tensor:
    """grad_dtype=bf16: an fp32 buffer sent as bf16 stays within bf16 rounding of the average."""
    ours = make_input(rank, 1001, torch.float32, False)
    ring_all_reduce_(ours, wire_dtype=torch.bfloat16)
    exact, scale = exact_average(world_size, 1001, torch.float32, False)
    bound = (world_size + 1) * torch.finfo(torch.bfloat16).eps * scale + 1e-6
    assert ((ours.double() - exact).abs() <= bound).all()
    return ours


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
def test_ring_matches_all_reduce(world_size: int) -> None:
    outputs = run_distributed(all_cases, world_size, TIMEOUT_S)
    for rank_outputs in outputs[1:]:  # every replica ends bit-identical
        for a, b in zip(outputs[0], rank_outputs, strict=True):
            assert torch.equal(a, b)


def layouts(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """Flat/hierarchical x ring/native reducers on one 2-node x 2-rank layout."""
    node_groups = build_node_groups(node_rank=rank // 2, local_rank=rank % 2)
    flat = dist.new_group(list(range(world_size)))
    reducers = {
        "ring": GradientReducer("ring", group=flat),
        "native": GradientReducer("native", group=flat),
        "hier_ring": GradientReducer("ring", node_groups=node_groups),
        "hier_native": GradientReducer("native", node_groups=node_groups),
        "hier_bf16": GradientReducer("ring", node_groups=node_groups, wire_dtype=torch.bfloat16),
    }
    exact, _ = exact_average(world_size, 999, torch.float32, False)
    results = {}
    for name, reducer in reducers.items():
        results[name] = reducer(make_input(rank, 999, torch.float32, False))
        tol = 2e-2 if "bf16" in name else 1e-6
        torch.testing.assert_close(results[name].double(), exact, rtol=tol, atol=tol)
    return results


def test_hierarchical_layout_matches_flat() -> None:
    outputs = run_distributed(layouts, 4, TIMEOUT_S)
    for name in outputs[0]:
        for rank_outputs in outputs[1:]:
            assert torch.equal(outputs[0][name], rank_outputs[name]), name


def raises_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom")


def sleeps_on_rank_0(rank: int, world_size: int) -> None:
    if rank == 0:
        import time

        time.sleep(120)


def test_helper_reports_failing_and_hung_ranks() -> None:
    with pytest.raises(DistributedTestError, match="rank 1 failed: ValueError: boom"):
        run_distributed(raises_on_rank_1, 2, TIMEOUT_S)
    with pytest.raises(DistributedTestError, match="rank 0 hung"):
        run_distributed(sleeps_on_rank_0, 2, 4)
