"""How DeepSpeed's pipeline splits a model's layers into stages (`partition_method:
parameters`), as arithmetic over the traced layers: the planner's view of a stage."""

from __future__ import annotations

from roundhouse.parallel.costs import ModelProfile


def stage_groups(values: list[float], stages: int) -> list[list[int]]:
    """Indices of `values` split into `stages` contiguous parts of about equal sum (greedy)."""
    target = sum(values) / stages
    groups: list[list[int]] = [[]]
    current = 0.0
    for i, v in enumerate(values):
        left = len(values) - i
        if (
            current
            and current + v / 2 > target
            and len(groups) < stages
            and left >= stages - len(groups)
        ):
            groups.append([])
            current = 0.0
        groups[-1].append(i)
        current += v
    return groups + [[] for _ in range(stages - len(groups))]


def stage_sums(values: list[float], stages: int) -> list[float]:
    """Sums of `values` split into `stages` contiguous parts of about equal sum (greedy)."""
    return [sum(values[i] for i in group) for group in stage_groups(values, stages)]


def busiest_stage_share(p: ModelProfile, stages: int) -> float:
    """Share of the model's FLOPs on its busiest pipeline stage, the layers split by
    parameters as DeepSpeed's default `partition_method: parameters` splits them."""
    flops = [layer.fwd_flops for layer in p.layers]
    if not sum(flops):
        return 1 / stages
    groups = stage_groups([layer.num_params for layer in p.layers], stages)
    return max(sum(flops[i] for i in group) for group in groups) / sum(flops)


def pipeline_step_share(p: ModelProfile, stages: int, micro_batches: int) -> float:
    """A pipeline step's compute in units of one micro-batch's whole-model forward+backward:
    the first micro-batch passes every stage in turn (the fill and drain: the whole model,
    `1`), and each further one adds the busiest stage's share (the stage that paces the
    schedule): `1 + (micro_batches - 1) x busiest`. With balanced stages this is GPipe's
    `(micro_batches + stages - 1) / stages`; with unbalanced ones (an LSTM whose recurrence is
    one layer) it is less than that formula's `(micro_batches + stages - 1) x busiest`, which
    pays the busiest stage in every slot of the fill and drain too."""
    return 1.0 + (micro_batches - 1) * busiest_stage_share(p, stages)


def stage_saved(p: ModelProfile, stages: int) -> float:
    """Saved bytes per sample of the busiest pipeline stage (split by parameters, as DeepSpeed's
    default `partition_method: parameters`)."""
    return max(stage_sums([layer.saved_bytes for layer in p.layers], stages))
